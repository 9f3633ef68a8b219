"""Two threads calling ``generate`` on one model get the results (and stats) they would get one after another."""
from __future__ import annotations

import json
import threading
from typing import Any, Callable, Optional


import graphsurgeon.emit
from graphsurgeon import get_adapter, optimize
from model_adapters.infinity import get_scale_schedule
from model_adapters.infinity.adapter import InfinityAdapter
from model_adapters.infinity.sampler import EagerScaleRunner

from .helpers import generate_kwargs, outputs_equal

SCHEDULE = get_scale_schedule(1.0, "0.06M")  # 7 scales: LHEP on 4-6, SATS on 3-6
SEEDS = (1, 2)
TIMEOUT_S = 300


def kwargs(seed: int) -> dict:
    return generate_kwargs(SCHEDULE, (5, 9), seed=seed)


def in_two_threads(call: Callable[[int], Any]) -> dict[int, Any]:
    """``call(seed)`` for both seeds at once; an exception in a thread is raised here."""
    results: dict[int, Any] = {}

    def run(seed: int) -> None:
        try:
            results[seed] = call(seed)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            results[seed] = err

    threads = [threading.Thread(target=run, args=(seed,)) for seed in SEEDS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    for result in results.values():
        if isinstance(result, BaseException):
            raise result
    assert set(results) == set(SEEDS), "a thread did not finish"
    return results


def same_stats(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # gamma holds NaN: compare as text


class Rendezvous(InfinityAdapter):
    """Holds each ``generate`` where it starts sampling on its graph runner until the other thread's call got there too:
    any per-call state kept on the shared optimized model would then be read back by the wrong call."""

    barrier: Optional[threading.Barrier] = None

    def sample(self, model, args, scale_runner=None):
        if self.barrier is not None:
            self.barrier.wait(TIMEOUT_S)
        return super().sample(model, args, scale_runner)


def test_optimized_generate_in_two_threads(tiny_float32, monkeypatch):
    captures = []
    real_capture = graphsurgeon.emit.capture
    monkeypatch.setattr(graphsurgeon.emit, "capture", lambda plan: captures.append(plan) or real_capture(plan))
    adapter = Rendezvous()
    fast = optimize(tiny_float32, adapter=adapter, passes=["lhep", "sats"])

    adapter.barrier = threading.Barrier(2)
    trials = [in_two_threads(lambda seed: fast.generate(**kwargs(seed)))]
    assert len(captures) == 1  # both calls needed the same graph set: one captured it, the other waited
    adapter.barrier = None
    sequential = {seed: fast.generate(**kwargs(seed)) for seed in SEEDS}
    assert not outputs_equal(sequential[1], sequential[2])  # mixing the calls up would show
    adapter.barrier = threading.Barrier(2)
    trials += [in_two_threads(lambda seed: fast.generate(**kwargs(seed))) for _ in range(2)]

    for results in trials:
        for seed in SEEDS:
            assert outputs_equal(results[seed], sequential[seed]), f"seed {seed}"
            assert same_stats(results[seed].stats, sequential[seed].stats), f"seed {seed}"
    assert any(same_stats(fast.stats, trials[-1][seed].stats) for seed in SEEDS)  # the last call to complete
    assert len(captures) == 1


def test_baseline_generate_in_two_threads(tiny_float32, monkeypatch):
    adapter = get_adapter("infinity")
    sequential = {seed: adapter.generate(tiny_float32, **kwargs(seed)) for seed in SEEDS}
    barrier = threading.Barrier(2)
    real_enter = EagerScaleRunner.__enter__

    def enter_together(runner: EagerScaleRunner) -> EagerScaleRunner:
        barrier.wait(TIMEOUT_S)  # both calls start their scales at once (the KV caches are module state)
        return real_enter(runner)

    monkeypatch.setattr(EagerScaleRunner, "__enter__", enter_together)
    for _ in range(2):
        results = in_two_threads(lambda seed: adapter.generate(tiny_float32, **kwargs(seed)))
        for seed in SEEDS:
            assert outputs_equal(results[seed], sequential[seed]), f"seed {seed}"
            assert results[seed].stats is None  # the baseline reports no pass stats


def test_capture_beside_a_baseline_call_on_the_same_model(tiny_float32):
    """Capture switches KV caching on the same attention modules the baseline uses: it waits for the model's lock."""
    adapter = get_adapter("infinity")
    sequential = adapter.generate(tiny_float32, **kwargs(SEEDS[0]))
    started = threading.Event()
    real_enter = EagerScaleRunner.__enter__

    def call(seed: int):
        if seed == SEEDS[0]:
            return adapter.generate(tiny_float32, **kwargs(seed))
        started.wait(TIMEOUT_S)  # the baseline holds its caches by now
        return optimize(tiny_float32).capture(**kwargs(seed))

    def enter_and_signal(runner: EagerScaleRunner) -> EagerScaleRunner:
        entered = real_enter(runner)
        started.set()
        return entered

    EagerScaleRunner.__enter__ = enter_and_signal
    try:
        results = in_two_threads(call)
    finally:
        EagerScaleRunner.__enter__ = real_enter
    assert outputs_equal(results[SEEDS[0]], sequential)
    assert len(results[SEEDS[1]].scales) == len(SCHEDULE)
