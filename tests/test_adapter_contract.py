"""The adapter contract (graphsurgeon.ModelAdapter): written down, checked when an adapter is looked up."""
from __future__ import annotations

import pytest

from graphsurgeon import ConfigError, ModelAdapter, get_adapter, register_adapter
from graphsurgeon.adapters import _REGISTRY, missing_members
from graphsurgeon.cli import main
from model_adapters.infinity.adapter import InfinityAdapter


@pytest.fixture
def registered():
    """Register test adapters under throwaway names; removed afterwards."""
    names = []

    def register(name, factory):
        names.append(name)
        register_adapter(name, factory)

    yield register
    for name in names:
        _REGISTRY.pop(name, None)


class HalfDone(ModelAdapter):
    """An adapter that implements only the sampler."""

    name = "half-done"

    def generate(self, model, scale_runner=None, **kwargs):
        return None


class DuckTyped:
    """Looks like an adapter but does not subclass the contract."""

    name = "duck"


def test_infinity_meets_the_contract():
    assert missing_members(InfinityAdapter) == [] and isinstance(get_adapter("infinity"), ModelAdapter)
    assert "capture_plan" in ModelAdapter.__abstractmethods__ and ModelAdapter.capture_plan.__doc__


def test_a_missing_member_is_named_at_lookup(registered, capsys):
    registered("half-done", HalfDone)
    with pytest.raises(ConfigError, match=r"does not meet the adapter contract: it lacks \['baseline_runner', "
                                          r"'benchmark_args', 'build_model', 'capture_args'"):
        get_adapter("half-done")
    assert main(["check", "--adapter", "half-done"]) == 2
    err = capsys.readouterr().err
    assert "lacks" in err and "capture_plan" in err and len(err.strip().splitlines()) == 1


def test_an_adapter_outside_the_contract_is_refused(registered):
    registered("duck", DuckTyped)
    with pytest.raises(ConfigError, match="lacks"):
        get_adapter("duck")
    registered("made", lambda: object())
    with pytest.raises(ConfigError, match="its factory returned object, not a ModelAdapter"):
        get_adapter("made")


def test_optional_members_have_defaults():
    import torch

    class Minimal(InfinityAdapter):
        operating_points = ModelAdapter.operating_points
        paper_latency_s = ModelAdapter.paper_latency_s
        precision = ModelAdapter.precision

    adapter = Minimal()
    assert adapter.operating_points == {} and adapter.paper_latency_s == {}
    assert adapter.precision(None, torch.float32)() is not None
    with pytest.raises(ConfigError, match="runs float32 only"):
        adapter.precision(None, torch.bfloat16)


def test_an_outside_adapter_missing_members_is_named_by_check(capsys):
    assert main(["check", "--adapter", "tests.test_adapter_contract:HalfDone"]) == 2
    err = capsys.readouterr().err
    assert "does not meet the adapter contract: it lacks" in err and "'sample'" in err
    assert len(err.strip().splitlines()) == 1


def test_var_and_the_worked_example_meet_the_contract():
    from examples.toy_nsp.adapter import ToyAdapter
    from model_adapters.var.adapter import VARAdapter

    assert missing_members(VARAdapter) == [] and missing_members(ToyAdapter) == []
    assert isinstance(get_adapter("var"), VARAdapter)
