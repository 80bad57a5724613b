"""Model cards: the one a recipe writes beside a saved model, and the one publish generates.

A card is right for the model's kind (``transformers`` / ``diffusers`` / ``peft`` / plain ``torch``):
its ``library_name``, ``pipeline_tag`` and loading snippet follow the kind the paper declares (or
the saved files tell); the metrics are ``report.json``'s measured numbers, while values that are the
config's own settings (hyper-parameters) and bookkeeping are listed apart; the reproduce command
is the one the run recorded (``RUN.json``, else the recipe's own card).
"""
from __future__ import annotations

import json
import math
import re
import shlex
import sys
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .redact import redact

BOOKKEEPING_KEYS = {"steps", "n_params", "world_size", "seed", "seconds"}  # report.json numbers that are not metrics
LIBRARY = {"transformers": "transformers", "diffusers": "diffusers", "peft": "peft", "torch": None}


def own_file(path: Path) -> bool:
    """A regular file of the run folder itself: not a symbolic link and not reached through one
    (paths here are built from the resolved run folder, so any link on the way changes them)."""
    return path.is_file() and path.resolve() == path.absolute()


def own_dir(path: Path) -> bool:
    return path.is_dir() and path.resolve() == path.absolute()


def write_model_card(folder: str | Path, *, title: str, summary: str, metrics: dict | None = None,
                     library: str = "transformers", base_model: str | None = None,
                     datasets: list[str] | None = None, tags: list[str] | None = None,
                     pipeline_tag: str | None = None) -> Path:
    """``README.md`` with YAML metadata (library, base model, datasets, tags, metrics) and the
    exact command that produced the run."""
    data = ModelCardData(library_name=library, base_model=base_model, datasets=datasets,
                         tags=["athanor", *(tags or [])], pipeline_tag=pipeline_tag)
    command = redact(" ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]))
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in (metrics or {}).items() if isinstance(v, (int, float, str)))
    content = (f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{summary}\n\n"
               f"## Metrics\n\n| metric | value |\n|---|---|\n{rows}\n\n"
               f"## Reproduce\n\n```\n{command}\n```\n")
    card = ModelCard(content)
    path = Path(folder) / "README.md"
    card.save(path)
    return path


def saved_kind(folder: Path) -> str:
    """The kind the saved files tell: a diffusers pipeline, a peft adapter, a transformers model
    (a config.json naming ``model_type``), else a plain torch module (a Hub-mixin config.json)."""
    if own_file(folder / "model_index.json"):
        return "diffusers"
    if own_file(folder / "adapter_config.json"):
        return "peft"
    config = _read_json(folder / "config.json")
    return "transformers" if "model_type" in config or "architectures" in config else "torch"


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text()) if own_file(path) else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _read_yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path)) if own_file(path) else {}


def _existing_card(folder: Path) -> ModelCard | None:
    path = folder / "README.md"
    return ModelCard.load(path) if own_file(path) else None


def _recorded_command(card: ModelCard | None) -> str | None:
    """The command a recipe recorded in its model card (``## Reproduce`` block)."""
    if card is None:
        return None
    match = re.search(r"## Reproduce\s*```[^\n]*\n(.+?)\n```", card.text, re.S)
    return match.group(1).strip() if match else None


def _is_causal_lm(folder: Path) -> bool:
    architectures = _read_json(folder / "config.json").get("architectures") or []
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) or \
        bool(_read_json(folder / "config.json").get("auto_map", {}).get("AutoModelForCausalLM"))


def _custom_pipeline(folder: Path) -> bool:
    """A diffusers pipeline whose class is athanor's code (``model_index.json`` names
    ``["pipeline", Class]``, the custom-code convention ``save_pipeline`` writes)."""
    name = _read_json(folder / "model_index.json").get("_class_name")
    return isinstance(name, list) and len(name) == 2


def _load_snippet(kind: str, repo_id: str, causal: bool, model_class: str = "", custom: bool = False) -> str:
    """How to load the upload: the paper's declared class when it has one, else the kind's loader."""
    if model_class:
        module, name = model_class.split(":")
        return (f"# pip install athanor (the class that trained it)\nfrom {module} import {name}\n"
                f"model = {name}.from_pretrained({repo_id!r})")
    if kind == "peft":
        return f"from peft import AutoPeftModel\nmodel = AutoPeftModel.from_pretrained({repo_id!r})"
    if kind == "diffusers":
        if custom:  # the pipeline class is athanor's: diffusers imports it through the uploaded pipeline.py
            return ("# pip install athanor (pipeline.py imports its pipeline class)\nfrom diffusers import DiffusionPipeline\n"
                    f"pipe = DiffusionPipeline.from_pretrained({repo_id!r}, trust_remote_code=True)")
        return f"from diffusers import DiffusionPipeline\npipe = DiffusionPipeline.from_pretrained({repo_id!r})"
    if kind == "torch":
        return ("from huggingface_hub import hf_hub_download\nfrom safetensors.torch import load_file\n"
                f"state_dict = load_file(hf_hub_download({repo_id!r}, \"model.safetensors\"))  # the module's weights;\n"
                "# its settings are in config.json, the module in the athanor paper that trained it")
    auto = "AutoModelForCausalLM" if causal else "AutoModel"
    return (f"from transformers import {auto}, AutoTokenizer\n"
            f"model = {auto}.from_pretrained({repo_id!r}, trust_remote_code=True)\n"
            f"tokenizer = AutoTokenizer.from_pretrained({repo_id!r})")


