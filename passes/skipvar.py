"""SkipVAR (arXiv 2506.08908; code fakerone-li/SkipVAR): a per-sample decision at one scale to skip the last scales or
to drop the unconditional branch for the last ones.

Behaviour of the released code (read at 607be0e; none copied), per sample here where the release assumes one:

1. at the decision scale d (the release: 9 of 13, i.e. -4), after its residual step, the accumulated latent after
   d and after d-1 are resized to the grid of scale ``preview_scale`` (the release: 4, 8x8, about 128 px once
   decoded; bilinear over the last two dimensions here) and decoded;
2. features: ``change`` = mean absolute difference of the two pictures' Sobel gradient magnitudes (grey = channel
   mean, 3x3 kernels, zero padding), ``ratio`` = the share of the new picture's Fourier amplitude outside the
   radius ``int(0.4 * min(H, W) / 2)`` of the centred spectrum;
3. a rule picks k in 0..3 (skip the last k scales); if k = 0, a second rule picks j in 0..3 (the last j scales run
   the conditional branch only; their guidance is the conditional logits). The release's rules are scikit-learn
   pickles (standardisation, then logistic regression) and are never loaded here: give their coefficients in a JSON
   file (``coefficients``, docs/pass_skipvar.md), or use the default threshold rule on the relative change
   ``change / mean Sobel magnitude of the new picture`` (k = how many of ``skip_below`` it is under) and on ``ratio``
   (j = how many of ``cond_only_below`` it is under).

Without a decoder for the call (``OptimizedModel.decoder`` or the adapter's ``preview_decoder``) the features are
computed on the resized latent itself (its channel mean as the grey picture) and the stats say so.

A skipped sample's rows stop running (the row guard also serving SATS, extended to halt both rows of a sample), its
accumulated latent is held (the residual steps keep its ``accumulated`` value), and it draws from zero logits (the draws
are returned with the sampler's per-scale outputs but never reach its latent); a conditional-only sample runs its conditional row alone. Every sample decides on its own, so a
sample's result in a batch equals its result alone.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
import torch.fx
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from graphsurgeon.errors import ConfigError
from graphsurgeon.meta import annotations
from graphsurgeon.passes import GraphEdit, GraphPass, PassConfig, register_pass
from graphsurgeon.rewrite import add_input, add_outputs, tag
from graphsurgeon.runner import GuidanceRule, PassRuntime
from passes.sats import guided_mix, insert_row_guard

PASS = "skipvar"
MAX_STEPS = 3
"""The release's classes: skip (or run conditional-only) the last 0 to 3 scales."""


class LinearRule(BaseModel):
    """A standardised linear classifier over (change, ratio): class = argmax(coef @ ((x - mean) / scale) + intercept)
    over ``classes`` (one row of coefficients: the binary form, the second class where the score is positive).
    NaN/Inf coefficients are refused: Python's JSON parser accepts ``NaN`` and the ±inf literals, and a NaN score picks a class
    without any word."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    mean: tuple[float, float]
    scale: tuple[float, float]
    coef: tuple[tuple[float, float], ...]
    intercept: tuple[float, ...]
    classes: tuple[int, ...]

    @model_validator(mode="after")
    def _shapes(self) -> "LinearRule":
        rows = len(self.coef)
        expected = 2 if rows == 1 else rows
        if len(self.intercept) != rows or len(self.classes) != expected or rows == 0:
            raise ValueError(f"{rows} coefficient rows need {rows} intercepts and {expected} classes")
        if any(not 0 <= c <= MAX_STEPS for c in self.classes) or any(s == 0 for s in self.scale):
            raise ValueError(f"classes must be in 0..{MAX_STEPS} and scales non-zero")
        return self

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 2) -> (B,) int64 classes."""
        z = (features.double() - torch.tensor(self.mean, dtype=torch.float64)) / torch.tensor(self.scale, dtype=torch.float64)
        scores = z @ torch.tensor(self.coef, dtype=torch.float64).T + torch.tensor(self.intercept, dtype=torch.float64)
        classes = torch.tensor(self.classes)
        pick = (scores[:, 0] > 0).long() if len(self.coef) == 1 else scores.argmax(dim=1)
        return classes[pick]


