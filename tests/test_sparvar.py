"""SparVAR: sparse self-attention over the KV cache at the late scales, on Infinity, VAR and the worked example.

The semantics tests record one attention node's inputs and output while the optimized model generates (the
scale graph runs under a recording ``torch.fx.Interpreter``) and rebuild the expected key mask independently:
sinks and clipped windows from the captured grids by explicit loops, the CS⁴A keys from attention probabilities
computed here from the recorded queries and keys.
"""
from __future__ import annotations

import struct

import pytest
import torch
import torch.fx
import torch.nn.functional as F

from examples.toy_nsp.adapter import ToyAdapter
from examples.toy_nsp.model import build_toy
from graphsurgeon import ConfigError, get_adapter, optimize
from graphsurgeon.meta import annotations
from model_adapters.infinity import get_scale_schedule
from passes.sparvar import SparVAR, SparVARConfig, window_allowed

from .helpers import generate_kwargs, outputs_equal

SCHEDULE = get_scale_schedule(1.0, "0.06M")  # 7 scales: 1, 2, 4, 6, 8, 12, 16; SparVAR on 4 (decision), 5, 6
GRIDS = [(h, w) for _, h, w in SCHEDULE]
NEUTRAL = {"key_fraction": 1.0, "sink_scales": 99, "local_windows": (99, 99)}
"""Every key attended: all scales are sinks (CSLA) and CS⁴A keeps every decision key plus windows over everything."""
LABELS = torch.tensor([3, 1, 7])


@pytest.fixture(scope="module")
def tiny(tiny_float32):
    return tiny_float32


@pytest.fixture(scope="module")
def var():
    adapter = get_adapter("var")
    model = adapter.build_model("var-tiny", device="cpu", seed=0)
    return adapter, model, adapter.benchmark_args(model, batch_size=3, seed=1)["vae"]


@pytest.fixture(scope="module")
def toy():
    return build_toy(seed=0)


def infinity_kwargs(**extra) -> dict:
    return generate_kwargs(SCHEDULE, **extra)


def var_kwargs(vae) -> dict:
    return {"vae": vae, "labels": LABELS, "cfg": 4.0, "top_k": 900, "top_p": 0.95, "seed": 11}


def toy_kwargs() -> dict:
    return {"labels": LABELS, "cfg": 2.5, "seed": 5}


def same_codes(a, b) -> bool:
    """VAR and the worked example: the drawn indices of every scale (and the example's final sum) match."""
    return all(torch.equal(x, y) for x, y in zip(a.indices, b.indices)) and all(
        torch.equal(getattr(a, name), getattr(b, name)) for name in ("f_hat", "total") if hasattr(a, name))


class Recorder(torch.fx.Interpreter):
    """Runs a scale graph node by node, keeping the arguments and result of the nodes ``keep`` selects."""

    def __init__(self, module: torch.fx.GraphModule, keep):
        super().__init__(module)
        self.keep, self.seen = keep, {}

    def run_node(self, node: torch.fx.Node):
        result = super().run_node(node)
        if self.keep(node):
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            self.seen[node.name] = (args, kwargs, result)
        return result


def record(graph, keep) -> list[dict]:
    """From now on ``graph`` (a ScaleGraph) runs under a Recorder; one dict of recorded nodes per call."""
    module = graph.module
    order = [n.target for n in module.graph.nodes if n.op == "placeholder"]
    calls = []

    def forward(**values):
        recorder = Recorder(module, keep)
        result = recorder.run(*[values[name] for name in order])
        calls.append(recorder.seen)
        return result

    module.forward = forward
    return calls


def attention_or_sparvar(node: torch.fx.Node) -> bool:
    return node.target is F.scaled_dot_product_attention or annotations(node).get("pass") in ("sparvar", "lhep")


def attention_calls(seen: dict) -> list[tuple]:
    """(query, key, value, mask, scale, output) of each recorded attention, in layer order."""
    found = []
    for name, (args, kwargs, result) in seen.items():
        if name.startswith("scaled_dot_product_attention"):
            q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")][len(args):])[:3]
            found.append((q, k, v, kwargs.get("attn_mask"), kwargs.get("scale"), result))
    return found


def f32(value: float) -> float:
    """``value`` rounded to float32. A double holds a float32 quotient, or the product of a float32 and a small
    integer, closely enough (quotient) or exactly (product) that this one rounding gives float32's result."""
    return struct.unpack("f", struct.pack("f", value))[0]


