"""The Markdown tables of a benchmark result (the JSON holds everything; this is the readable view)."""
from __future__ import annotations

from typing import Any


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(result: dict[str, Any]) -> str:
    spec, machine, variants = result["spec"], result["machine"], result["variants"]
    lines = [f"### {spec['config']}, pn {spec['pn']} (h/w {spec['h_div_w']}), batch {spec['batch']}, {spec['dtype']} "
             f"on {spec['device']}", ""]
    point = spec.get("operating_point") or ""
    fixed = {k: spec[k] for k in ("keep_fraction", "stop_scale") if spec.get(k) is not None}
    mode = f"fixed ({', '.join(filter(None, [point and f'operating point {point!r}', fixed and str(fixed)]))})" \
        if result["mode"] == "fixed" else "adaptive (the passes' own rules)"
    settings = {name: values for v in variants.values() for name, values in (v.get("pass_config") or {}).items()}
    lines += [f"- mode: {mode}; pass settings (defaults where empty): `{settings}`",
              f"- {spec['warmup']} warm-up + {spec['repeats']} timed runs per variant, round-robin; seed {spec['seed']}; "
              f"measured {result['created']}",
              f"- machine: {machine.get('gpu') or machine['cpu']}"
              + (f", driver {machine.get('driver')}, CUDA {machine.get('cuda')}" if machine.get("gpu") else
                 f", {machine['cpu_count']} cores, {machine['torch_threads']} torch threads")
              + f"; torch {machine['torch']}, Python {machine['python']}", ""]
    lines += ["| variant | s/image median | min | max | speed-up | GFLOP | ideal speed-up | achieved of ideal | "
              "peak MiB | token-rows | inserted share | capture s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in variants.items():
        t = v["time_per_image_s"]
        inserted = v.get("inserted")
        lines.append(
            f"| {name} | {t['median']:.3f} | {t['min']:.3f} | {t['max']:.3f} | {v['speedup_vs_baseline']:.2f}x | "
            f"{_num(v.get('flops', {}).get('total', None) and v['flops']['total'] / 1e9, '.1f')} | "
            f"{_num(v.get('ideal_speedup'), '.2f')} | "
            f"{_num(v.get('achieved_fraction_of_ideal') and 100 * v['achieved_fraction_of_ideal'], '.0f')}% | "
            f"{_num(v.get('peak_memory_mib'), '.0f')} | {sum(v['tokens_per_scale'] or [])} | "
            f"{_num(inserted and 100 * inserted['share_of_run'], '.1f')}% | {_num(v.get('capture_s'), '.2f')} |")
    names = list(variants)
    scales = range(len(variants[names[0]]["per_scale_ms"]))
    lines += ["", "Per scale: median ms (token-rows computed)", "",
              "| scale | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for s in scales:
        cells = [f"{variants[n]['per_scale_ms'][s]:.1f} ({variants[n]['tokens_per_scale'][s]})" for n in names]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    timed = {n: v["inserted"] for n, v in variants.items() if v.get("inserted")}
    if timed:
        lines += ["", "Inserted nodes (instrumented runs): time inside the nodes the passes added and their host "
                  "runtimes", "", "| variant | total ms | graph nodes ms | host runtime ms | share of run | "
                  "max ms per scale | largest parts (ms) |", "|---|---|---|---|---|---|---|"]
        for name, ins in timed.items():
            parts = ", ".join(f"{k} {ms:.2f}" for k, ms in list(ins["by_role_ms"].items())[:4])
            lines.append(f"| {name} | {ins['ms_total']:.2f} | {ins['graph_nodes_ms']:.2f} | {ins['host_runtime_ms']:.2f} | "
                         f"{100 * ins['share_of_run']:.2f}% | {ins['max_per_scale_ms']:.3f} | {parts} |")
    paper = result.get("paper_latency_s")
    if paper:
        lines += ["", "Paper (LD-Pruning, one H100, batch 1, trained weights): "
                  + ", ".join(f"{k} {v:.2f} s" for k, v in paper.items())
                  + (f"; speed-up {paper['baseline'] / paper['lhep+sats']:.2f}x" if "lhep+sats" in paper else "")]
    return "\n".join(lines) + "\n"