class SkipVARRules(BaseModel):
    """The JSON a user gives (``coefficients``): ``skip`` picks k, ``cond_only`` picks j (used where k = 0)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    skip: LinearRule
    cond_only: LinearRule


class SkipVARConfig(PassConfig):
    decision_scale: int = Field(-4, description="the scale after which the decision is made (negative from the end)")
    preview_scale: int = Field(4, description="the grid the latents are resized to before decoding (scale index)")
    skip_below: tuple[float, float, float] = Field(
        (0.2, 0.1, 0.05), description="threshold rule: skip one more of the last scales for each of these the "
                                      "relative high-frequency change is under (non-increasing)")
    cond_only_below: tuple[float, float, float] = Field(
        (0.3, 0.2, 0.1), description="threshold rule (nothing skipped): the conditional branch alone for one more of "
                                     "the last scales for each of these the high-frequency ratio is under")
    coefficients: Optional[str] = Field(None, description="JSON file with the two linear rules (replaces the "
                                                          "threshold rule; docs/pass_skipvar.md)")

    @field_validator("skip_below", "cond_only_below")
    @classmethod
    def _non_increasing(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if list(value) != sorted(value, reverse=True):
            raise ValueError(f"thresholds must not increase, got {value}")
        return value

    @field_validator("coefficients")
    @classmethod
    def _readable(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            load_rules(value)
        return value


def load_rules(path: str) -> SkipVARRules:
    """The rules of a JSON file (never a pickle); a ValueError names the file and what is wrong."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"coefficients file {path!r} does not exist")
    try:
        return SkipVARRules(**json.loads(file.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"coefficients file {path!r} is not a JSON object of rules (the released classifiers are "
                         f"pickles, which are never loaded: write their coefficients as JSON): {err}") from None
    except ValidationError as err:  # name the file and each bad key
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ValueError(f"coefficients file {path!r}: {problems}") from None


# -- the decision ---------------------------------------------------------------------------------------------
def resize_latent(latent: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear over the last two dimensions; any dimensions between the channels and those ride along."""
    flat = latent.reshape(latent.shape[0], -1, *latent.shape[-2:]).float()
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*latent.shape[:-2], *size).to(latent.dtype)


def sobel_magnitude(pictures: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W): gradient magnitude of the channel mean (3x3 Sobel, zero padding)."""
    grey = pictures.float().mean(dim=1, keepdim=True)
    kernel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=grey.device)[None, None]
    gx = F.conv2d(grey, kernel, padding=1)
    gy = F.conv2d(grey, kernel.transpose(-1, -2), padding=1)
    return torch.sqrt(gx ** 2 + gy ** 2)


def high_frequency_ratio(pictures: torch.Tensor, radius_fraction: float = 0.4) -> torch.Tensor:
    """(B, C, H, W) -> (B,): amplitude of the centred spectrum of the channel mean outside the radius
    ``int(radius_fraction * min(H, W) / 2)``, over all of it."""
    grey = pictures.float().mean(dim=1)
    amplitude = torch.fft.fftshift(torch.fft.fft2(grey), dim=(-2, -1)).abs()
    height, width = grey.shape[-2:]
    radius = int(radius_fraction * min(height, width) / 2)
    y = torch.arange(height, device=grey.device).view(-1, 1) - height // 2
    x = torch.arange(width, device=grey.device).view(1, -1) - width // 2
    outside = ((y ** 2 + x ** 2).float().sqrt() > radius).float()
    return (amplitude * outside).sum(dim=(-2, -1)) / (amplitude.sum(dim=(-2, -1)) + 1e-6)


def decision_features(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Pictures after and before the decision scale (B, C, H, W) -> (B, 3): change, ratio, relative change."""
    sobel_new, sobel_old = sobel_magnitude(new), sobel_magnitude(old)
    change = (sobel_new - sobel_old).abs().flatten(1).mean(dim=1)
    relative = change / (sobel_new.flatten(1).mean(dim=1) + 1e-6)
    return torch.stack([change, high_frequency_ratio(new), relative], dim=1)


def threshold_rule(features: torch.Tensor, skip_below, cond_only_below) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3) features -> (k, j) per sample by the default rule (module docstring)."""
    relative, ratio = features[:, 2], features[:, 1]
    skip = sum((relative < t).long() for t in skip_below)
    cond_only = sum((ratio < t).long() for t in cond_only_below)
    return skip, torch.where(skip == 0, cond_only, torch.zeros_like(cond_only))


def hold_accumulated(updated: torch.Tensor, previous: torch.Tensor, halted: torch.Tensor) -> torch.Tensor:
    """The accumulated latent: this step's for samples that run, the previous one for halted samples."""
    if not bool(halted.any()):
        return updated
    return torch.where(halted.reshape(-1, *([1] * (updated.dim() - 1))).to(updated.device), previous, updated)


# -- the pass -------------------------------------------------------------------------------------------------
@register_pass
class SkipVAR(GraphPass):
    """The row guard (halting whole samples) at the scales after the decision scale and the held latent in their
    residual steps; the decision in the runtime (module docstring)."""

    name: ClassVar[str] = PASS
    Config: ClassVar[type[PassConfig]] = SkipVARConfig
    provides: ClassVar[tuple[str, ...]] = ("row_selection",)
    runs_before: ClassVar[tuple[str, ...]] = ("lhep", "stepvar", "depthvar", "fastvar", "sparvar")
    cannot_run_beside: ClassVar[tuple[str, ...]] = ("per_scale_outputs",)
    """A step SkipVAR answers without running it (every sample halted) has only the logits and the state: the
    outputs another pass adds to each scale it rewrites would be missing."""

    def plan(self, captured) -> tuple[int, int, tuple[int, ...]]:
        """(decision scale, preview scale, the scales a decision can act on)."""
        ran = len(captured.residual)
        n = len(captured.scales)
        decision = _index(self.config.decision_scale, n, "decision_scale")
        preview = _index(self.config.preview_scale, n, "preview_scale")
        if not 1 <= decision < ran - 1:
            raise ConfigError(f"{PASS}.decision_scale: scale {decision} must have a scale before it and one after it "
                              f"among the {ran} that run")
        return decision, preview, tuple(range(max(decision + 1, ran - MAX_STEPS), ran))

    def requires(self, captured) -> None:
        if captured.plan.cfg_batch is None:
            raise ConfigError(f"pass '{PASS}' needs classifier-free guidance on a doubled batch (no cfg_batch)")
        if not captured.residual:
            raise ConfigError(f"pass '{PASS}' needs the residual steps (CapturePlan.residual)")
        _, _, acting = self.plan(captured)
        for k in acting:
            scale, residual = captured.scales[k], captured.residual[k]
            if not scale.row_inputs or scale.logits_output is None:
                raise ConfigError(f"pass '{PASS}': scale {k} declares no row_inputs / logits_output")
            if residual.accumulated is None or residual.accumulated not in residual.input_names:
                raise ConfigError(f"pass '{PASS}': residual step {k} declares no accumulated latent to hold")
        if any(slot.row_axis != 0 for slot in captured.state):
            raise ConfigError(f"pass '{PASS}': state whose rows are not on dimension 0 cannot be guarded")

    def rewrite(self, captured) -> list[GraphEdit]:
        _, _, acting = self.plan(captured)
        batch = captured.plan.cfg_batch
        edits = []
        for k in acting:
            edits.append(_guard_scale(captured.scales[k], batch))
            edits.append(_hold_latent(captured.residual[k], batch))
        return edits

    def runtime(self, captured) -> "SkipVARRuntime":
        """Also refuses passes that added outputs to the scale steps SkipVAR may answer without running them (when
        every sample is halted those outputs would not exist)."""
        decision, preview, acting = self.plan(captured)
        for k in acting:
            scale = captured.scales[k]
            others = sorted({annotations(n)["pass"] for n in _outputs(scale) if annotations(n).get("pass") not in (None, PASS)})
            if others:
                raise ConfigError(f"pass '{PASS}' cannot run with {others}: they add outputs to scale {k}, which is not run "
                                  "when every sample is halted there")
        rules = load_rules(self.config.coefficients) if self.config.coefficients else None
        return SkipVARRuntime(captured, self.config, rules, decision, tuple(captured.scales[preview].grid[-2:]), acting)


def _outputs(scale) -> list[torch.fx.Node]:
    """The step's own outputs (the state outputs aside)."""
    output = next(n for n in reversed(scale.module.graph.nodes) if n.op == "output")
    values = list(output.args[0])
    return [v for v in values[:len(values) - len(scale.state_outputs)] if isinstance(v, torch.fx.Node)]


def _index(value: int, count: int, key: str) -> int:
    if not -count <= value < count:
        raise ConfigError(f"{PASS}.{key}={value} is outside the schedule's {count} scales")
    return value % count


def _guard_scale(scale, batch: int) -> GraphEdit:
    guard, active, changed, selected = insert_row_guard(scale, batch, PASS, halting=True)
    graph = scale.module.graph
    add_outputs(scale, [("skipvar_active_rows", active)])
    graph.lint()
    scale.module.recompile()
    return GraphEdit(PASS, "scale", scale.index, added=(guard.name, active.name, *selected), generalized=tuple(changed),
                     rewired=tuple(scale.row_inputs) + tuple(scale.packed_inputs or ()) + tuple(scale.state_inputs))


def _hold_latent(graph, batch: int) -> GraphEdit:
    fx_graph = graph.module.graph
    output = next(n for n in reversed(fx_graph.nodes) if n.op == "output")
    values = list(output.args[0])
    position = graph.output_names.index(graph.accumulated)
    previous = next(n for n in fx_graph.nodes if n.op == "placeholder" and n.target == graph.accumulated)
    last = [n for n in fx_graph.nodes if n.op == "placeholder"][-1]
    halted_example = torch.zeros(batch, dtype=torch.bool)
    halted_example[0] = True
    halted = add_input(fx_graph, "skipvar_halted", last, PASS, "guard_input", [halted_example])
    graph.input_names = graph.input_names + ["skipvar_halted"]
    with fx_graph.inserting_before(output):
        held = tag(fx_graph.call_function(hold_accumulated, (values[position], previous, halted)), PASS, "hold_latent")
    rewired = values[position].name
    values[position] = held
    output.args = (tuple(values),)
    fx_graph.lint()
    graph.module.recompile()
    return GraphEdit(PASS, "residual", graph.index, added=(halted.name, held.name), rewired=(rewired,))


class SkipVARRuntime(PassRuntime):
    """Keeps the two latents around the decision, decides per sample, then feeds the guard and the held latent.

    Stats, one entry per scale that ran: ``scale``, ``rows`` (that ran), ``uncond_ran`` and ``halted`` (per sample);
    the decision scale's entry also has ``features`` (per sample: change, ratio, relative change),
    ``features_from`` ("images" or "latent"), ``skip`` (k) and ``cond_only`` (j) per sample."""

    def __init__(self, captured: Any, config: SkipVARConfig, rules: Optional[SkipVARRules], decision: int,
                 preview: tuple[int, int], acting: tuple[int, ...]):
        super().__init__()
        self.config, self.rules, self.decision, self.preview, self.acting = config, rules, decision, preview, set(acting)
        self.batch = captured.plan.cfg_batch
        self.ran = len(captured.residual)
        self.skip = self.cond_only = torch.zeros(self.batch, dtype=torch.long)
        self.before: Optional[torch.Tensor] = None
        self.active: Optional[torch.Tensor] = None
        self.pending: dict = {}

    def flags(self, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(stopped, halted) per sample at ``scale``: the unconditional row / both rows no longer run."""
        left = self.ran - scale  # this scale is among the last ``left``
        halted = self.skip >= left
        return (self.cond_only >= left) & ~halted, halted

    def inputs(self, graph, region: str, device: torch.device) -> dict:
        if graph.index not in self.acting:
            return {}
        stopped, halted = self.flags(graph.index)
        if region != "scale":
            return {"skipvar_halted": halted.to(device)}
        cache_rows = self.active if self.active is not None else torch.arange(2 * self.batch)
        return {"skipvar_stopped": stopped.to(device), "skipvar_halted": halted.to(device),
                "skipvar_cache_rows": cache_rows.to(device)}

    def observe(self, graph, region: str, outputs: dict) -> None:
        if region == "scale":
            active = outputs.get("skipvar_active_rows")
            self.active = active.cpu() if active is not None else None
            stopped, halted = self.flags(graph.index) if graph.index in self.acting else (
                torch.zeros(self.batch, dtype=torch.bool),) * 2
            self.pending = {"scale": graph.index, "rows": 2 * self.batch if active is None else int(active.numel()),
                            "uncond_ran": (~(stopped | halted)).tolist(), "halted": halted.tolist()}
            self.stats.append(self.pending)
            return
        if graph.index == self.decision - 1:
            self.before = outputs[graph.accumulated].detach().clone()
        elif graph.index == self.decision:
            self.decide(outputs[graph.accumulated])

    def decide(self, after: torch.Tensor) -> None:
        new, old = resize_latent(after, self.preview), resize_latent(self.before, self.preview)
        source = "latent"
        if self.decoder is not None:
            new, old, source = self.decoder(new), self.decoder(old), "images"
        elif new.dim() > 4:
            new, old = new.flatten(1, -3), old.flatten(1, -3)
        features = decision_features(new, old).cpu()
        if self.rules is not None:
            skip = self.rules.skip.predict(features[:, :2])
            cond_only = torch.where(skip == 0, self.rules.cond_only.predict(features[:, :2]), torch.zeros_like(skip))
        else:
            skip, cond_only = threshold_rule(features, self.config.skip_below, self.config.cond_only_below)
        left = self.ran - 1 - self.decision  # at most the scales after the decision
        self.skip, self.cond_only = skip.clamp(max=left), cond_only.clamp(max=left)
        self.pending.update(features=features.tolist(), features_from=source, skip=self.skip.tolist(),
                            cond_only=self.cond_only.tolist())

    def answer(self, graph, region: str, device: torch.device) -> Optional[dict]:
        """A scale step where every sample is halted computes nothing: no rows of logits, no running rows (the
        graph is not run: a graph of zero rows is not something every model's code can take)."""
        if region != "scale" or graph.index not in self.acting or not bool(self.flags(graph.index)[1].all()):
            return None
        logits = next(n for n in graph.module.graph.nodes if annotations(n).get("output") == graph.logits_output
                      ).meta["val"]  # the captured logits (a pass may have put a node of its own after them)
        return {graph.logits_output: torch.zeros(0, *logits.shape[1:], dtype=logits.dtype, device=device),
                "skipvar_active_rows": torch.zeros(0, dtype=torch.long)}

    def guide(self, index: int, logits: torch.Tensor, batch: int, rule: GuidanceRule) -> Optional[torch.Tensor]:
        if self.active is None or logits.shape[0] == 2 * batch:
            return None
        return guided_mix(logits, self.active.to(logits.device), batch, rule)
