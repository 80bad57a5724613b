"""The template's declared stages and ``PAPER``: ``fit`` (an engine run) -> ``evaluate`` (reload, measure)."""
from __future__ import annotations

import torch

from ...data.batches import ShuffledBatches
from ...runner import Paper, Stage, StageContext
from .config import TemplateConfig
from .method import LinearModel, LinearRegression, make_data
from .report import report, summary


def fit_stage(ctx: StageContext) -> dict:
    data = make_data(ctx.cfg.data, ctx.cfg.run.seed)
    method = LinearRegression(ctx.cfg.data.features)
    engine = ctx.engine()
    batches = ShuffledBatches(data["train"], ctx.cfg.data.batch_size, ctx.cfg.run.seed, engine.rank, engine.world_size)
    ctx.fit(method, batches, engine=engine)
    folder = engine.save_pretrained("model", ctx.dir / "model")  # every process calls it (ZeRO-3 gathers)
    return {"model": str(folder), "steps": engine.step}


def evaluate_stage(ctx: StageContext) -> dict:
    data = make_data(ctx.cfg.data, ctx.cfg.run.seed)
    model = LinearModel.from_pretrained(ctx.results["fit"]["model"])
    held = data["held_out"]
    with torch.no_grad():
        mse = torch.nn.functional.mse_loss(model(held["x"]), held["y"]).item()
    return {"held_out_mse": mse, "weight_error": (model.linear.weight[0] - data["w"]).norm().item()}


PAPER = Paper(
    name="template",
    config=TemplateConfig,
    stages=lambda cfg: [Stage("fit", fit_stage), Stage("evaluate", evaluate_stage, needs=("fit",))],
    report=report,
    summary=summary,
    main_model="fit/model",  # what publish puts on top of the upload; declaring it means the paper publishes
    card="torch",  # a plain torch module (Hub mixin): no transformers/diffusers card
    model_class="athanor.methods.template:LinearModel",  # the card's loading snippet
)
