# Two set-up commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# This project's machines keep a CPU build of torch 2.13.0 on disk; use it when present.
WHEELS := $(wildcard /opt/wheels)
PIP_FLAGS := $(if $(WHEELS),--find-links $(WHEELS),)

.PHONY: demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) torch==2.13.0
	$(BIN)/pip install $(PIP_FLAGS) -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py
	$(BIN)/graphsurgeon generate --config infinity-tiny --pn 0.25M --prompt "a red apple" --prompt "a blue bird" \
		--passes lhep,sats --compare --report out/demo_images/report.html --out out/demo_images --overwrite

# One pytest-xdist worker per core (each computing on one thread: tests/conftest.py); TEST_WORKERS=0 runs in-process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
