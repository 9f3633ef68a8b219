"""SkipVAR: features from pictures around the decision scale, a per-sample rule, then skipped scales (rows halted,
latent held) or conditional-only scales, every sample on its own.

The features are recomputed here independently (Sobel by loops over pixels, the spectrum by explicit DFT matrices);
execution is checked against the decisions the stats record: a skipping sample's latent is the one after its last
computed scale, a conditional-only sample's guidance is its conditional row's logits, and on VAR each sample alone
(teacher-forced) decides and computes what it did in its batch.
"""
from __future__ import annotations

import json
import math
import pickle

import pytest
import torch

from examples.toy_nsp.adapter import ToyAdapter
from examples.toy_nsp.model import build_toy
from graphsurgeon import ConfigError, get_adapter, optimize
from graphsurgeon.runner import GraphRunner
from passes.skipvar import LinearRule, decision_features, high_frequency_ratio, sobel_magnitude, threshold_rule

LABELS = torch.tensor([1, 3, 7])
NEVER = {"skip_below": (-1.0, -1.0, -1.0), "cond_only_below": (-1.0, -1.0, -1.0)}


# -- the features, independently ---------------------------------------------------------------------------
def reference_sobel(picture: torch.Tensor) -> torch.Tensor:
    grey = picture.double().mean(dim=0)
    height, width = grey.shape
    padded = torch.zeros(height + 2, width + 2, dtype=torch.float64)
    padded[1:-1, 1:-1] = grey
    out = torch.zeros(height, width, dtype=torch.float64)
    kx = [[1, 0, -1], [2, 0, -2], [1, 0, -1]]
    for y in range(height):
        for x in range(width):
            gx = sum(kx[i][j] * padded[y + i, x + j] for i in range(3) for j in range(3))
            gy = sum(kx[j][i] * padded[y + i, x + j] for i in range(3) for j in range(3))
            out[y, x] = math.sqrt(gx ** 2 + gy ** 2)
    return out


