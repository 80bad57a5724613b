"""Hugging Face Hub side: model cards for finished runs (publishing comes with the cluster issue)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData


def write_model_card(folder: str | Path, *, title: str, summary: str, metrics: dict | None = None,
                     library: str = "transformers", base_model: str | None = None,
                     datasets: list[str] | None = None, tags: list[str] | None = None,
                     pipeline_tag: str | None = None) -> Path:
    """``README.md`` with YAML metadata (library, base model, datasets, tags, metrics) and the
    exact command that produced the run."""
    data = ModelCardData(library_name=library, base_model=base_model, datasets=datasets,
                         tags=["athanor", *(tags or [])], pipeline_tag=pipeline_tag)
    command = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in (metrics or {}).items() if isinstance(v, (int, float, str)))
    content = (f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{summary}\n\n"
               f"## Metrics\n\n| metric | value |\n|---|---|\n{rows}\n\n"
               f"## Reproduce\n\n```\n{command}\n```\n")
    card = ModelCard(content)
    path = Path(folder) / "README.md"
    card.save(path)
    return path
