"""The baseline VAR sampler: determinism, teacher forcing, the CFG ramp, the per-scale regions, argument checks."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from graphsurgeon import InputError
from graphsurgeon.runner import model_lock
from model_adapters.var import (EagerRunner, build_var, build_var_vqvae, decode, generate, residual_step,
                                scale_step, validate_generate_args)
from model_adapters.var.sampler import filter_top_k_top_p

# small enough that one generation takes milliseconds: five scales, a 512-entry codebook of 8 channels
FAST = dict(depth=2, embed_dim=64, num_heads=2, num_classes=10, patch_nums=(1, 2, 3, 4, 6), vocab_size=512, Cvae=8)


@pytest.fixture(scope="module")
def fast():
    model = build_var(FAST, seed=0)
    vae = build_var_vqvae(seed=1, V=512, Cvae=8, ch=32, patch_nums=FAST["patch_nums"])
    return model, vae


@pytest.fixture(scope="module")
def tiny():
    """The named test preset with the released schedule and codebook size, and a narrow VQVAE."""
    model = build_var("var-tiny", seed=0)
    return model, build_var_vqvae(seed=1, ch=32)


def acquirable_from_another_thread(model, timeout: float) -> bool:
    """Whether another thread can take the model's eager-run lock within ``timeout`` (it releases it at once)."""
    got = []

    def attempt():
        lock = model_lock(model)
        got.append(lock.acquire(timeout=timeout))
        if got[0]:
            lock.release()

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join()
    return got[0]


def same(a, b) -> bool:
    return (all(torch.equal(x, y) for x, y in zip(a.indices, b.indices)) and len(a.indices) == len(b.indices)
            and torch.equal(a.f_hat, b.f_hat))


def reference_f_hat(vae, indices, patch_nums) -> torch.Tensor:
    """f_hat from indices, written the way the official quantizer's in-place loop does it."""
    B, Cvae, P, SN = indices[0].shape[0], vae.Cvae, patch_nums[-1], len(patch_nums)
    f_hat = torch.zeros(B, Cvae, P, P)
    for si, (idx, pn) in enumerate(zip(indices, patch_nums)):
        h = vae.quantize.embedding(idx).transpose(1, 2).reshape(B, Cvae, pn, pn)
        if si != SN - 1:
            h = F.interpolate(h, size=(P, P), mode="bicubic")
        f_hat.add_(vae.quantize.quant_resi[si / (SN - 1)](h))
    return f_hat


def test_same_seed_same_result_on_the_released_schedule(tiny):
    model, vae = tiny
    kwargs = dict(labels=[1, 7], cfg=4.0, top_k=900, top_p=0.95, seed=3, return_logits=True)
    a, b = generate(model, vae, **kwargs), generate(model, vae, **kwargs)
    assert same(a, b) and all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))
    assert [tuple(i.shape) for i in a.indices] == [(2, pn * pn) for pn in model.patch_nums]
    assert all(i.dtype == torch.int64 for i in a.indices) and a.f_hat.shape == (2, 32, 16, 16)
    assert [tuple(x.shape) for x in a.logits] == [(2, pn * pn, 4096) for pn in model.patch_nums]
    assert a.stats is None and generate(model, vae, labels=[1, 7], seed=3).logits is None
    assert not same(a, generate(model, vae, **dict(kwargs, seed=4)))
    # teacher forcing with the sampled indices reproduces the run; the draws still happen, so forcing only a
    # prefix leaves the later scales' random stream, and with it the whole result, unchanged
    for n in (len(a.indices), 4):
        forced = generate(model, vae, **dict(kwargs, force_indices=a.indices[:n]))
        assert same(forced, a) and all(torch.equal(x, y) for x, y in zip(forced.logits, a.logits))
    assert torch.equal(a.f_hat, reference_f_hat(vae, a.indices, model.patch_nums))
    image = decode(vae, a.f_hat[:1])
    assert image.shape == (1, 3, 256, 256) and 0 <= image.min() and image.max() <= 1


def test_forced_indices_are_used_and_returned(fast):
    model, vae = fast
    g = torch.Generator().manual_seed(0)
    force = [torch.randint(0, 512, (3, pn * pn), generator=g) for pn in model.patch_nums]
    out = generate(model, vae, labels=[0, 1, 2], seed=0, force_indices=force)
    assert all(torch.equal(x, y) for x, y in zip(out.indices, force))
    assert torch.equal(out.f_hat, reference_f_hat(vae, force, model.patch_nums))
    free = generate(model, vae, labels=[0, 1, 2], seed=0)
    assert not same(out, free)


def test_teacher_forcing_with_an_encoded_image(fast):
    model, vae = fast
    image = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        indices = vae.img_to_idxBl(image)
        reconstruction = vae.quantize.f_to_idxBl_or_fhat(vae.quant_conv(vae.encoder(image)), to_fhat=True)[-1]
    assert [tuple(i.shape) for i in indices] == [(2, pn * pn) for pn in model.patch_nums]
    out = generate(model, vae, labels=[1, 2], seed=0, force_indices=indices)
    torch.testing.assert_close(out.f_hat, reconstruction, rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="images must be 96 px square"):
        vae.img_to_idxBl(torch.zeros(1, 3, 64, 64))


