"""Model knowledge lives only in model_adapters/: the core and the passes name no model and no model tensor."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAMES = re.compile(r"(?i:cached_[kv]|cond_gss|cond_BD|cu_seqlens|text_kv|patchify|\brope|infinity|flan|"
                         r"\bt5\b|vqvae|bsq)|\bbits\b|\bVAR\b|\bHART\b")
"""A VAE (the decoder every family has) and a text encoder are kinds of component, not a model: ``--vae`` and
``--text-encoder`` are options of ``graphsurgeon generate``."""
ADAPTER_DEFAULTS = re.compile(r"""["']infinity(-tiny)?["']""")
"""The one exception: the default adapter and config names of the command line (``--adapter infinity``)."""


def test_core_and_passes_name_no_model():
    offenders = []
    for folder in ("graphsurgeon", "passes"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if MODEL_NAMES.search(ADAPTER_DEFAULTS.sub("", line)):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "model-specific names outside model_adapters/:\n" + "\n".join(offenders)