def centre(coordinate: int, extent: int, key_extent: int) -> int:
    """The window centre of the implementation peers.md cites (Lvar's ``basic_sparvar.py`` mask), in plain
    Python: ``round(coordinate / extent * key_extent)`` in float32 arithmetic, ties to even (Python's round)."""
    return round(f32(f32(coordinate / extent) * key_extent))


def expected_windows(grids, scale: int, radius: list, positions, prefix: int = 0) -> torch.Tensor:
    """(queries, L) bool, built by loops: per key scale s, radius[s] is None (not attended), "all", or r (the
    (2r+1)^2 keys around :func:`centre` of the query's position on s's grid, clipped at the border)."""
    height, width = grids[scale]
    length = prefix + sum(h * w for h, w in grids[:scale + 1])
    allowed = torch.zeros(len(positions), length, dtype=torch.bool)
    allowed[:, :prefix] = True
    for i, position in enumerate(positions):
        y, x = divmod(int(position), width)
        start = prefix
        for s, (h, w) in enumerate(grids[:scale + 1]):
            r = radius[s]
            if r == "all":
                allowed[i, start:start + h * w] = True
            elif r is not None:
                cy, cx = centre(y, height, h), centre(x, width, w)
                for row in range(max(0, cy - r), min(h - 1, cy + r) + 1):
                    allowed[i, start + row * w + max(0, cx - r):start + row * w + min(w - 1, cx + r) + 1] = True
            start += h * w
    return allowed


def test_windows_are_centred_by_rounding_as_the_cited_implementation():
    """The 1024 px schedule's CSLA windows (sinks 0-4; windows 1, 1, 3, 5, 7 on 24², 32², 40², 48², 64²) against
    the loops above: every 3rd query of the 40² scale, every 11th of the 64² one. Rounding moves 44-68 % of the queries'
    centres by a cell against flooring on these grids, so a floor would fail here."""
    grids = [(h, w) for _, h, w in get_scale_schedule(1.0, "1M")]
    assert [h for h, _ in grids] == [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64]
    sinks, none = [1 << 30] * 5, [-1] * 3
    for scale, radii, positions in [(10, sinks + none + [0, 0, 1], torch.arange(0, 1600, 3)),
                                    (12, sinks + none + [0, 0, 1, 2, 3], torch.arange(0, 4096, 11))]:
        key_ids = torch.arange(sum(h * w for h, w in grids[:scale + 1]))[None]
        allowed = window_allowed(positions[None], key_ids, tuple(grids), 0, scale, tuple(radii))[0]
        loops = ["all" if r == 1 << 30 else None if r < 0 else r for r in radii]
        assert torch.equal(allowed, expected_windows(grids, scale, loops, positions.tolist()))
    for height, key_height, shifted in [(64, 24, 0.684), (64, 48, 0.609), (48, 32, 0.556), (40, 24, 0.64)]:
        y, x = torch.meshgrid(torch.arange(height), torch.arange(height), indexing="ij")
        moved = [centre(int(a), height, key_height) != int(a) * key_height // height
                 or centre(int(b), height, key_height) != int(b) * key_height // height
                 for a, b in zip(y.flatten(), x.flatten())]
        assert sum(moved) / len(moved) == pytest.approx(shifted, abs=1e-3)


def additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