def test_random_labels_and_label_forms(fast):
    model, vae = fast
    a = generate(model, vae, B=3, seed=5)
    assert same(a, generate(model, vae, B=3, seed=5))
    assert same(generate(model, vae, labels=4, B=2, seed=1), generate(model, vae, labels=torch.tensor([4, 4]), seed=1))
    unconditional = generate(model, vae, labels=[10, 10], seed=1)  # num_classes is the unconditional class
    assert same(generate(model, vae, labels=-1, B=2, seed=1), unconditional)
    assert same(generate(model, vae, labels=(2, 3), B=2, seed=1), generate(model, vae, labels=[2, 3], seed=1))


class RecordingRunner(EagerRunner):
    """The eager runner, recording what the loop hands to it."""

    def __init__(self, model, vae):
        super().__init__(model, vae)
        self.calls = []

    def scale(self, si, inputs):
        out = super().scale(si, inputs)
        self.calls.append(("scale", si, {k: v.clone() for k, v in inputs.items()}, out["logits"].clone()))
        return out

    def guide(self, si, logits, batch, rule):
        out = super().guide(si, logits, batch, rule)
        self.calls.append(("guide", si, batch, out))
        return out

    def residual(self, si, inputs):
        before = {k: v.clone() for k, v in inputs.items()}
        out = super().residual(si, inputs)
        assert all(torch.equal(before[k], inputs[k]) for k in inputs)  # the inputs were not written to
        self.calls.append(("residual", si, set(out)))
        return out


def test_runner_protocol_and_cfg_ramp(fast):
    model, vae = fast
    runner = RecordingRunner(model, vae)
    out = generate(model, vae, labels=[3, 4], cfg=2.5, seed=0, return_logits=True, runner=runner)
    N = len(model.patch_nums)
    assert [c[:2] for c in runner.calls] == [(kind, si) for si in range(N) for kind in ("scale", "guide", "residual")]
    for si in range(N):
        _, _, inputs, raw = runner.calls[3 * si]
        assert inputs["tokens"].shape == (4, model.patch_nums[si] ** 2, model.C) and inputs["cond_BD"].shape == (4, model.D)
        assert torch.equal(inputs["cond_BD"], model.class_emb(torch.tensor([3, 4, 10, 10])))
        t = 2.5 * (si / (N - 1))
        assert runner.calls[3 * si + 1][2] == 2
        assert torch.equal(out.logits[si], (1 + t) * raw[:2] - t * raw[2:])
        keys = runner.calls[3 * si + 2][2]
        assert keys == ({"residual", "f_hat", "codes"} if si == N - 1 else {"residual", "f_hat", "codes", "next_tokens"})
    assert torch.equal(out.logits[0], runner.calls[0][3][:2])  # the first scale is unguided
    assert all(b.attn.cached_k is None and not b.attn.caching for b in model.blocks)  # caches emptied on exit


