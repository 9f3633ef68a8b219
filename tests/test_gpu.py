"""On a CUDA machine: the benchmark's GPU path (CUDA events, bf16 under autocast, allocator peak) and the
passes' exactness on the GPU. Skipped where there is no GPU (CI never has one)."""
from __future__ import annotations

import pytest
import torch

from graphsurgeon import get_adapter, optimize
from graphsurgeon.bench import make_spec, run_benchmark

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_no_passes_and_keep_all_are_bit_identical_on_cuda():
    adapter = get_adapter("infinity")
    model = adapter.build_model("infinity-tiny", device="cuda", seed=0)
    kwargs = adapter.benchmark_args(model, batch_size=2, pn="0.25M")
    baseline = adapter.generate(model, **kwargs)
    config = {"lhep": {"keep_fraction": {-3: 1.0, -2: 1.0, -1: 1.0}}}
    for fast in (optimize(model, passes=[]), optimize(model, passes=["lhep"], config=config)):
        out = fast.generate(**kwargs)
        assert all(torch.equal(a, b) for a, b in zip(out.bits, baseline.bits))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_benchmark_runs_on_cuda(dtype):
    spec = make_spec(config="infinity-tiny", pn="0.25M", batch=2, dtype=dtype, device="cuda",
                     operating_point="paper", warmup=1, repeats=2)
    result = run_benchmark(spec, log=lambda *_: None)
    assert result["machine"]["gpu"] and result["machine"]["device"] == "cuda"
    for v in result["variants"].values():
        assert len(v["per_scale_ms"]) == 10 and all(ms > 0 for ms in v["per_scale_ms"])
        assert v["peak_memory_mib"] > 0
    assert result["variants"]["lhep+sats"]["flops"]["total"] < result["variants"]["baseline"]["flops"]["total"]