def reference_ratio(picture: torch.Tensor, fraction: float = 0.4) -> float:
    grey = picture.double().mean(dim=0)
    height, width = grey.shape

    def dft(n):
        k = torch.arange(n, dtype=torch.float64)
        return torch.exp(-2j * math.pi * k[:, None] * k[None, :] / n)

    spectrum = (dft(height) @ grey.to(torch.complex128) @ dft(width)).abs()
    spectrum = torch.roll(spectrum, shifts=(height // 2, width // 2), dims=(0, 1))  # centred
    radius = int(fraction * min(height, width) / 2)
    total = outside = 0.0
    for y in range(height):
        for x in range(width):
            total += spectrum[y, x].item()
            if math.hypot(y - height // 2, x - width // 2) > radius:
                outside += spectrum[y, x].item()
    return outside / (total + 1e-6)


def test_features_match_loops_and_explicit_transforms_on_random_flat_and_odd_pictures():
    generator = torch.Generator().manual_seed(0)
    new = torch.rand(3, 3, 9, 11, generator=generator) * 2 - 1
    old = new + 0.1 * torch.randn(3, 3, 9, 11, generator=generator)
    new[1] = 0.25  # flat: no change against itself, all amplitude at DC
    old[1] = 0.25
    for b in range(3):
        assert torch.allclose(sobel_magnitude(new[b:b + 1])[0, 0].double(), reference_sobel(new[b]), atol=1e-5)
        assert high_frequency_ratio(new[b:b + 1]).item() == pytest.approx(reference_ratio(new[b]), abs=1e-5)
    features = decision_features(new, old)
    change = [(reference_sobel(new[b]) - reference_sobel(old[b])).abs().mean().item() for b in range(3)]
    assert features[:, 0].tolist() == pytest.approx(change, abs=1e-5)
    assert features[1].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    skip, cond_only = threshold_rule(features, (0.2, 0.1, 0.05), (0.9, 0.2, 0.1))
    assert skip[1] == 3 and cond_only[1] == 0  # a flat picture that did not change: skip the last 3


def test_linear_rules_are_standardised_linear_classifiers():
    multi = LinearRule(mean=(1.0, 2.0), scale=(2.0, 4.0), coef=((1.0, 0.0), (0.0, 1.0), (-1.0, -1.0)),
                       intercept=(0.0, 0.5, 0.0), classes=(0, 2, 3))
    features = torch.tensor([[5.0, 2.0], [1.0, 6.0], [-3.0, -6.0]])
    assert multi.predict(features).tolist() == [0, 2, 3]
    binary = LinearRule(mean=(0.0, 0.0), scale=(1.0, 1.0), coef=((1.0, -1.0),), intercept=(0.0,), classes=(0, 1))
    assert binary.predict(features).tolist() == [1, 0, 1]


# -- the worked example and VAR, against the recorded decisions ---------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    return build_toy(seed=0)


def toy_kwargs(**overrides):
    return {"labels": LABELS, "cfg": 2.5, "seed": 5, **overrides}


def record(run):
    """Per scale, the raw logits and running rows of the scale graphs, and the residual steps' latents."""
    seen, scale, residual = {}, GraphRunner.scale, GraphRunner.residual

    def on_scale(self, index, inputs):
        outputs = scale(self, index, inputs)
        seen[("raw", index)] = outputs["logits"]
        seen[("rows", index)] = outputs.get("skipvar_active_rows")
        return outputs

    def on_residual(self, index, inputs):
        outputs = residual(self, index, inputs)
        seen[("latent", index)] = outputs[self.captured.residual[index].accumulated]
        return outputs

    GraphRunner.scale, GraphRunner.residual = on_scale, on_residual
    try:
        result = run()
    finally:
        GraphRunner.scale, GraphRunner.residual = scale, residual
    return result, seen


def between(values: list[float]) -> float:
    """A threshold between the smallest value and the rest."""
    ordered = sorted(values)
    return (ordered[0] + ordered[1]) / 2


def test_decisions_are_carried_out_per_sample_on_the_example(toy):
    first = optimize(toy, adapter=ToyAdapter(), passes=["skipvar"], config={"skipvar": NEVER})
    first.generate(**toy_kwargs())
    features = next(e for e in first.stats["skipvar"] if "features" in e)["features"]
    relative = [f[2] for f in features]
    # the sample of smallest change skips the last scale; the others run conditional-only for the last two
    rules = {"skip_below": (between(relative), -1.0, -1.0), "cond_only_below": (10.0, 10.0, -1.0)}
    fast = optimize(toy, adapter=ToyAdapter(), passes=["skipvar"], config={"skipvar": rules})
    out, seen = record(lambda: fast.generate(**toy_kwargs()))
    stats = fast.stats["skipvar"]
    decision = next(e for e in stats if "features" in e)
    assert decision["scale"] == 3 and decision["features_from"] == "latent" and decision["features"] == features
    skip, cond_only = decision["skip"], decision["cond_only"]
    skipper = relative.index(min(relative))
    assert skip == [int(b == skipper) for b in range(3)] and cond_only == [2 * int(b != skipper) for b in range(3)]
    n = 7
    for b in range(3):
        for k in range(n - 3, n):
            halted, cond = k >= n - skip[b], k >= n - cond_only[b]
            rows = seen[("rows", k)].tolist()
            assert (b in rows) == (not halted) and (b + 3 in rows) == (not halted and not cond)
            if not halted and cond:  # guidance of a conditional-only sample: its conditional logits
                assert torch.equal(out.logits[k][b], seen[("raw", k)][rows.index(b)])
            if halted:
                assert bool((out.logits[k][b] == 0).all())
        last = n - 1 - skip[b]  # the latent after the last scale the sample computed
        assert torch.equal(out.total[b], seen[("latent", last)][b])
    assert [e["rows"] for e in stats][4:] == [len(seen[("rows", k)]) for k in range(4, 7)]


def test_neutral_rules_are_bit_identical_and_a_sample_alone_decides_as_in_its_batch(toy):
    baseline = ToyAdapter().generate(toy, **toy_kwargs())
    same = optimize(toy, adapter=ToyAdapter(), passes=["skipvar"], config={"skipvar": NEVER}).generate(**toy_kwargs())
    assert all(torch.equal(a, b) for a, b in zip(same.logits, baseline.logits)) and torch.equal(same.total, baseline.total)

    adapter = get_adapter("var")
    model = adapter.build_model("var-tiny", device="cpu", seed=0)
    vae = adapter.benchmark_args(model, batch_size=3, seed=1)["vae"]
    kwargs = {"vae": vae, "labels": LABELS, "cfg": 4.0, "top_k": 900, "top_p": 0.95, "seed": 11, "return_logits": True}
    base = adapter.generate(model, **kwargs)
    neutral = optimize(model, adapter="var", passes=["skipvar"], config={"skipvar": NEVER}).generate(**kwargs)
    assert all(torch.equal(a, b) for a, b in zip(neutral.logits, base.logits)) and torch.equal(neutral.f_hat, base.f_hat)
    probe = optimize(model, adapter="var", passes=["skipvar"], config={"skipvar": NEVER})
    probe.generate(**kwargs)
    features = next(e for e in probe.stats["skipvar"] if "features" in e)["features"]
    relative = [f[2] for f in features]
    rules = {"skip_below": (between(relative), -1.0, -1.0), "cond_only_below": (10.0, 10.0, -1.0)}
    together_fast = optimize(model, adapter="var", passes=["skipvar"], config={"skipvar": rules})
    together = together_fast.generate(**kwargs)
    decision = next(e for e in together_fast.stats["skipvar"] if "features" in e)
    assert decision["features_from"] == "images" and sorted(decision["skip"]) == [0, 0, 1]
    for row in range(3):  # alone, teacher-forced to the batch's indices: same features, decision and logits
        alone_fast = optimize(model, adapter="var", passes=["skipvar"], config={"skipvar": rules})
        alone = alone_fast.generate(**{**kwargs, "labels": LABELS[row:row + 1],
                                       "force_indices": [i[row:row + 1] for i in together.indices]})
        mine = next(e for e in alone_fast.stats["skipvar"] if "features" in e)
        assert mine["skip"] == [decision["skip"][row]] and mine["cond_only"] == [decision["cond_only"][row]]
        assert mine["features"][0] == pytest.approx(decision["features"][row], rel=1e-5)
        for ours, ref in zip(alone.logits, together.logits):
            if bool((ref[row] == 0).all()):  # a skipped scale of this sample: zeros in both
                assert bool((ours[0] == 0).all())
            else:
                assert ((ours[0] - ref[row]).norm() / ref[row].norm()).item() < 1e-4
        assert ((alone.f_hat[0] - together.f_hat[row]).norm() / together.f_hat[row].norm()).item() < 1e-5


def test_every_sample_skipping_runs_no_graph_and_equals_stopping_early():
    adapter = get_adapter("infinity")
    model = adapter.build_model("infinity-tiny", device="cpu", seed=0)
    kwargs = adapter.benchmark_args(model, batch_size=2, pn="0.06M")
    fast = optimize(model, passes=["skipvar"], config={"skipvar": {"skip_below": (10.0, 10.0, 10.0)}})
    ran = []
    for index in (4, 5, 6):  # the graphs of the skipped scales must not run (no graph is made for zero rows)
        fast.capture(**kwargs).scales[index].module.register_forward_pre_hook(lambda *_, i=index: ran.append(i))
    out = fast.generate(**kwargs)
    assert [e["rows"] for e in fast.stats["skipvar"]] == [4, 4, 4, 4, 0, 0, 0] and not ran
    assert torch.equal(out.summed_codes, adapter.generate(model, **{**kwargs, "num_scales": 4}).summed_codes)
    assert [e["token_rows"] for e in fast.stats["summary"]][4:] == [0, 0, 0]


# -- the rules file and refusals --------------------------------------------------------------------------------
def test_a_rules_file_replaces_the_thresholds_and_pickles_are_refused(toy, tmp_path):
    rule = {"mean": [0.0, 0.0], "scale": [1.0, 1.0], "coef": [[0.0, 0.0]], "intercept": [1.0], "classes": [0, 2]}
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"skip": rule, "cond_only": rule}))  # always class 2: skip the last 2 scales
    fast = optimize(toy, adapter=ToyAdapter(), passes=["skipvar"], config={"skipvar": {"coefficients": str(path)}})
    fast.generate(**toy_kwargs())
    assert next(e for e in fast.stats["skipvar"] if "features" in e)["skip"] == [2, 2, 2]
    pickled = tmp_path / "skip_model.pkl"
    pickled.write_bytes(pickle.dumps({"skip": rule}))
    for bad, needle in ((pickled, "not a JSON object"), (tmp_path / "missing.json", "does not exist")):
        with pytest.raises(ConfigError, match=needle):
            optimize(toy, adapter=ToyAdapter(), passes=["skipvar"], config={"skipvar": {"coefficients": str(bad)}})
    path.write_text(json.dumps({"skip": rule}))
    with pytest.raises(ConfigError, match="cond_only"):
        optimize(toy, adapter=ToyAdapter(), passes=["skipvar"], config={"skipvar": {"coefficients": str(path)}})


