"""Shared fixtures. Reference data lives in ../shared (beside the checkout in CI, absent in a user's clone)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs one worker per core) each worker computes on one thread: a worker
    with torch's default (one thread per core) would oversubscribe the cores several times over."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def reference_file(name: str) -> Path:
    """Path of a reference file, or skip the test with the reason when ../shared is not there."""
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"reference data {path} is absent (it sits beside the checkout in CI, not in a user's clone)")
    return path


@pytest.fixture(scope="session")
def golden() -> dict:
    return torch.load(reference_file("infinity_tiny_golden.pt"), weights_only=True)


@pytest.fixture(scope="session")
def golden_model(golden):
    from model_adapters.infinity import build_infinity

    config = {k: v for k, v in golden["config"].items() if k not in ("h_div_w", "B")}
    model = build_infinity(config, device="meta")
    model.load_state_dict(golden["state_dict"], strict=True, assign=True)
    return model.eval()


@pytest.fixture(scope="session")
def golden_text(golden) -> tuple:
    return golden["text_kv"], golden["text_lens"], golden["text_cu_seqlens"], max(golden["text_lens"])


@pytest.fixture(scope="module")
def tiny_float32():
    """The tiny model with seeded weights and the bf16 rounding of text attention off, so that batch and graph
    comparisons are not lost in rounding noise (one instance per test module)."""
    from model_adapters.infinity import build_infinity, set_text_attention_bf16

    model = build_infinity("infinity-tiny", seed=0)
    set_text_attention_bf16(model, False)
    return model
