"""Bad generation arguments: the optimized model rejects exactly what the baseline rejects, with the same clear
InputError, before it captures anything; bad ``optimize`` arguments are a ConfigError."""
from __future__ import annotations

import pytest
import torch

import graphsurgeon.emit
from graphsurgeon import ConfigError, InputError, get_adapter, optimize
from model_adapters.infinity import get_scale_schedule
from model_adapters.infinity.adapter import InfinityAdapter

from .helpers import generate_kwargs, random_text

SCHEDULE = get_scale_schedule(1.0, "0.06M")  # 7 scales
NAN, INF = float("nan"), float("inf")


def kwargs(**overrides) -> dict:
    return dict(generate_kwargs(SCHEDULE, (4, 6)), **overrides)


def without(name: str) -> dict:
    return {k: v for k, v in kwargs().items() if k != name}


BAD = [
    (kwargs(text=random_text([600], 256)), "a prompt has 600 tokens; the model's text_maxlen is 512"),
    (kwargs(text=(torch.zeros(0, 256), [], torch.zeros(1, dtype=torch.int32), 0)), "text has no prompts"),
    (kwargs(text=None), r"text must be a tuple \(kv_compact"),
    (kwargs(text=(torch.zeros(4, 256, dtype=torch.int64), [4], torch.tensor([0, 4], dtype=torch.int32), 4)),
     "text kv_compact must be a float tensor"),
    (kwargs(scale_schedule="0.06M"), "scale_schedule must be a list of"),
    (kwargs(scale_schedule=None), "scale_schedule must be a list of"),
    (kwargs(guidance=3.0), r"unknown generate argument\(s\) \['guidance'\]"),
    (without("text"), r"generate needs the argument\(s\) \['text'\]"),
    (kwargs(force_bits=[[[0, 1]]]), r"force_bits\[0\] must be a tensor"),
    (kwargs(force_bits=torch.zeros(2, 1, 1, 1, 32, dtype=torch.uint8)), "force_bits must be a list"),
    (kwargs(cfg=[3.0] * 8), "cfg has 8 values for 7 scales"),
    (kwargs(tau=[0.5] * 9), "tau has 9 values for 7 scales"),
    (kwargs(cfg=NAN), "cfg must be finite"),
    (kwargs(cfg=[3.0] * 6 + [INF]), "cfg must be finite"),
    (kwargs(tau=INF), "tau must be finite"),
    (kwargs(cfg="3"), "cfg must be a number"),
    (kwargs(seed="abc"), "seed must be None or an int"),
    (kwargs(seed=2 ** 70), "seed must be None or an int"),
    (kwargs(seed=True), "seed must be None or an int"),
    (kwargs(seed=1.5), "seed must be None or an int"),
    (kwargs(top_k=900.0), "top_k must be an int"),
    (kwargs(top_k=-1), "top_k must be an int >= 0"),
    (kwargs(top_p="0.9"), "top_p must be a number"),
    (kwargs(top_p=NAN), "top_p must be a number in"),
    (kwargs(num_scales=2.5), "num_scales must be an int"),
    (kwargs(return_logits="yes"), "return_logits must be a bool"),
]


@pytest.fixture
def no_capture(monkeypatch):
    def refuse(*args, **kw):
        raise AssertionError("captured before validating")

    monkeypatch.setattr(graphsurgeon.emit, "capture", refuse)
    monkeypatch.setattr(InfinityAdapter, "capture_plan", refuse)


@pytest.mark.parametrize("arguments,needle", BAD)
def test_rejected_before_capture_like_the_baseline(tiny_float32, no_capture, arguments, needle):
    with pytest.raises(InputError, match=needle):
        get_adapter("infinity").generate(tiny_float32, **arguments)
    fast = optimize(tiny_float32, passes=["lhep", "sats"])
    with pytest.raises(InputError, match=needle):
        fast.generate(**arguments)
    with pytest.raises(InputError, match=needle):
        fast.capture(**arguments)
    assert fast.cache_info().size == 0 and fast.cache_info().captures == 0  # nothing cached
    assert fast.stats == {}


def test_scale_runner_is_not_an_argument_of_the_optimized_model(tiny_float32, no_capture):
    with pytest.raises(InputError, match=r"unknown generate argument\(s\) \['scale_runner'\]"):
        optimize(tiny_float32).generate(**kwargs(scale_runner=object()))


def test_accepted_conversions(tiny_float32):
    """Text features in another float dtype are cast to the model's; a negative seed is torch's seed + 2**64."""
    adapter = get_adapter("infinity")
    kv, lens, cu, max_len = kwargs()["text"]
    reference = adapter.generate(tiny_float32, **kwargs(num_scales=2))
    as_float64 = adapter.generate(tiny_float32, **kwargs(text=(kv.double(), lens, cu, max_len), num_scales=2))
    assert torch.equal(as_float64.summed_codes, reference.summed_codes)
    assert adapter.validate(tiny_float32, **kwargs(text=(kv.half(), lens, cu, max_len))).kv.dtype == torch.float32
    negative = adapter.generate(tiny_float32, **kwargs(seed=-1, num_scales=2))
    wrapped = adapter.generate(tiny_float32, **kwargs(seed=2 ** 64 - 1, num_scales=2))
    assert torch.equal(negative.summed_codes, wrapped.summed_codes)


def test_passes_as_one_name_or_a_clear_config_error(tiny_float32):
    assert [p.name for p in optimize(tiny_float32, passes="lhep").passes] == ["lhep"]
    with pytest.raises(ConfigError, match=r"unknown pass\(es\) \['lhep,sats'\]"):
        optimize(tiny_float32, passes="lhep,sats")
    for bad in (["lhep", 3], None, {"lhep"}):
        with pytest.raises(ConfigError, match="passes must be a pass name or a list of pass names"):
            optimize(tiny_float32, passes=bad)
    with pytest.raises(ConfigError, match="config must be a dict"):
        optimize(tiny_float32, passes=["lhep"], config=[("lhep", {})])
