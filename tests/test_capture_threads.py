"""A capture in one thread changes nothing for the calls running in other threads.

torch.fx records a graph by replacing ``nn.Module.__call__`` (and more) on process-wide objects. Serialising
captures against each other is not enough: the replacements used to intercept every thread, so while one thread
captured, other threads' eager calls, graph runs and captures of other models were recorded into its graph or
failed (``NameError: module is not installed as a submodule``). Here several threads run all of those at once,
released together, while captures happen; every result must equal the same call made alone, with zero errors.
"""
from __future__ import annotations

import copy
import threading
import time
from typing import Any, Callable

import pytest
import torch
import torch.fx._symbolic_trace as fx_trace

from examples.toy_nsp.adapter import ToyAdapter
from examples.toy_nsp.model import build_toy
from graphsurgeon import optimize
from graphsurgeon.capture import CapturedModel, capture
from model_adapters.infinity import build_infinity, get_scale_schedule

from .helpers import generate_kwargs, outputs_equal
from .test_capture_concurrency import assert_unpatched, graph_texts, patch_points, small_plan, tiny_plan

TOY = ToyAdapter()
INFINITY_KWARGS = generate_kwargs(get_scale_schedule(1.0, "0.06M"), (5, 9), seed=1)
TIMEOUT_S = 240


def toy_kwargs(batch: int) -> dict:
    return {"labels": torch.arange(batch) % 4, "cfg": 2.0, "seed": 3}


def same_toy(a: Any, b: Any) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.indices, b.indices)) and torch.equal(a.total, b.total)