def test_scale_and_residual_steps_alone(fast):
    model, vae = fast
    B, C, N = 2, model.C, len(model.patch_nums)
    tokens = torch.randn(2 * B, 4, C, generator=torch.Generator().manual_seed(0))
    cond = model.class_emb(torch.tensor([1, 2, 10, 10]))
    with EagerRunner(model, vae):
        model.blocks[0].attn.cached_k = None
        logits = scale_step(model, 1, {"tokens": tokens, "cond_BD": cond})["logits"]
        assert model.blocks[0].attn.cached_k.shape == (4, 2, 4, C // 2)  # the scale's keys went to the cache
    assert logits.shape == (4, 4, model.V)
    codes = torch.randn(B, model.Cvae, 2, 2)
    f_hat = torch.randn(B, model.Cvae, 6, 6)
    out = residual_step(model, vae, 1, N, {"codes": codes, "f_hat": f_hat})
    assert out["residual"] is codes and out["next_tokens"].shape == (2 * B, 9, C)
    assert torch.equal(out["next_tokens"][:B], out["next_tokens"][B:])  # the same tokens for both CFG halves
    expected = f_hat + vae.quantize.quant_resi[1 / (N - 1)](F.interpolate(codes, size=(6, 6), mode="bicubic"))
    assert torch.equal(out["f_hat"], expected)
    last = residual_step(model, vae, N - 1, N, {"codes": f_hat, "f_hat": f_hat})
    assert set(last) == {"residual", "f_hat"} and torch.equal(last["f_hat"], f_hat + vae.quantize.quant_resi[1.0](f_hat))


def test_eager_runs_of_one_model_are_serialised(fast):
    model, vae = fast
    with EagerRunner(model, vae):
        assert not acquirable_from_another_thread(model, 0.05)
    assert acquirable_from_another_thread(model, 1.0)
    other = build_var(FAST, device="meta")
    assert model_lock(other) is not model_lock(model) and model_lock(model) is model_lock(model)


def test_more_smooth_is_deterministic_and_soft(fast):
    model, vae = fast
    kwargs = dict(labels=[1, 2], cfg=3.0, top_k=100, seed=2, more_smooth=True)
    a, b = generate(model, vae, **kwargs), generate(model, vae, **kwargs)
    hard = generate(model, vae, **dict(kwargs, more_smooth=False))
    assert same(a, b)
    assert all(torch.equal(x, y) for x, y in zip(a.indices[:1], hard.indices[:1]))  # first draw precedes any noise
    assert not torch.equal(a.f_hat, hard.f_hat)


def test_top_k_top_p_filter():
    logits = torch.tensor([[[0.0, 3.0, 1.0, 2.0]]])
    assert torch.isinf(filter_top_k_top_p(logits, 1, 0.0)).tolist() == [[[True, False, True, True]]]
    assert torch.equal(filter_top_k_top_p(logits, 4, 0.0), logits) and torch.equal(filter_top_k_top_p(logits, 9, 0.0), logits)
    kept = ~torch.isinf(filter_top_k_top_p(logits, 0, 0.8))  # probabilities ~.03 .64 .09 .24: the top two make .88
    assert kept.tolist() == [[[False, True, False, True]]]
    assert (~torch.isinf(filter_top_k_top_p(logits, 0, 1e-6))).sum() == 1  # the most likely always stays


@pytest.mark.parametrize("kwargs,needle", [
    (dict(labels=[1], colour=1), r"unknown generate argument\(s\) \['colour'\]"),
    (dict(labels=[11]), "labels .* out of range"),
    (dict(labels=[-2, 1]), "labels .* out of range"),
    (dict(labels=12, B=2), "labels 12 is out of range"),
    (dict(labels=torch.tensor([1.0])), "labels must be an integer tensor"),
    (dict(labels=torch.tensor([[1]])), "labels must be 1-D"),
    (dict(labels="cat"), "labels must be None, an int"),
    (dict(labels=[]), "labels is empty"),
    (dict(labels=[1, 2], B=3), "B is 3 but labels has 2"),
    (dict(labels=None), "B is required"),
    (dict(B=0), "B must be a positive int"),
    (dict(labels=[1], cfg=float("nan")), "cfg must be a finite number"),
    (dict(labels=[1], cfg="2"), "cfg must be a finite number"),
    (dict(labels=[1], top_k=-1), "top_k must be an int >= 0"),
    (dict(labels=[1], top_k=1.5), "top_k must be an int >= 0"),
    (dict(labels=[1], top_p=1.5), r"top_p must be a number in \[0, 1\]"),
    (dict(labels=[1], seed=1.5), "seed must be None or an int"),
    (dict(labels=[1], seed=2 ** 64), "seed must be None or an int"),
    (dict(labels=[1], more_smooth="yes"), "more_smooth must be a bool"),
    (dict(labels=[1], return_logits=1), "return_logits must be a bool"),
    (dict(labels=[1], force_indices=torch.zeros(1, 1, dtype=torch.long)), "force_indices must be a list"),
    (dict(labels=[1], force_indices=[torch.zeros(1, 2, dtype=torch.long)]), r"force_indices\[0\] has shape \(1, 2\)"),
    (dict(labels=[1], force_indices=[torch.zeros(1, 1)]), r"force_indices\[0\] must be an integer tensor"),
    (dict(labels=[1], force_indices=[torch.full((1, 1), 512)]), r"force_indices\[0\] holds values outside"),
    (dict(labels=[1], force_indices=[torch.zeros(1, 1, dtype=torch.long)] * 6), "force_indices has 6 scales"),
    (dict(labels=[1], force_indices=[torch.zeros(1, 1, dtype=torch.long)], more_smooth=True), "more_smooth"),
])
def test_bad_arguments_are_named_before_any_work(fast, kwargs, needle):
    model, vae = fast
    with pytest.raises(InputError, match=needle):
        validate_generate_args(model, vae, **kwargs)
    if "colour" in kwargs:  # generate itself has no **kwargs: Python refuses the name
        return
    runner = RecordingRunner(model, vae)
    with pytest.raises(InputError, match=needle):
        generate(model, vae, runner=runner, **kwargs)
    assert runner.calls == [] and acquirable_from_another_thread(model, 1.0)


@pytest.mark.parametrize("vae_kwargs,needle", [
    (dict(V=512, Cvae=16), "Cvae 16"),
    (dict(V=1024, Cvae=8), "1024 entries"),
    (dict(V=512, Cvae=8, patch_nums=(1, 2, 3, 6)), "patch_nums"),
])
def test_vae_must_fit_the_model(fast, vae_kwargs, needle):
    model, _ = fast
    vae = build_var_vqvae(device="meta", ch=32, **dict(dict(patch_nums=FAST["patch_nums"]), **vae_kwargs))
    with pytest.raises(InputError, match=needle):
        generate(model, vae, labels=[1])
    fitting = build_var_vqvae(device="meta", ch=32, V=512, Cvae=8, patch_nums=FAST["patch_nums"])
    with pytest.raises(InputError, match="vae is on meta but the model is on cpu"):
        generate(model, fitting, labels=[1])
