"""Capture does not depend on how the official code imported flash-attn.

The official ``infinity/models/basic.py`` binds ``flash_attn_varlen_kvpacked_func`` from whatever ``flash_attn``
is importable when it is imported (the real kernels on a GPU machine, or a user's stand-in). The adapter must
route that bound name onto its custom op while capturing, and leave it alone otherwise. The first test runs on a
stand-in module written here (no checkout needed); the second on the official class, when
``GRAPHSURGEON_OFFICIAL_INFINITY`` points at a FoundationVision/Infinity checkout.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import textwrap
import types

import pytest
import torch

from graphsurgeon import get_adapter, optimize
from graphsurgeon.capture import capture
from model_adapters.infinity import build_infinity, get_scale_schedule
from model_adapters.infinity.kernels import packed_cross_attention_reference

from .helpers import outputs_equal, random_text

CHECKOUT = os.environ.get("GRAPHSURGEON_OFFICIAL_INFINITY")
SCHEDULE = get_scale_schedule(1.0, "0.06M")  # 7 scales
PACKED = "flash_attn_varlen_kvpacked_func"
OP = "graphsurgeon_infinity.packed_cross_attention.default"

# Imports the packed attention from flash_attn at import time and calls it with the official keywords, on the
# official layouts (compact q (B*Lq, H, c), kv (N, 2, H, c)), rounding float32 to bf16 as flash-attn needs.
BLOCKS_SOURCE = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from flash_attn import flash_attn_varlen_kvpacked_func


    class CrossAttention(torch.nn.Module):
        def __init__(self, reference):
            super().__init__()
            self.num_heads, self.head_dim, self.scale = reference.num_heads, reference.head_dim, reference.scale
            self.mat_q, self.mat_kv, self.proj = reference.mat_q, reference.mat_kv, reference.proj
            self.v_bias = reference.v_bias
            self.register_buffer("zero_k_bias", reference.zero_k_bias)

        def forward(self, q, ca_kv):
            kv, cu_seqlens_k, max_seqlen_k = ca_kv
            kv = F.linear(kv, self.mat_kv.weight, bias=torch.cat((self.zero_k_bias, self.v_bias)))
            kv = kv.view(kv.shape[0], 2, self.num_heads, self.head_dim)
            B, Lq = q.shape[:2]
            q = self.mat_q(q).view(-1, self.num_heads, self.head_dim)
            cu_seqlens_q = torch.arange(0, Lq * (B + 1), Lq, dtype=torch.int32, device=q.device)
            out = flash_attn_varlen_kvpacked_func(q=q.to(torch.bfloat16), kv=kv.to(torch.bfloat16),
                                                  cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                                  max_seqlen_q=Lq, max_seqlen_k=max_seqlen_k, dropout_p=0,
                                                  softmax_scale=self.scale)
            return self.proj(out.reshape(B, Lq, -1).float())
""")


@pytest.fixture
def user_flash_attn(monkeypatch) -> types.ModuleType:
    """A plain ``flash_attn`` in sys.modules (not the adapter's shim), restored after the test. Its packed
    attention is plain torch on the op's reference math (so eager and graphs can agree bit for bit) and, like
    flash-attn itself, it cannot be traced. ``calls`` counts its eager calls."""
    module = types.ModuleType("flash_attn")
    module.calls = 0

    def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                        softmax_scale=None):
        if any(isinstance(t, torch.fx.Proxy) for t in (q, kv, cu_seqlens_q, cu_seqlens_k)):
            raise AssertionError("the user's flash_attn was called on traced values")
        module.calls += 1
        heads, head_dim = q.shape[-2:]
        out = packed_cross_attention_reference(q.reshape(-1, max_seqlen_q, heads, head_dim), kv, cu_seqlens_k,
                                               max_seqlen_k, softmax_scale)
        return out.reshape(-1, heads, head_dim)

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None):
        raise AssertionError("unused at inference")

    module.flash_attn_varlen_kvpacked_func, module.flash_attn_func = flash_attn_varlen_kvpacked_func, flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return module


def _generate_kwargs() -> dict:
    return dict(text=random_text([5], 256), scale_schedule=SCHEDULE, cfg=3.0, tau=0.5, top_k=900, top_p=0.97, seed=5,
                return_logits=True)


def _check_capture_routes_to_op(model: torch.nn.Module, namespace: dict, user: types.ModuleType) -> None:
    """Graphs equal the eager run bit for bit, with the op in them; the user's function is back afterwards."""
    kwargs = _generate_kwargs()
    baseline = get_adapter("infinity").generate(model, **kwargs)
    assert user.calls > 0  # eager runs the function the module bound
    fast = optimize(model, adapter="infinity")
    assert outputs_equal(fast.generate(**kwargs), baseline)
    assert fast.capture_report.wrapped[OP] == len(SCHEDULE) * len(model.unregistered_blocks)
    assert namespace[PACKED] is user.flash_attn_varlen_kvpacked_func


def test_packed_attention_bound_at_import_is_captured_as_the_op(tmp_path, user_flash_attn):
    path = tmp_path / "official_like_blocks.py"
    path.write_text(BLOCKS_SOURCE)
    spec = importlib.util.spec_from_file_location("official_like_blocks", path)
    blocks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(blocks)  # binds the user's function, as the official basic.py does
    model = build_infinity("infinity-tiny", seed=0)
    for block in model.unregistered_blocks:
        block.ca = blocks.CrossAttention(block.ca)
    namespace = vars(blocks)
    _check_capture_routes_to_op(model, namespace, user_flash_attn)

    # A capture that fails still puts the bound function back; while it ran, traced calls took the op.
    seen = []

    def failing_step(m, inputs):
        seen.append(namespace[PACKED])
        raise RuntimeError("step failed")

    adapter = get_adapter("infinity")
    plan = adapter.capture_plan(model, adapter.validate(model, **_generate_kwargs()))
    plan.scales[1] = dataclasses.replace(plan.scales[1], step=failing_step)
    with pytest.raises(RuntimeError, match="step failed"):
        capture(plan)
    assert seen[0] is not user_flash_attn.flash_attn_varlen_kvpacked_func
    assert seen[0].__wrapped__ is user_flash_attn.flash_attn_varlen_kvpacked_func
    assert namespace[PACKED] is user_flash_attn.flash_attn_varlen_kvpacked_func


def _is_official(name: str) -> bool:
    return name == "infinity" or name.startswith("infinity.")


@pytest.fixture
def fresh_official_modules():
    """Import the official modules anew for one test, then put back the ones other tests imported."""
    saved = {name: module for name, module in sys.modules.items() if _is_official(name)}
    for name in saved:
        del sys.modules[name]
    yield
    for name in [name for name in sys.modules if _is_official(name)]:
        del sys.modules[name]
    sys.modules.update(saved)


@pytest.mark.skipif(not CHECKOUT or importlib.util.find_spec("numpy") is None,
                    reason="set GRAPHSURGEON_OFFICIAL_INFINITY to a FoundationVision/Infinity checkout "
                           "(and install numpy)")
def test_official_class_with_its_own_flash_attn(user_flash_attn, fresh_official_modules):
    from model_adapters.infinity.official import build_official_infinity

    official = build_official_infinity(CHECKOUT, "infinity-tiny", shim_flash_attn=False)
    official.load_state_dict(build_infinity("infinity-tiny", seed=0).state_dict(), strict=True)
    namespace = vars(sys.modules["infinity.models.basic"])
    assert namespace[PACKED] is user_flash_attn.flash_attn_varlen_kvpacked_func
    _check_capture_routes_to_op(official, namespace, user_flash_attn)
