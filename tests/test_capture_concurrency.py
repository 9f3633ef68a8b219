"""Captures in several threads: one process-wide lock, and torch left un-patched afterwards, failure or not.

torch.fx patches ``nn.Module.__call__``/``__getattr__`` for the whole process while it traces; two captures at
once used to restore each other's patches, after which every new ``nn.Module`` raised NameError.
"""
from __future__ import annotations

import copy
import sys
import threading
from typing import Any, Callable, Optional, Union

import pytest
import torch
import torch.fx._symbolic_trace as fx_trace

from graphsurgeon import get_adapter
from graphsurgeon.capture import CAPTURE_LOCK, CapturedModel, CaptureError, CapturePlan, ScaleSpec, capture
from model_adapters.infinity import build_infinity

ADAPTER = get_adapter("infinity")


def patch_points() -> dict[str, Any]:
    """What a capture patches process-wide, by name: each must hold the same object afterwards."""
    autocast = torch.amp.autocast_mode.autocast
    points = {"nn.Module.__call__": torch.nn.Module.__call__, "nn.Module.__getattr__": torch.nn.Module.__getattr__,
              "autocast.__enter__": autocast.__enter__, "autocast.__exit__": autocast.__exit__,
              "fx tracing flag": fx_trace.is_fx_symbolic_tracing()}
    points.update({f"fx.wrap {name}": frame.get(name) for (_, name), frame in fx_trace._wrapped_fns_to_patch.items()})
    points.update({f"fx.wrap {cls.__name__}.{name}": getattr(cls, name)
                   for cls, name in fx_trace._wrapped_methods_to_patch})
    for module_name, module in list(sys.modules.items()):  # globals fx autowraps in the model's code
        if module_name.startswith("model_adapters."):
            points.update({f"{module_name}.{key}": value for key, value in vars(module).items()})
    return points


def assert_unpatched(before: dict[str, Any]) -> None:
    after = patch_points()
    assert [name for name, value in before.items() if after.get(name) is not value] == []
    assert after["nn.Module.__call__"] is fx_trace._orig_module_call  # the function torch defines, not a wrapper
    assert after["nn.Module.__getattr__"] is fx_trace._orig_module_getattr
    assert torch.nn.Linear(2, 2)(torch.randn(1, 2)).shape == (1, 2)  # a new module runs outside any trace


def tiny_plan(tiny: torch.nn.Module, scales: int = 3) -> CapturePlan:
    """The plan (0.06M) of a fresh copy of ``tiny``, cut to its first scales: long enough for two captures to
    overlap."""
    model = copy.deepcopy(tiny)  # a third of the time of building one
    plan = ADAPTER.capture_plan(model, ADAPTER.validate(model, **ADAPTER.capture_args(model, pn="0.06M")))
    plan.scales = plan.scales[:scales]
    plan.regions = {name: specs[:scales] for name, specs in plan.regions.items()}
    return plan


def refused_plan(tiny: torch.nn.Module, at_scale: int = 1) -> CapturePlan:
    """The tiny plan with one step that reads a traced value as a Python int, which the tracer refuses."""
    plan = tiny_plan(tiny)
    spec = plan.scales[at_scale]
    step = spec.step

    def refused_step(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        outputs = step(model, inputs)
        int(outputs["logits"].sum())
        return outputs

    spec.step = refused_step
    return plan


def small_plan(model: torch.nn.Module, step: Optional[Callable] = None) -> CapturePlan:
    """One scale of ``model`` on x (2, 4, 4): a capture that takes milliseconds."""
    return CapturePlan(model=model, scales=[ScaleSpec(
        index=0, grid=(4,), inputs={"x": torch.empty(2, 4, 4, device="meta")}, token_input="x", token_axis=1,
        step=step or (lambda m, inputs: {"y": m(inputs["x"])}))])


def graph_texts(captured: CapturedModel) -> list[str]:
    return [str(scale.module.graph) for scale in captured.scales + captured.regions["residual"]]


def capture_together(plans: list[CapturePlan]) -> list[Union[CapturedModel, Exception]]:
    """Capture each plan in its own thread, all released at once by a barrier."""
    barrier = threading.Barrier(len(plans))
    results: list[Union[CapturedModel, Exception, None]] = [None] * len(plans)

    def work(i: int) -> None:
        barrier.wait()
        try:
            results[i] = capture(plans[i])
        except Exception as err:  # noqa: BLE001 - the test inspects it
            results[i] = err

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(plans))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    return results


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return build_infinity("infinity-tiny", seed=0)


@pytest.fixture(scope="module")
def reference(tiny) -> list[str]:
    """Graphs of a capture with no other running."""
    return graph_texts(capture(tiny_plan(tiny)))


@pytest.mark.parametrize("trial", range(2))
def test_concurrent_captures_equal_a_sequential_one(tiny, reference, trial):
    before = patch_points()
    results = capture_together([tiny_plan(tiny), tiny_plan(tiny)])
    assert all(isinstance(result, CapturedModel) for result in results), results
    assert [graph_texts(result) for result in results] == [reference, reference]
    assert_unpatched(before)


def test_refused_capture_beside_another_leaves_torch_unpatched(tiny, reference):
    before = patch_points()
    refused, captured = capture_together([refused_plan(tiny), tiny_plan(tiny)])
    assert isinstance(refused, CaptureError), refused
    assert "int() of a traced tensor in the step function" in str(refused)
    assert isinstance(captured, CapturedModel), captured
    assert graph_texts(captured) == reference
    assert_unpatched(before)


class CastsToInt(torch.nn.Module):
    """Reads a traced value as an int inside an autocast region: the refusal leaves through the patched exit."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = self.proj(x)
            return y[:, :int(y.sum())]


def test_refused_capture_leaves_torch_unpatched():
    before = patch_points()
    with pytest.raises(CaptureError, match=r"int\(\) of a traced tensor in module 'model' \(CastsToInt\)"):
        capture(small_plan(CastsToInt()))
    assert_unpatched(before)
    assert not torch.is_autocast_enabled("cpu")


def test_capture_waits_while_another_thread_holds_the_lock():
    started = threading.Event()
    results: list[Union[CapturedModel, Exception]] = []

    def step(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        started.set()
        return {"y": model(inputs["x"])}

    def work() -> None:
        try:
            results.append(capture(small_plan(torch.nn.Linear(4, 4), step)))
        except Exception as err:  # noqa: BLE001 - the test inspects it
            results.append(err)

    worker = threading.Thread(target=work)
    with CAPTURE_LOCK:
        worker.start()
        assert not started.wait(0.5) and worker.is_alive()  # waiting for the lock, not tracing
        # re-entrant: the holder may capture itself (an adapter holds it around its capture-time substitution)
        assert len(capture(small_plan(torch.nn.Linear(4, 4))).scales) == 1
        assert not started.is_set()
    worker.join(timeout=30)
    assert not worker.is_alive() and started.is_set()
    assert len(results) == 1 and isinstance(results[0], CapturedModel), results