@pytest.mark.parametrize("passes, config, needle", [
    (["skipvar", "sats"], {}, "both provide 'row_selection'"),
    (["skipvar"], {"skipvar": {"decision_scale": -1}}, "must have a scale before it and one after it"),
    (["skipvar"], {"skipvar": {"skip_below": (0.1, 0.2, 0.0)}}, "must not increase"),
    (["skipvar", "depthvar"], {}, "row guard"),
    (["lhep", "skipvar"], {}, "passes 'lhep' and 'skipvar' cannot be combined: 'skipvar' cannot run beside "
                              "'per_scale_outputs'"),
])
def test_refusals(toy, passes, config, needle):
    with pytest.raises(ConfigError, match=needle):
        optimize(toy, adapter=ToyAdapter(), passes=passes, config=config).generate(**toy_kwargs())
    with pytest.raises(ConfigError, match="classifier-free guidance"):
        optimize(toy, adapter=ToyAdapter(), passes=["skipvar"]).generate(**toy_kwargs(cfg=1.0))


def test_with_the_pipelines_decoder_the_features_come_from_pictures():
    from graphsurgeon.images import ImageSources, SamplingSettings

    adapter = get_adapter("infinity")
    pipeline = adapter.image_pipeline(ImageSources(config="infinity-tiny", seed=0))
    kwargs = pipeline.sampler_args("a cat", 3, SamplingSettings(pn="0.06M"))
    fast = optimize(pipeline.model, passes=["skipvar"], config={"skipvar": {"preview_scale": 2}})
    fast.generate(**kwargs)
    assert next(e for e in fast.stats["skipvar"] if "features" in e)["features_from"] == "latent"
    fast.decoder = pipeline.preview_decoder()  # what `graphsurgeon generate` sets
    fast.generate(**kwargs)
    decision = next(e for e in fast.stats["skipvar"] if "features" in e)
    assert decision["features_from"] == "images"
    summed = {}
    real = GraphRunner.residual

    def keep(self, index, inputs):
        outputs = real(self, index, inputs)
        summed[index] = outputs["summed_codes"]
        return outputs

    GraphRunner.residual = keep
    try:
        fast.generate(**kwargs)
    finally:
        GraphRunner.residual = real
    from passes.skipvar import resize_latent

    pictures = [pipeline.vae.decode(resize_latent(summed[k], (4, 4)).squeeze(-3)) for k in (3, 2)]  # scale 2: 4x4
    assert decision["features"][0] == pytest.approx(decision_features(*pictures)[0].tolist(), rel=1e-5)