def check_output(q, k, v, scale, allowed, result) -> None:
    """The node's output is dense attention under ``allowed``: the same op on the expected mask (bit for bit),
    and a plain softmax written out (float tolerance)."""
    assert torch.equal(result, F.scaled_dot_product_attention(q, k, v, attn_mask=additive(allowed), scale=scale))
    weights = ((q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
               + additive(allowed)).softmax(-1)
    torch.testing.assert_close(result, weights @ v, rtol=1e-4, atol=1e-5)


# -- configuration and preconditions ----------------------------------------------------------------------
@pytest.mark.parametrize("settings, needle", [
    ({"window": (3,)}, "window"),
    ({"key_fraction": 0.0}, "key_fraction"),
    ({"key_fraction": 1.5}, "key_fraction"),
    ({"windows": (1, 4)}, "odd"),
    ({"local_windows": (0, 9)}, "odd"),
    ({"sink_scales": 0}, "sink_scales"),
])
def test_bad_settings_are_refused_before_any_work(tiny, settings, needle):
    with pytest.raises(ConfigError, match=needle):
        optimize(tiny, passes=["sparvar"], config={"sparvar": settings})


@pytest.mark.parametrize("settings, needle", [
    ({"scales": (0, 5)}, "cannot act on scale 0"),
    ({"decision_scale": 2}, "decision_scale=2 is not one of the SparVAR scales"),
    ({"last": 4}, r"local window at scales \[4\]"),
    ({"scales": (9,)}, "outside the schedule"),
])
def test_preconditions_name_what_is_missing_and_edit_nothing(toy, settings, needle):
    captured = optimize(toy, adapter=ToyAdapter()).capture(**toy_kwargs())
    before = [s.module.code for s in captured.scales]
    with pytest.raises(ConfigError, match=needle):
        SparVAR(SparVARConfig(**settings))(captured)
    assert [s.module.code for s in captured.scales] == before


def test_a_scale_without_attention_nodes_is_refused(toy):
    captured = optimize(toy, adapter=ToyAdapter()).capture(**toy_kwargs())

    def attention(q, k, v, **kwargs):  # the same computation, but not the op SparVAR masks
        return F.scaled_dot_product_attention(q, k, v, **kwargs)

    for node in captured.scales[5].module.graph.nodes:
        if node.target is F.scaled_dot_product_attention:
            node.target = attention
    with pytest.raises(ConfigError, match="scale 5 has no scaled_dot_product_attention"):
        SparVAR(SparVARConfig())(captured)


# -- exactness --------------------------------------------------------------------------------------------
def test_neutral_settings_are_bit_identical_on_infinity(tiny):
    baseline = get_adapter("infinity").generate(tiny, **infinity_kwargs())
    for passes, config in [(["sparvar"], {"sparvar": NEUTRAL}), (["sparvar"], {"sparvar": {"scales": ()}}),
                           (["lhep", "sats", "sparvar"], {"lhep": {"rho": 1.0}, "sats": {"delta": 0.0},
                                                          "sparvar": NEUTRAL})]:
        fast = optimize(tiny, passes=passes, config=config)
        assert outputs_equal(fast.generate(**infinity_kwargs()), baseline), (passes, config)
    entries = [s for s in fast.stats["sparvar"] if s["patterns"]]
    assert [s["scale"] for s in entries] == [4, 5, 6] and all(s["entries_vs_dense"] == 1.0 for s in entries)


def test_neutral_settings_are_bit_identical_on_var_and_the_worked_example(var, toy):
    adapter, model, vae = var
    both = {"lhep": {"rho": 1.0}, "sats": {"delta": 0.0}, "sparvar": NEUTRAL}
    baseline = adapter.generate(model, **var_kwargs(vae))
    for passes, config in [(["sparvar"], {"sparvar": NEUTRAL}), (["lhep", "sats", "sparvar"], both)]:
        assert same_codes(optimize(model, adapter="var", passes=passes, config=config).generate(**var_kwargs(vae)),
                          baseline)
    baseline = ToyAdapter().generate(toy, **toy_kwargs())
    for passes, config in [(["sparvar"], {"sparvar": NEUTRAL}), (["lhep", "sats", "sparvar"], both)]:
        assert same_codes(optimize(toy, adapter=ToyAdapter(), passes=passes, config=config).generate(**toy_kwargs()),
                          baseline)


# -- semantics --------------------------------------------------------------------------------------------
def test_csla_and_cs4a_masks_recomputed_independently_on_cfg_rows(tiny):
    """Infinity, 3 prompts with CFG (6 rows); query groups of 12 (the 8x8 decision scale has 6 groups, which
    straddle its rows, the last one short) and 2 sink scales (with 5, the sinks would hold every decision key
    on this 7-scale schedule and the recorded keys would not matter)."""
    fast = optimize(tiny, passes=["sparvar"], config={"sparvar": {"query_group": 12, "sink_scales": 2}})
    captured = fast.capture(**infinity_kwargs())
    decision_calls, late_calls = record(captured.scales[4], attention_or_sparvar), record(captured.scales[6],
                                                                                          attention_or_sparvar)
    out = fast.generate(**infinity_kwargs())
    assert all(torch.isfinite(logits).all() for logits in out.logits)
    decision, late = decision_calls[0], late_calls[0]
    layers = attention_calls(late)
    assert len(layers) == 4  # bound_layer round(10 * 3 / 31) = 1: layers 0, 1 CS⁴A, layers 2, 3 CSLA

    # CSLA (layer 3, the 16x16 scale): sinks = scales 0, 1; windows 1, 1, 3, 5 on 4x4 ... 12x12, own window 7
    q, k, v, mask, scale, result = layers[3]
    local = expected_windows(GRIDS, 6, ["all"] * 2 + [0, 0, 1, 2, 3], range(256))
    assert mask.shape[-2:] == (256, 521) and torch.equal(mask.isfinite().expand(6, 1, 256, 521),
                                                         local.expand(6, 1, 256, 521))
    own = local[:, -256:].sum(dim=1).reshape(16, 16)
    assert own[0, 0] == 16 and own[15, 15] == 16 and own[0, 8] == 28 and own[8, 8] == 49  # clipped at the border
    check_output(q, k, v, scale, local, result)

    # CS⁴A decision (layer 0, the 8x8 scale, 121 keys): per (row, head, group of 12) the top 24 keys by mass
    q, k, _, mask, scale, _ = attention_calls(decision)[0]
    assert mask is None  # dense at the decision scale
    chosen = next(r for name, (_, _, r) in decision.items() if name.startswith("decision_keys"))
    assert chosen.shape == (6, 2, 6, round(0.2 * 121))
    probabilities = ((q @ k.transpose(-1, -2)) * scale).softmax(-1)  # (6, 2, 64, 121)
    mass = torch.stack([probabilities[:, :, g * 12:(g + 1) * 12].sum(dim=2) for g in range(6)], dim=2)
    selected = torch.zeros_like(mass, dtype=torch.bool).scatter(-1, chosen, True)
    assert (selected.sum(-1) == 24).all()  # 24 distinct keys
    lowest_kept = mass.masked_fill(~selected, float("inf")).amin(-1)
    highest_dropped = mass.masked_fill(selected, float("-inf")).amax(-1)
    assert (lowest_kept >= highest_dropped - 1e-6).all()  # ... the highest-mass ones, per row, head and group

    # CS⁴A reuse (layer 0, the 16x16 scale): sinks + the decision group's keys + local windows 7 (12x12), 9 (16x16)
    q, k, v, mask, scale, result = layers[0]
    windows = expected_windows(GRIDS, 6, ["all"] * 2 + [None] * 3 + [3, 4], range(256))
    y, x = torch.arange(256) // 16, torch.arange(256) % 16
    group = ((y * 8 // 16) * 8 + x * 8 // 16) // 12  # the query's position on the 8x8 grid, its group of 12
    reused = torch.zeros(6, 2, 256, 521, dtype=torch.bool)
    reused[..., :121] = selected[:, :, group]
    allowed = reused | windows
    assert mask.shape == (6, 2, 256, 521) and torch.equal(mask.isfinite(), allowed)
    check_output(q, k, v, scale, allowed, result)
    stats = {s["scale"]: s for s in fast.stats["sparvar"]}
    assert stats[6]["patterns"] == ["cs4a", "cs4a", "csla", "csla"]
    assert stats[6]["attention_entries"][0] == int(allowed.sum())  # over rows and heads
    assert stats[6]["attention_entries"][3] == 6 * 2 * int(local.sum())
    assert stats[6]["attention_entries_dense"] == [6 * 2 * 256 * 521] * 4


def test_csla_on_an_odd_grid_and_a_condition_prefix(var, toy):
    """VAR's 13x13 scale (windows 1, 1, 3, 5 on its 6x6, 8x8, 10x10, 13x13 history) and the worked example,
    whose two prefilled condition tokens precede the scales in the cache and are always attended."""
    _adapter, model, vae = var
    fast = optimize(model, adapter="var", passes=["sparvar"])
    calls = record(fast.capture(**var_kwargs(vae)).scales[8], attention_or_sparvar)
    fast.generate(**var_kwargs(vae))
    pns = model.patch_nums
    grids = [(p, p) for p in pns]
    q, k, v, mask, scale, result = attention_calls(calls[0])[1]  # depth 2: layer 0 CS⁴A, layer 1 CSLA
    allowed = expected_windows(grids, 8, ["all"] * 5 + [0, 0, 1, 2], range(169))
    assert torch.equal(mask.isfinite().expand(6, 1, 169, allowed.shape[1]), allowed.expand(6, 1, -1, -1))
    assert allowed[0, -169:].sum() == 9 and allowed[12 * 13 + 6, -169:].sum() == 15  # corner, bottom edge
    check_output(q, k, v, scale, allowed, result)

    fast = optimize(toy, adapter=ToyAdapter(), passes=["sparvar"])
    calls = record(fast.capture(**toy_kwargs()).scales[6], attention_or_sparvar)
    fast.generate(**toy_kwargs())
    q, k, v, mask, scale, result = attention_calls(calls[0])[1]
    grids = [(g, g) for g in toy.config.grids]
    allowed = expected_windows(grids, 6, ["all"] * 5 + [2, 3], range(169), prefix=2)
    assert mask.shape[-1] == 2 + sum(g * g for g in toy.config.grids)
    assert torch.equal(mask.isfinite().expand(6, 1, 169, -1), allowed.expand(6, 1, -1, -1))
    check_output(q, k, v, scale, allowed, result)


# -- defaults and composition -----------------------------------------------------------------------------
def test_defaults_compute_fewer_attention_entries_on_all_three_models(tiny, var, toy):
    _adapter, model, vae = var
    runs = [(optimize(tiny, passes=["sparvar"]), infinity_kwargs(), lambda out: out.logits),
            (optimize(model, adapter="var", passes=["sparvar"]), var_kwargs(vae), lambda out: [out.f_hat]),
            (optimize(toy, adapter=ToyAdapter(), passes=["sparvar"]), toy_kwargs(), lambda out: [out.total])]
    for fast, kwargs, values in runs:
        assert all(torch.isfinite(value).all() for value in values(fast.generate(**kwargs)))
        late = [s["entries_vs_dense"] for s in fast.stats["sparvar"]][-2:]
        assert all(ratio < 0.8 for ratio in late), late


def test_lhep_sats_sparvar_compose_on_gathered_positions(tiny):
    """With LHEP's kept tokens the CSLA window is placed at each kept token's own grid position (LHEP's gather
    index), added to LHEP's mask; SATS's guard runs first; the outputs stay finite."""
    fast = optimize(tiny, passes=["lhep", "sats", "sparvar"], config={"sats": {"delta": 10.0}})
    calls = record(fast.capture(**infinity_kwargs()).scales[6], attention_or_sparvar)
    out = fast.generate(**infinity_kwargs())
    assert all(torch.isfinite(logits).all() for logits in out.logits)
    assert fast.stats["sats"][-1]["rows"] == 3  # every unconditional row stopped: the masks follow the running rows
    seen = calls[0]
    index, valid = next(args[1:3] for name, (args, _, _) in seen.items() if name.startswith("gather_tokens"))
    q, k, v, mask, scale, result = attention_calls(seen)[3]  # CSLA
    rows, width = index.shape
    earlier = sum(h * w for h, w in GRIDS[:4])  # scales 0-3: never pruned, sinks
    assert mask.shape == (rows, 1, width, k.shape[-2])
    finite = mask.isfinite()[:, 0]
    for row in range(rows):
        kept = valid[row].nonzero().flatten()
        assert finite[row][kept][:, :earlier].all()
        y, x = index[row] // 16, index[row] % 16
        near = ((y[:, None] - y[None, :]).abs() <= 3) & ((x[:, None] - x[None, :]).abs() <= 3)  # own window 7
        assert torch.equal(finite[row][kept][:, -width:], (near & valid[row][None, :])[kept])
    check_output(q, k, v, scale, finite[:, None], result)
    assert all(s["entries_vs_dense"] < 1 for s in fast.stats["sparvar"][-2:])


def test_sparvar_listed_first_still_runs_after_the_passes_that_mask_attention(tiny):
    from graphsurgeon.passes import order_passes, resolve_passes

    assert [p.name for p in order_passes(resolve_passes(["sparvar", "lhep", "sats"]))] == ["sats", "lhep", "sparvar"]
    neutral = {"sparvar": {"key_fraction": 1.0, "sink_scales": 99, "local_windows": (99, 99)},
               "lhep": {"rho": 1.0}, "sats": {"delta": 0.0}}
    baseline = get_adapter("infinity").generate(tiny, **infinity_kwargs())
    out = optimize(tiny, passes=["sparvar", "lhep", "sats"], config=neutral).generate(**infinity_kwargs())
    assert all(torch.equal(a, b) for a, b in zip(out.bits, baseline.bits))