class PlainModule(torch.nn.Module):
    """A module called outside any capture, with an autocast region: neither may be recorded by another thread."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = self.inner(x)
        return self.inner(y.float()) + x


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    torch.manual_seed(0)
    toy = build_toy(seed=0)
    infinity = build_infinity("infinity-tiny", seed=0)
    fast_infinity = optimize(infinity, adapter="infinity", passes=["lhep", "sats"])
    fast_infinity.capture(**INFINITY_KWARGS)
    plain = PlainModule()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    return {"toy": toy, "other_toy": build_toy(seed=1), "infinity": infinity, "fast_infinity": fast_infinity,
            "plain": plain, "x": x, "infinity graphs": fast_infinity.generate(**INFINITY_KWARGS),
            "infinity capture": graph_texts(capture(tiny_plan(infinity)))}


def run_together(captures: list[Callable[[], None]], loops: list[Callable[[], None]]) -> tuple[list[str], dict]:
    """Start every thread at one barrier; ``loops`` repeat until every capture thread has finished. Returns the
    errors (as text) and how many times each loop ran."""
    barrier = threading.Barrier(len(captures) + len(loops))
    captures_done = threading.Event()
    errors: list[str] = []
    counts: dict[int, int] = {i: 0 for i in range(len(loops))}

    def capture_work(work: Callable[[], None]) -> None:
        try:
            barrier.wait(TIMEOUT_S)
            work()
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            errors.append(f"capture: {type(err).__name__}: {err}")

    def loop_work(i: int, work: Callable[[], None]) -> None:
        try:
            barrier.wait(TIMEOUT_S)
            while not captures_done.is_set() or counts[i] == 0:
                work()
                counts[i] += 1
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            errors.append(f"loop {i}: {type(err).__name__}: {err}")

    capture_threads = [threading.Thread(target=capture_work, args=(w,)) for w in captures]
    loop_threads = [threading.Thread(target=loop_work, args=(i, w)) for i, w in enumerate(loops)]
    for thread in capture_threads + loop_threads:
        thread.start()
    deadline = time.monotonic() + TIMEOUT_S
    for thread in capture_threads:
        thread.join(max(deadline - time.monotonic(), 1))
    captures_done.set()
    for thread in loop_threads:
        thread.join(max(deadline - time.monotonic(), 1))
    assert not any(t.is_alive() for t in capture_threads + loop_threads), "a thread did not finish"
    return errors, counts


@pytest.mark.parametrize("trial", range(2))
def test_captures_beside_eager_calls_graph_runs_and_other_captures(models, trial):
    toy, other_toy, plain, x = models["toy"], models["other_toy"], models["plain"], models["x"]
    fast_toy = optimize(toy, adapter=TOY, passes=["lhep", "sats"])
    fast_toy.generate(**toy_kwargs(2))  # its batch-2 graphs exist: the loops below run them
    new_batches = (3 + 2 * trial, 4 + 2 * trial)  # keys no earlier call captured
    alone = {b: optimize(toy, adapter=TOY, passes=["lhep", "sats"]).generate(**toy_kwargs(b)) for b in new_batches}
    reference = {
        "toy graphs": fast_toy.generate(**toy_kwargs(2)),
        "other toy eager": TOY.generate(other_toy, **toy_kwargs(2)),
        "infinity graphs": models["infinity graphs"], "infinity capture": models["infinity capture"],
    }
    with torch.no_grad():
        reference["plain"] = plain(x)
    before = patch_points()
    results: dict[str, list] = {name: [] for name in ("new keys", "infinity capture")}

    def capture_new_keys() -> None:  # captures on the model whose graphs another thread runs
        results["new keys"] += [(b, fast_toy.generate(**toy_kwargs(b))) for b in new_batches]

    def capture_infinity() -> None:  # an Infinity capture: autocast regions, fx-wrapped functions, dict state
        captured = capture(tiny_plan(models["infinity"]))
        assert isinstance(captured, CapturedModel)
        results["infinity capture"].append(graph_texts(captured))

    def check(name: str, ok: bool) -> None:
        if not ok:
            raise AssertionError(f"{name}: differs from the same call alone")

    def run_plain() -> None:
        with torch.no_grad():
            check("plain", torch.equal(plain(x), reference["plain"]))
        check("new module", torch.nn.Linear(2, 2)(torch.ones(1, 2)).shape == (1, 2))

    loops = [
        lambda: check("toy graphs", same_toy(fast_toy.generate(**toy_kwargs(2)), reference["toy graphs"])),
        lambda: check("other toy eager", same_toy(TOY.generate(other_toy, **toy_kwargs(2)), reference["other toy eager"])),
        lambda: check("infinity graphs", outputs_equal(models["fast_infinity"].generate(**INFINITY_KWARGS),
                                                       reference["infinity graphs"])),
        run_plain,
    ]
    errors, counts = run_together([capture_new_keys, capture_infinity], loops)
    assert errors == []
    assert all(count >= 1 for count in counts.values()), counts
    assert [b for b, _ in results["new keys"]] == list(new_batches)
    assert all(same_toy(out, alone[b]) for b, out in results["new keys"])
    assert results["infinity capture"] == [reference["infinity capture"]]
    assert_unpatched(before)


def test_a_thread_that_is_not_capturing_is_never_recorded():
    """While a capture runs, a module called in another thread runs eagerly and adds no node to the graph."""
    torch.manual_seed(0)
    plain, x = PlainModule(), torch.randn(4, 8)
    inside = threading.Event()
    release = threading.Event()
    seen: list[Any] = []

    def step(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        inside.set()  # the capture is tracing now: the other thread calls its module in this window
        assert release.wait(TIMEOUT_S)
        return {"y": model(inputs["x"])}

    def other() -> None:
        assert inside.wait(TIMEOUT_S)
        with torch.no_grad():
            seen.append(plain(x))
        seen.append(fx_trace.is_fx_symbolic_tracing())  # torch.compile'd code here would run eagerly if True
        release.set()

    worker = threading.Thread(target=other)
    worker.start()
    captured = capture(small_plan(copy.deepcopy(torch.nn.Linear(4, 4)), step))
    worker.join(TIMEOUT_S)
    assert isinstance(seen[0], torch.Tensor) and not isinstance(seen[0], torch.fx.Proxy)
    assert seen[1] is False
    with torch.no_grad():
        assert torch.equal(seen[0], plain(x))
    targets = [n.target for n in captured.scales[0].module.graph.nodes if n.op == "call_module"]
    assert targets == ["model"]  # only the captured model's own call; nothing of the other thread's module
