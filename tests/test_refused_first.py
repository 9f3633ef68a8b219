"""Every bad input is refused before any pipeline or model is built, with one line and status 2 (issue 18, items 3,
4, 5 and 12): settings, devices, dtypes, seeds, pass sets, adapter references, files; and the command line's
shared options (--version, the lists in --help, the hidden aliases, --checkpoint for bench and compare)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import graphsurgeon.cli as cli
from graphsurgeon import ConfigError
from graphsurgeon.cli import main
from graphsurgeon.passes import available_passes, resolve_passes
from model_adapters.infinity import InfinityAdapter, build_infinity
from model_adapters.infinity.schedules import PIXEL_PRESETS
from model_adapters.var.adapter import VARAdapter
from model_adapters.var.vqvae import build_var_vqvae

TINY = ["--config", "infinity-tiny", "--pn", "0.06M"]
FAST = ["--repeats", "1", "--warmup", "0", "--no-flops"]


def _refuse(*_, **__):
    raise AssertionError("work started although the input was bad")


@pytest.fixture
def nothing_built(monkeypatch):
    """Fail the test if a pipeline, a model with weights, a capture or a benchmark starts."""
    build = InfinityAdapter.build_model

    def meta_only(self, config, device="meta", **kwargs):
        if device != "meta":
            _refuse()
        return build(self, config, device=device, **kwargs)

    monkeypatch.setattr(InfinityAdapter, "build_model", meta_only)
    monkeypatch.setattr(VARAdapter, "build_model", _refuse)
    for adapter in (InfinityAdapter, VARAdapter):
        monkeypatch.setattr(adapter, "image_pipeline", _refuse)
    monkeypatch.setattr(cli, "capture", _refuse)
    monkeypatch.setattr("graphsurgeon.api.optimize", _refuse)
    monkeypatch.setattr("graphsurgeon.bench.run_benchmark", _refuse)


def one_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def generate(tmp_path, *args: str) -> list[str]:
    return ["generate", *TINY, "--prompt", "a cat", *args, "--out", str(tmp_path / "out")]


@pytest.mark.usefixtures("nothing_built")
@pytest.mark.parametrize("args, needle", [
    (["--pn", "7M"], "--pn '7M' is not a pixel preset of adapter 'infinity'"),
    (["--cfg", "nan"], "--cfg: expected a finite number, got nan"),
    (["--cfg", "inf"], "--cfg: expected a finite number, got inf"),
    (["--cfg", "1e300"], "cfg must be within [-1000, 1000]"),
    (["--dtype", "bfloat16"], "--dtype bfloat16 on the CPU: adapter 'infinity' runs float32 there"),
    (["--dtype", "float16"], "--dtype float16 on the CPU"),
    (["--device", "foo"], "--device 'foo' is not a torch device"),
    (["--device", "meta"], "--device meta: graphsurgeon runs models on cpu or cuda"),
    pytest.param(["--device", "cuda"], "CUDA is not available", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has CUDA")),
    (["--seed", str(2 ** 70)], "--seed 1180591620717411303424"),
    (["--seed", str(2 ** 64 - 1), "--prompt", "a dog"], "the seeds of 2 image(s)"),
    (["--prompt", ""], "prompt(s) [1] are empty"),
    (["--prompt", "   "], "are empty"),
    (["--passes", "lhep,skipvar"], "passes 'lhep' and 'skipvar' cannot be combined"),
    (["--passes", "depthvar,sats"], "passes 'depthvar' and 'sats' cannot be combined"),
    (["--passes", "depthvar,skipvar"], "cannot be combined"),
    (["--passes", "lhep,lhep"], "pass(es) ['lhep'] listed twice"),
    (["--passes", "lhep", "--pass-config", '{"lhep": {"scales": [5, 5]}}'], "scale(s) [5] listed twice"),
    (["--passes", "depthvar", "--pass-config", '{"depthvar": {"reference_scale": 0}}'],
     "depthvar.reference_scale: Value error, reference_scale 0 is the one-token first scale"),
    (["--passes", "skipvar", "--pass-config", '{"skipvar": {"skip_below": [NaN, 0.1, 0.05]}}'],
     "skipvar.skip_below.0: Input should be a finite number"),
    (["--adapter", "os:system"], "adapter 'os:system' is a builtin_function_or_method, not a subclass"),
    (["--adapter", "os:abort"], "not a subclass of graphsurgeon.ModelAdapter"),
])
def test_generate_refuses_before_building(tmp_path, capsys, args, needle):
    assert needle in one_line(capsys, generate(tmp_path, *args))
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("nothing_built")
def test_prompts_that_are_not_utf8(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("un caf\u00e9\n".encode("latin-1"))
    err = one_line(capsys, ["generate", *TINY, "--prompts", str(prompts), "--out", str(tmp_path / "out")])
    assert f"--prompts {prompts}: not UTF-8 text (byte 0xe9 at offset 6)" in err


@pytest.mark.usefixtures("nothing_built")
@pytest.mark.parametrize("command", [
    ["export", *TINY, "--passes", "{pair}", "--out", "{tmp}/export"],
    ["diff", *TINY, "--passes", "{pair}", "--out", "{tmp}/d.html"],
    ["bench", *TINY, *FAST, "--pass-sets", "none,{plus}", "--out", "{tmp}/bench"],
    ["compare", *TINY, *FAST, "--methods", "{plus}", "--out", "{tmp}/compare"],
])
@pytest.mark.parametrize("pair", ["lhep,skipvar", "depthvar,sats", "skipvar,depthvar"])
def test_every_command_refuses_incompatible_passes(tmp_path, capsys, command, pair):
    argv = [a.format(pair=pair, plus=pair.replace(",", "+"), tmp=tmp_path) for a in command]
    assert "cannot be combined" in one_line(capsys, argv)


@pytest.mark.usefixtures("nothing_built")
@pytest.mark.parametrize("argv, needle", [
    (["bench", *TINY, *FAST, "--pass-sets", "lhep+lhep"], "pass set(s) ['lhep+lhep'] list a pass twice"),
    (["compare", *TINY, *FAST, "--methods", "lhep+lhep"], "pass set(s) ['lhep+lhep'] list a pass twice"),
    (["bench", *TINY, *FAST, "--pn", "7M"], "--pn '7M' is not a pixel preset"),
    (["diff", *TINY[:2], "--pn", "7M", "--out", "{tmp}/d.html"], "--pn '7M' is not a pixel preset"),
    (["bench", *TINY, *FAST, "--device", "meta"], "--device meta"),
    (["compare", *TINY, *FAST, "--device", "foo"], "--device 'foo'"),
    (["bench", *TINY, *FAST, "--seed", str(2 ** 70)], "seed: Input should be less than"),
    (["check", *TINY, "--batch-size", "100000"], "--batch-size: expected at most 256"),
    (["bench", *TINY, *FAST, "--batch", "100000"], "--batch: expected at most 256"),
])
def test_bench_compare_diff_check_refuse_before_building(tmp_path, capsys, argv, needle):
    assert needle in one_line(capsys, [a.format(tmp=tmp_path) for a in argv])


def test_composition_is_declared_on_the_pass_classes():
    """Refusals come from ``cannot_run_beside`` against what other passes provide or do, at resolution."""
    from graphsurgeon.passes import _REGISTRY

    available_passes()
    assert _REGISTRY["skipvar"].cannot_run_beside == ("per_scale_outputs",)
    assert _REGISTRY["depthvar"].cannot_run_beside == ("row_selection",)
    for name in ("lhep", "stepvar", "sparvar"):
        with pytest.raises(ConfigError, match=f"passes 'skipvar' and '{name}' cannot be combined"):
            resolve_passes(["skipvar", name])
    resolve_passes(["skipvar", "fastvar"])  # FastVAR adds outputs at its cache scale only: composes


@pytest.mark.parametrize("config, needle", [
    ({"skipvar": {"cond_only_below": [0.3, 0.2, float("inf")]}}, "skipvar.cond_only_below.2: Input should be a finite number"),
    ({"lhep": {"rho": float("nan")}}, "lhep.rho: Input should be a finite number"),
])
def test_nan_and_inf_settings_are_refused(config, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        resolve_passes(list(config), config)


def test_skipvar_rules_file_with_nan_is_refused(tmp_path):
    rule = dict(mean=[0.0, 0.0], scale=[1.0, 1.0], coef=[[1.0, float("nan")]], intercept=[0.0], classes=[0, 1])
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"skip": rule, "cond_only": dict(rule, coef=[[1.0, 1.0]])}))  # writes NaN
    with pytest.raises(ConfigError, match="coefficients file .*rules.json': skip.coef.0.1: Input should be a finite"):
        resolve_passes(["skipvar"], {"skipvar": {"coefficients": str(path)}})


def test_one_scale_named_twice_is_refused_once_the_schedule_is_known():
    from graphsurgeon.passes import resolve_scales

    with pytest.raises(ConfigError, match=r"lhep.scales \[5, -2\] name one scale of the schedule's 7 twice"):
        resolve_scales((5, -2), 3, 7, "lhep")


def test_depthvar_reference_scale_resolving_to_the_first_scale():
    from passes.depthvar import DepthVAR, DepthVARConfig

    with pytest.raises(ConfigError, match="depthvar.reference_scale=-7 is the one-token first scale"):
        DepthVAR(DepthVARConfig(reference_scale=-7)).reference(7)


def test_version_and_the_lists_in_the_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "graphsurgeon 0.1.0"
    for command in ("generate", "bench", "compare", "export", "diff"):
        assert main([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert f"infinity: {', '.join(PIXEL_PRESETS)}" in text and "var: one schedule per model" in text
        assert ", ".join(available_passes()) in text
        assert "--method-config" not in text and "--batch " not in text  # hidden aliases


def test_every_option_has_help():
    parser = cli._parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


@pytest.mark.usefixtures("nothing_built")
def test_aliases_are_still_accepted(tmp_path, capsys):
    """--batch and --method-config (the older spellings) still work: they reach the same checks."""
    err = one_line(capsys, ["compare", *TINY, *FAST, "--batch", "2", "--method-config", '{"sats": {}}',
                            "--methods", "lhep", "--out", str(tmp_path / "c")])
    assert "settings for passes that are not enabled: ['sats']" in err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "infinity-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in build_infinity("infinity-tiny", seed=3).state_dict().items()}, path)
    return path


def test_bench_and_compare_load_a_checkpoint(tmp_path, capsys, monkeypatch, tiny_checkpoint):
    import model_adapters.infinity.pipeline as pipeline

    loaded = []
    load = pipeline.load_infinity
    monkeypatch.setattr(pipeline, "load_infinity", lambda *a, **k: loaded.append(a[0]) or load(*a, **k))
    out = tmp_path / "bench"
    assert main(["bench", *TINY, *FAST, "--no-inserted-timing", "--checkpoint", str(tiny_checkpoint),
                 "--pass-sets", "lhep", "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["spec"]["checkpoint"] == str(tiny_checkpoint)
    out = tmp_path / "compare"
    assert main(["compare", *TINY, *FAST, "--checkpoint", str(tiny_checkpoint), "--methods", "lhep",
                 "--out", str(out)]) == 0
    assert loaded == [tiny_checkpoint, tiny_checkpoint]
    assert "Loaded weights" in out.with_suffix(".md").read_text()


@pytest.mark.usefixtures("nothing_built")
def test_bench_refuses_a_checkpoint_that_does_not_fit_before_building(tmp_path, capsys, tiny_checkpoint):
    err = one_line(capsys, ["bench", "--adapter", "var", "--config", "var-tiny", *FAST, "--checkpoint",
                            str(tiny_checkpoint), "--out", str(tmp_path / "b")])
    assert f"--checkpoint: checkpoint {tiny_checkpoint} does not fit the VAR config" in err
    assert "needs --config" in one_line(capsys, ["bench", *FAST, "--checkpoint", str(tiny_checkpoint),
                                                 "--out", str(tmp_path / "b")])


@pytest.fixture(scope="module")
def var_vae_state():
    vae = build_var_vqvae(seed=0, V=4096, Cvae=32, ch=160, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    return {k: v.contiguous() for k, v in vae.state_dict().items()}


@pytest.mark.usefixtures("nothing_built")
@pytest.mark.parametrize("kind, needle", [
    ("legacy", "legacy (non-zip) pickle format, refused because loading it needs unpickling"),
    ("empty", "is empty"),
    ("missing_key", "does not fit the VQVAE arguments"),
    ("device", "is not a regular file"),
])
def test_var_vae_is_checked_before_building(tmp_path, capsys, var_vae_state, kind, needle):
    path = tmp_path / "vae.pth"
    if kind == "legacy":
        torch.save(var_vae_state, path, _use_new_zipfile_serialization=False)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "missing_key":
        path = tmp_path / "vae.safetensors"
        save_file({k: v for k, v in list(var_vae_state.items())[1:]}, path)
    else:
        path = "/dev/zero"
    err = one_line(capsys, ["generate", "--adapter", "var", "--prompt", "3", "--vae", str(path),
                            "--out", str(tmp_path / "out")])
    assert err.startswith("graphsurgeon: error: --vae: ") and needle in err
