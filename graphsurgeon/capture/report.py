"""The capture report: what the tracer found and what it had to assume."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx
from torch.amp.autocast_mode import _enter_autocast


@dataclass
class ScaleReport:
    index: int
    grid: tuple[int, ...]
    tokens: int
    nodes: int
    token_axis_nodes: int
    side_inputs: list[dict[str, Any]]
    kv_appends: int
    autocast_regions: int
    unresolved: list[str]
    seconds: float

    @classmethod
    def from_graph(cls, spec, module: torch.fx.GraphModule, axes, seconds: float) -> "ScaleReport":
        nodes = list(module.graph.nodes)
        return cls(index=spec.index, grid=tuple(spec.grid), tokens=spec.tokens, nodes=len(nodes),
                   token_axis_nodes=axes.annotated, side_inputs=axes.side_inputs, kv_appends=len(axes.kv_appends),
                   autocast_regions=sum(1 for n in nodes if n.target is _enter_autocast),
                   unresolved=axes.unresolved, seconds=seconds)


@dataclass
class CaptureReport:
    scales: list[ScaleReport] = field(default_factory=list)
    leaves: Counter = field(default_factory=Counter)
    """Modules kept as one call (type name -> calls over all scales)."""
    wrapped: Counter = field(default_factory=Counter)
    """Opaque functions and custom ops kept as one node (name -> calls)."""
    compiled_helpers: list[str] = field(default_factory=list)
    """``torch.compile``-wrapped callables that were traced through their eager function."""
    state: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add_scale(self, scale: ScaleReport) -> None:
        self.scales.append(scale)

    def record_leaves(self, module: torch.fx.GraphModule, tracer) -> None:
        for node in module.graph.nodes:
            if node.op == "call_module":
                self.leaves[type(module.get_submodule(node.target)).__name__] += 1
            elif node.op == "call_function" and (
                    isinstance(node.target, (torch._ops.OpOverloadPacket, torch._ops.OpOverload))
                    or id(node.target) in tracer._autowrap_function_ids):
                self.wrapped[str(node.target)] += 1

    @property
    def specialised(self) -> list[str]:
        """What each graph is specialised to (it is re-captured when these change)."""
        return ["scale index, token grid and token count of its scale", "batch rows (CFG-doubled batch)",
                "KV-cache lengths (tokens of the earlier scales)", "lengths of packed per-row inputs (e.g. prompts)",
                "dtypes and device"]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["leaves"], data["wrapped"] = dict(self.leaves), dict(self.wrapped)
        data["specialised"] = self.specialised
        return data

    def to_text(self) -> str:
        lines = [f"captured {len(self.scales)} scales in {self.seconds:.2f} s"]
        lines.append(f"{'scale':>5} {'grid':>10} {'tokens':>7} {'nodes':>6} {'token-axis':>10} {'side inputs':>11} "
                     f"{'kv appends':>10} {'autocast':>8}")
        for s in self.scales:
            grid = "x".join(map(str, s.grid))
            lines.append(f"{s.index:>5} {grid:>10} {s.tokens:>7} {s.nodes:>6} {s.token_axis_nodes:>10} "
                         f"{len(s.side_inputs):>11} {s.kv_appends:>10} {s.autocast_regions:>8}")
        if self.scales:
            last = self.scales[-1]
            lines.append(f"token side inputs (scale {last.index}): " + (", ".join(
                f"{e['root']} from {e['root_source']} (axis {e['axis']}, meets {e['meets']})" for e in last.side_inputs[:6])
                or "none"))
            unresolved = sorted({u for s in self.scales for u in s.unresolved})
            lines.append("token axis unresolved: " + (", ".join(unresolved[:10]) if unresolved else "none"))
        lines.append("state (explicit graph inputs/outputs): " + (f"{len(self.state)} slots, e.g. {', '.join(self.state[:2])}"
                                                                  if self.state else "none"))
        lines.append("leaf modules: " + (", ".join(f"{k} x{v}" for k, v in self.leaves.most_common()) or "none"))
        lines.append("opaque functions/custom ops: " + (", ".join(f"{k} x{v}" for k, v in self.wrapped.most_common()) or "none"))
        lines.append("compiled helpers traced eagerly: " + (", ".join(self.compiled_helpers[:4]) + (
            f" (+{len(self.compiled_helpers) - 4})" if len(self.compiled_helpers) > 4 else "") if self.compiled_helpers else "none"))
        lines.append("specialised to: " + "; ".join(self.specialised))
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)
