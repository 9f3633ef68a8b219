"""The graph-set cache of an optimized model: bounded, least recently used first, evictions counted, safe with
threads, and a set in use survives its eviction."""
from __future__ import annotations

import random
import threading
import types

import pytest
import torch

import graphsurgeon.emit
from examples.toy_nsp.adapter import ToyAdapter
from examples.toy_nsp.model import build_toy
from graphsurgeon import ConfigError, optimize
from graphsurgeon.emit import DEFAULT_MAX_GRAPH_SETS

TIMEOUT_S = 120


@pytest.fixture(scope="module")
def toy():
    return build_toy(seed=0)


@pytest.fixture
def stub_capture(monkeypatch) -> list:
    """Capture replaced by an empty graph set (the cache's bookkeeping does not look inside): returns the plans
    captured, in order."""
    plans = []

    def fake(plan):
        plans.append(plan)
        return types.SimpleNamespace(scales=[], regions={}, plan=plan)

    monkeypatch.setattr(graphsurgeon.emit, "capture", fake)
    return plans


def labels(batch: int) -> torch.Tensor:
    return torch.zeros(batch, dtype=torch.long)


def cached_batches(fast) -> list[int]:
    """The batch sizes of the cached sets, least recently used first (the toy's key starts with the batch)."""
    return [key[0] for key in fast._sets]


def test_the_bound_is_checked_and_defaults_to_eight(toy):
    assert optimize(toy, adapter=ToyAdapter()).cache_info().max_size == DEFAULT_MAX_GRAPH_SETS == 8
    for bad in (0, -1, True, 2.5, "4"):
        with pytest.raises(ConfigError, match="max_graph_sets"):
            optimize(toy, adapter=ToyAdapter(), max_graph_sets=bad)


def test_least_recently_used_set_is_evicted_and_counted(toy, stub_capture):
    fast = optimize(toy, adapter=ToyAdapter(), max_graph_sets=3)
    calls = [1, 2, 3, 1, 4, 5, 1, 2, 2, 6]
    expected, hits, evictions = [], 0, 0  # an independent LRU: a list, most recent last
    for batch in calls:
        captured = fast.capture(labels=labels(batch))
        assert captured.plan.scales[0].inputs["tokens"].shape[0] == batch * 2  # the set of this key
        if batch in expected:
            expected.remove(batch)
            hits += 1
        elif len(expected) == 3:
            expected.pop(0)
            evictions += 1
        expected.append(batch)
        assert cached_batches(fast) == expected
    info = fast.cache_info()
    assert (info.hits, info.captures, info.evictions, info.size) == (hits, len(calls) - hits, evictions, 3)
    assert (hits, evictions) == (3, 4)
    assert len(stub_capture) == info.captures  # an evicted key is captured again when needed (batch 2)
    assert fast._current_set().captured.plan.scales[0].inputs["tokens"].shape[0] == 6 * 2 and fast.edits == []


def test_many_threads_keep_the_bound_and_the_counts(toy, stub_capture):
    fast = optimize(toy, adapter=ToyAdapter(), max_graph_sets=4)
    calls_per_thread, errors = 40, []

    def run(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(calls_per_thread):
                batch = rng.randint(1, 9)
                assert fast.capture(labels=labels(batch)).plan.scales[0].inputs["tokens"].shape[0] == 2 * batch
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert not errors and not any(thread.is_alive() for thread in threads)
    info = fast.cache_info()
    assert info.size == 4 and info.hits + info.captures == 8 * calls_per_thread
    assert info.captures - info.evictions == info.size and len(stub_capture) == info.captures
    assert len(set(cached_batches(fast))) == 4


class HeldAdapter(ToyAdapter):
    """Holds a batch-1 call after it took its graph runner, until released: another thread evicts its set then."""

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()

    def sample(self, model, args, scale_runner=None):
        if args.labels.numel() == 1 and scale_runner is not None:
            self.started.set()
            assert self.release.wait(TIMEOUT_S)
        return super().sample(model, args, scale_runner)


def test_a_set_in_use_stays_valid_when_another_thread_evicts_it(toy):
    adapter = HeldAdapter()
    fast = optimize(toy, adapter=adapter, max_graph_sets=1)
    kwargs = {"labels": torch.tensor([3]), "cfg": 2.5, "seed": 4}
    baseline = ToyAdapter().generate(toy, **kwargs)
    result = {}
    held = threading.Thread(target=lambda: result.update(out=fast.generate(**kwargs)))
    held.start()
    assert adapter.started.wait(TIMEOUT_S)
    other = fast.generate(labels=torch.tensor([1, 2]), cfg=2.5, seed=4)  # captures batch 2: batch 1's set goes
    info = fast.cache_info()
    assert (info.captures, info.evictions, cached_batches(fast)) == (2, 1, [2])
    adapter.release.set()
    held.join(TIMEOUT_S)
    out = result["out"]
    assert all(torch.equal(a, b) for a, b in zip(out.indices, baseline.indices)) and torch.equal(out.total, baseline.total)
    assert all(torch.equal(a, b) for a, b in zip(other.indices, ToyAdapter().generate(
        toy, labels=torch.tensor([1, 2]), cfg=2.5, seed=4).indices))
