"""scaleskip: the last scales computed not at all, the accumulated latent left as the last computed scale made it."""
from __future__ import annotations

import pytest
import torch

from examples.toy_nsp.adapter import ToyAdapter
from examples.toy_nsp.model import build_toy
from graphsurgeon import ConfigError, get_adapter, optimize
from graphsurgeon.runner import GraphRunner
from model_adapters.infinity import build_infinity, get_scale_schedule

from .helpers import generate_kwargs, outputs_equal


def record(run) -> dict:
    """Per scale, the state the scale graph returned and the accumulated latent its residual step returned."""
    seen, scale, residual = {}, GraphRunner.scale, GraphRunner.residual

    def on_scale(self, index, inputs):
        outputs = scale(self, index, inputs)
        seen[("state", index)] = {k: v.shape for k, v in self.state.items()}
        seen[("logits", index)] = outputs["logits"]
        return outputs

    def on_residual(self, index, inputs):
        outputs = residual(self, index, inputs)
        graph = self.captured.residual[index]
        seen[("latent", index)] = outputs[graph.accumulated]
        return outputs

    GraphRunner.scale, GraphRunner.residual = on_scale, on_residual
    try:
        run()
    finally:
        GraphRunner.scale, GraphRunner.residual = scale, residual
    return seen


def test_infinity_skip_equals_stopping_early_bit_for_bit():
    model = build_infinity("infinity-tiny", seed=0)
    kwargs = generate_kwargs(get_scale_schedule(1.0, "0.06M"), (5, 3))  # 7 scales
    adapter = get_adapter("infinity")
    fast = optimize(model, passes=["scaleskip"])
    seen = {}
    out = None

    def run():
        nonlocal out
        out = fast.generate(**kwargs)

    seen = record(run)
    stopped = adapter.generate(model, **{**kwargs, "num_scales": 5})
    assert torch.equal(out.summed_codes, stopped.summed_codes)
    assert all(torch.equal(a, b) for a, b in zip(out.bits[:5], stopped.bits))
    for k in (5, 6):
        graph = fast.graph_modules()[k].graph
        assert {n.op for n in graph.nodes} == {"placeholder", "call_function", "output"}
        assert [n.name for n in graph.nodes if n.op == "call_function"] == ["skipped_logits"]
        assert bool((seen[("logits", k)] == 0).all()) and seen[("state", k)] == seen[("state", 4)]
    assert [e["skipped"] for e in fast.stats["scaleskip"]] == [False] * 5 + [True] * 2
    assert [e["token_rows"] for e in fast.stats["summary"]][5:] == [0, 0]
    assert outputs_equal(optimize(model, passes=["scaleskip"], config={"scaleskip": {"last": 0}}).generate(**kwargs),
                         adapter.generate(model, **kwargs))


@pytest.mark.parametrize("which", ["var", "toy"])
def test_the_latent_is_the_last_computed_scales(which):
    if which == "var":
        adapter = get_adapter("var")
        model = adapter.build_model("var-tiny", device="cpu", seed=0)
        kwargs = {**adapter.benchmark_args(model, batch_size=2, seed=1), "seed": 3}
        latent = lambda out: out.f_hat  # noqa: E731
    else:
        adapter, model = ToyAdapter(), build_toy(seed=0)
        kwargs = {"labels": torch.tensor([1, 3]), "cfg": 2.5, "seed": 5}
        latent = lambda out: out.total  # noqa: E731
    fast = optimize(model, adapter=adapter, passes=["scaleskip"], config={"scaleskip": {"last": 3}})
    outputs = []
    seen = record(lambda: outputs.append(fast.generate(**kwargs)))
    n = len(fast.stats["scaleskip"])
    assert torch.equal(latent(outputs[0]), seen[("latent", n - 4)])
    assert not torch.equal(seen[("latent", n - 4)], seen[("latent", n - 5)])  # the latent did move until then


def test_it_runs_after_the_others_and_refuses_scales_they_rewrote():
    model = build_infinity("infinity-tiny", seed=0)
    kwargs = generate_kwargs(get_scale_schedule(1.0, "0.06M"), (5, 3))
    with pytest.raises(ConfigError, match=r"skips scale 4, which \['lhep'\] rewrote"):
        optimize(model, passes=["scaleskip", "lhep"], config={"scaleskip": {"last": 3}}).generate(**kwargs)
    both = optimize(model, passes=["scaleskip", "fastvar"])  # FastVAR's release: prune 3, 4 of 7, skip 5, 6
    out = both.generate(**kwargs)
    assert [p for p in both.edits][-1]["pass"] == "scaleskip"
    alone = optimize(model, passes=["fastvar"]).generate(**{**kwargs, "num_scales": 5})
    assert torch.equal(out.summed_codes, alone.summed_codes)
    with pytest.raises(ConfigError, match="would skip every one"):
        optimize(model, passes=["scaleskip"], config={"scaleskip": {"last": 7}}).generate(**kwargs)
