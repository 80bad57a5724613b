"""The pretrain paper's one stage and ``PAPER``: train, then the Hub-ready model folder."""
from __future__ import annotations

import math

from ...data import open_text_data
from ...hub import write_model_card
from ...runner import Paper, Stage, StageContext
from .config import PretrainConfig
from .method import Pretrain
from .report import report, summary


def train_stage(ctx: StageContext) -> dict:
    """Train, then save the Hub-ready model folder (``OUTPUT/model``) with its tokenizer and card."""
    cfg = ctx.cfg
    data = open_text_data(cfg.data)
    method = Pretrain(cfg.model, data, cfg.data.batch_size, cfg.data.eval_batches, probe_every=cfg.probes.every)
    engine, final = ctx.fit(method)
    initial = engine.history["initial_eval"]["loss"]
    result = {
        "initial_eval_loss": initial,
        "final_eval_loss": final["loss"],
        "steps": engine.step,
        "n_params": method.n_params,
        "diverged": not math.isfinite(final["loss"]) or final["loss"] > initial,
        "world_size": engine.world_size,
        "world_size_changes": engine.history.get("world_size_changes", []),  # resumed on another world size
        "model_dir": str(ctx.dir / "model"),
    }
    engine.save_pretrained("model", ctx.dir / "model")
    if ctx.is_main:
        data.tokenizer.save_pretrained(ctx.dir / "model")
        write_model_card(ctx.dir / "model", title=f"{ctx.root.name}: causal LM pretrained with athanor",
                         summary=f"{method.n_params:,} parameters, {engine.step} steps.",
                         metrics={k: v for k, v in result.items() if "loss" in k},
                         base_model=cfg.model.name_or_path or None, tags=["causal-lm", "pretraining"])
    return result


PAPER = Paper(
    name="pretrain",
    config=PretrainConfig,
    # One stage in OUTPUT itself (the model folder users load is OUTPUT/model), run on every invocation:
    # the engine resumes from its newest checkpoint, so a second run with more steps continues training.
    stages=lambda cfg: [Stage("train", train_stage, folder=".", record=False)],
    report=report,
    summary=summary,
    main_model="model", card="transformers",  # OUTPUT/model: AutoModelForCausalLM.from_pretrained
)