def _config_leaves(config: dict, prefix: str = "") -> dict:
    leaves = {}
    for key, value in config.items():
        if isinstance(value, dict):
            leaves.update(_config_leaves(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def split_report(report: dict, config: dict) -> tuple[dict, dict, dict]:
    """(metrics, hyper-parameters, bookkeeping) among report.json's finite numbers: a number whose
    name is a config setting's (``lr``, ``optim.lr``, ``alpha``) is a hyper-parameter, not a result."""
    leaves = _config_leaves(config)
    names = set(leaves) | {k.rsplit(".", 1)[-1] for k in leaves}
    numbers = {k: v for k, v in report.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    facts = {k: v for k, v in numbers.items() if k in BOOKKEEPING_KEYS}
    hyper = {k: v for k, v in numbers.items() if k in names and k not in facts}
    metrics = {k: v for k, v in numbers.items() if k not in facts and k not in hyper}
    return metrics, hyper, facts


def _table(rows: dict, head: str) -> str:
    body = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows.items())
    return f"| {head} | value |\n|---|---|\n{body}" if rows else "(none)"


def build_model_card(output_dir: Path, main_artifact: Path, repo_id: str, files: list[str],
                     command: str | None = None, kind: str = "", model_class: str = "") -> ModelCard:
    """Card metadata (library, base model, datasets, tags, metrics from ``report.json`` as
    model-index results) and text (summary, metrics, hyper-parameters, how to load, the command)."""
    output_dir = Path(output_dir).resolve()  # what own_file compares against
    report = _read_json(output_dir / "report.json")
    config = _read_yaml(output_dir / "config.yaml")
    kind = kind or saved_kind(main_artifact)
    old = _existing_card(main_artifact)
    model_cfg, data_cfg = config.get("model") or {}, config.get("data") or {}
    base_model = (old.data.base_model if old else None) or model_cfg.get("name_or_path") or model_cfg.get("base")
    if kind == "peft":
        base_model = base_model or _read_json(main_artifact / "adapter_config.json").get("base_model_name_or_path")
    if not isinstance(base_model, str) or not base_model or Path(base_model).exists():  # a local folder is no Hub id
        base_model = None
    source = str(data_cfg.get("source") or data_cfg.get("dataset") or "")
    hub_dataset = source[3:].split(":")[0] if source.startswith("hf:") else None
    dataset_name = hub_dataset or (Path(source).name if source else "unspecified")
    tags = list(dict.fromkeys(["athanor", *(["pytorch"] if kind == "torch" else []),
                               *((old.data.tags or []) if old else [])]))
    causal = kind == "transformers" and _is_causal_lm(main_artifact)
    task = (old.data.pipeline_tag if old else None) or ("text-generation" if causal else None)
    metrics, hyper, facts = split_report(report, config)
    results = [EvalResult(task_type=task or "other", dataset_type=hub_dataset or dataset_name,
                          dataset_name=dataset_name, metric_type=k, metric_name=k, metric_value=v)
               for k, v in metrics.items()]
    data = ModelCardData(library_name=LIBRARY[kind], base_model=base_model,
                         datasets=[hub_dataset] if hub_dataset else None, tags=tags, pipeline_tag=task,
                         model_name=repo_id.split("/")[-1], eval_results=results or None)
    summary = ""
    if own_file(output_dir / "report.md"):  # the report's first paragraph, without its title
        paragraphs = [p.strip() for p in (output_dir / "report.md").read_text().split("\n\n")]
        summary = next((p for p in paragraphs if p and not p.startswith(("#", "|"))), "")
    command = redact(command or _recorded_command(old) or "(not recorded; see training_config.yaml)")
    text = (f"# {repo_id.split('/')[-1]}\n\nTrained with athanor ({kind}). {summary}\n\n"
            f"## Metrics\n\n{_table({**metrics, **facts}, 'metric')}\n\n"
            f"## Hyper-parameters reported\n\n{_table(hyper, 'setting')}\n\n"
            f"## Use\n\n```python\n{_load_snippet(kind, repo_id, causal, model_class, _custom_pipeline(main_artifact))}"
            f"\n```\n\n"
            f"## Training\n\nData: `{source or 'see training_config.yaml'}`. Resolved config: "
            f"`training_config.yaml`; report: `report.md`.\n\n"
            f"## Reproduce\n\n```\n{command}\n```\n\n## Files\n\n" + "\n".join(f"- `{f}`" for f in files) + "\n")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")