def test_it_composes_with_fastvar():
    adapter = get_adapter("infinity")
    model = adapter.build_model("infinity-tiny", device="cpu", seed=0)
    kwargs = adapter.benchmark_args(model, batch_size=2, pn="0.06M")  # FastVAR: cache 2, pruned 3 and 4
    both = optimize(model, passes=["fastvar", "skipvar"], config={"skipvar": {"skip_below": (10.0, 10.0, 10.0)}})
    out = both.generate(**kwargs)
    alone = optimize(model, passes=["fastvar"]).generate(**{**kwargs, "num_scales": 4})
    assert torch.equal(out.summed_codes, alone.summed_codes)
    assert [e["kept_per_sublayer"] for e in both.stats["fastvar"]][3] == 22


def test_a_scale_without_guidance_reads_each_samples_own_conditional_row():
    adapter = get_adapter("infinity")
    model = adapter.build_model("infinity-tiny", device="cpu", seed=0)
    kwargs = {**adapter.benchmark_args(model, batch_size=2, pn="0.06M"), "cfg": [3.0] * 6 + [1.0], "return_logits": True}
    probe = optimize(model, passes=["skipvar"], config={"skipvar": NEVER})
    probe.generate(**kwargs)
    relative = [f[2] for f in next(e for e in probe.stats["skipvar"] if "features" in e)["features"]]
    fast = optimize(model, passes=["skipvar"], config={"skipvar": {**NEVER, "skip_below": (between(relative), -1.0, -1.0)}})
    out, seen = record(lambda: fast.generate(**kwargs))
    halted, running = relative.index(min(relative)), relative.index(max(relative))
    rows = seen[("rows", 6)].tolist()
    assert rows == [running, running + 2]  # one sample halted at the last scale: its rows are not the first ones
    assert torch.equal(out.logits[6][running], seen[("raw", 6)][0].mul(1 / kwargs["tau"]))
    assert bool((out.logits[6][halted] == 0).all())
