"""Side by side with the official FoundationVision/VAR code, same random weights: the official
``autoregressive_infer_cfg`` and this sampler give bit-identical indices, guided logits, f_hat and images, and
the unchanged official classes run under this sampler's ``scale_step`` / ``residual_step`` give the same.

The official code is not in this repository. Set ``GRAPHSURGEON_OFFICIAL_VAR`` to a checkout of it to run these
tests (numpy must be installed; ``huggingface_hub`` is stubbed when absent); without it they skip.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import sys
import types

import pytest
import torch

from model_adapters.var import build_var, build_var_vqvae, decode, generate

CHECKOUT = os.environ.get("GRAPHSURGEON_OFFICIAL_VAR")
pytestmark = pytest.mark.skipif(
    not CHECKOUT or importlib.util.find_spec("numpy") is None,
    reason="set GRAPHSURGEON_OFFICIAL_VAR to a FoundationVision/VAR checkout (and install numpy)")

SMALL = dict(depth=2, embed_dim=64, num_heads=2, num_classes=10, patch_nums=(1, 2, 3, 4, 6), vocab_size=512, Cvae=8)
RELEASED_SCHEDULE = dict(depth=2, embed_dim=128, num_heads=2, num_classes=10)


@pytest.fixture(scope="module")
def official():
    """The official ``models.var`` and ``models.vqvae`` modules, imported from the checkout. Their top-level names
    (``models``, ``dist``) are removed from ``sys.modules`` again afterwards; the classes keep their globals."""
    names = ("models", "models.var", "models.vqvae", "models.basic_var", "models.basic_vae", "models.quant",
             "models.helpers", "dist", "huggingface_hub")
    saved = {name: sys.modules.get(name) for name in names}
    if importlib.util.find_spec("huggingface_hub") is None:
        hub = types.ModuleType("huggingface_hub")
        hub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = hub
    sys.path.insert(0, CHECKOUT)
    try:
        var_module, vqvae_module = importlib.import_module("models.var"), importlib.import_module("models.vqvae")
    finally:
        sys.path.remove(CHECKOUT)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return var_module, vqvae_module


def build_pair(official, config: dict, seed: int):
    var_module, vqvae_module = official
    ours = build_var(config, seed=seed)
    our_vae = build_var_vqvae(seed=seed + 1, V=ours.V, Cvae=ours.Cvae, ch=32, patch_nums=ours.patch_nums)
    their_vae = vqvae_module.VQVAE(vocab_size=ours.V, z_channels=ours.Cvae, ch=32, test_mode=True, share_quant_resi=4,
                                   v_patch_nums=ours.patch_nums)
    with contextlib.redirect_stdout(io.StringIO()):  # the official constructor prints its configuration
        theirs = var_module.VAR(their_vae, num_classes=ours.num_classes, depth=ours.depth, embed_dim=ours.C,
                                num_heads=ours.num_heads, drop_path_rate=0.1 * ours.depth / 24, shared_aln=False,
                                attn_l2_norm=True, patch_nums=ours.patch_nums, flash_if_available=False,
                                fused_if_available=False)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    their_vae.load_state_dict(our_vae.state_dict(), strict=True)
    # as the official demo: eval mode, no gradients (F.linear takes another kernel for a weight that requires grad)
    theirs.eval().requires_grad_(False)
    return ours, our_vae, theirs, their_vae.eval()


@contextlib.contextmanager
def recorded(official, theirs):
    """Record the official run's guided logits, indices and final f_hat (from its sampling helper's arguments)."""
    var_module, _ = official
    record = {"logits": [], "indices": [], "f_hat": None}
    original_sample = var_module.sample_with_top_k_top_p_
    quant = theirs.vae_quant_proxy[0]
    original_next = quant.get_next_autoregressive_input

    def sample(logits_BlV, **kwargs):
        record["logits"].append(logits_BlV.clone())  # before the in-place top-k / top-p masking
        out = original_sample(logits_BlV, **kwargs)
        record["indices"].append(out[:, :, 0].clone())
        return out

    def next_input(si, SN, f_hat, h_BChw):
        f_hat, next_map = original_next(si, SN, f_hat, h_BChw)
        record["f_hat"] = f_hat.clone()
        return f_hat, next_map

    var_module.sample_with_top_k_top_p_ = sample
    quant.get_next_autoregressive_input = next_input
    try:
        yield record
    finally:
        var_module.sample_with_top_k_top_p_ = original_sample
        del quant.get_next_autoregressive_input


def equal_lists(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("config,labels,B,more_smooth", [
    (SMALL, [3, 0, 9], 3, False),
    (SMALL, None, 2, False),
    (SMALL, [1, 2], 2, True),
    (RELEASED_SCHEDULE, [4], 1, False),
], ids=["labels-B3", "random-labels-B2", "more-smooth", "released-schedule-B1"])
def test_bit_identical_to_official_sampler(official, config, labels, B, more_smooth):
    ours, our_vae, theirs, their_vae = build_pair(official, config, seed=11)
    with recorded(official, theirs) as record:
        image = theirs.autoregressive_infer_cfg(B=B, label_B=None if labels is None else torch.tensor(labels), g_seed=5,
                                                cfg=4.0, top_k=100, top_p=0.95, more_smooth=more_smooth)
    kwargs = dict(labels=labels, B=B, cfg=4.0, top_k=100, top_p=0.95, seed=5, more_smooth=more_smooth,
                  return_logits=True)
    for model, vae in ((ours, our_vae), (theirs, their_vae)):  # ours, and the official classes under our sampler
        out = generate(model, vae, **kwargs)
        assert equal_lists(out.indices, record["indices"])
        assert equal_lists(out.logits, record["logits"])
        assert torch.equal(out.f_hat, record["f_hat"])
    assert torch.equal(decode(our_vae, out.f_hat), image)


def test_vqvae_encoder_matches(official):
    _, vqvae_module = official
    our_vae = build_var_vqvae(seed=2, V=512, Cvae=8, ch=32, patch_nums=SMALL["patch_nums"])
    their_vae = vqvae_module.VQVAE(vocab_size=512, z_channels=8, ch=32, test_mode=True, share_quant_resi=4,
                                   v_patch_nums=SMALL["patch_nums"])
    their_vae.load_state_dict(our_vae.state_dict(), strict=True)
    image = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert equal_lists(our_vae.img_to_idxBl(image), their_vae.img_to_idxBl(image))


def test_the_unchanged_official_class_is_captured_and_optimized(official):
    """graphsurgeon captures the official VAR class as it is (its attention's KV cache attributes become graph state)
    and runs it: no passes and LHEP + SATS at their neutral settings equal the official sampler; the defaults prune."""
    from graphsurgeon import optimize

    _, _, theirs, their_vae = build_pair(official, RELEASED_SCHEDULE, seed=11)
    with recorded(official, theirs) as record:
        theirs.autoregressive_infer_cfg(B=3, label_B=torch.tensor([4, 0, 7]), g_seed=5, cfg=4.0, top_k=100, top_p=0.95)
    kwargs = dict(vae=their_vae, labels=[4, 0, 7], cfg=4.0, top_k=100, top_p=0.95, seed=5)
    neutral = {"lhep": {"rho": 1.0}, "sats": {"delta": 0.0}}
    for fast in (optimize(theirs, adapter="var"), optimize(theirs, adapter="var", passes=["lhep", "sats"], config=neutral)):
        out = fast.generate(**kwargs)
        assert equal_lists(out.indices, record["indices"]) and torch.equal(out.f_hat, record["f_hat"])
    pruned = optimize(theirs, adapter="var", passes=["lhep", "sats"])
    pruned.generate(**kwargs)
    assert all(s["work_vs_baseline"] < 1 for s in pruned.stats["summary"][-3:])
