"""Codebook Features' declared stages and ``PAPER``.

Stages (TokFSM, the tiny default): ``baseline`` (the transformer alone), ``codebook`` (the same
transformer with codebooks, dead-code replacement on), ``codebook_no_replace`` (replacement off,
for the dead-code comparison), ``analysis`` (transition accuracy, state features, purity, dead
codes, steering). With ``data.kind=text`` the same codebooks go on the pretrain corpus or any HF
causal LM (``model.name_or_path``) and the report gives the LM-loss cost of the bottleneck.
"""
from __future__ import annotations

import time

from transformers import AutoModelForCausalLM

from athanor.config import ConfigError
from athanor.runner import Paper, Stage, StageContext

from .config import CodebookPaperConfig
from .method import CodebookLM, attach, build_lm, load_data
from .report import analysis_stage, report, summary
from .seeds import seeds_report, seeds_stage


def check(cfg: CodebookPaperConfig) -> None:
    a, fsm = cfg.analysis, cfg.data.fsm
    if cfg.seeds and cfg.data.kind != "tokfsm":
        raise ConfigError("seeds (one process per run seed) is for data.kind=tokfsm; give --seeds [] for text")
    if len(set(cfg.seeds)) != len(cfg.seeds) or any(k < 0 for k in cfg.seeds):
        raise ConfigError(f"seeds={list(cfg.seeds)} must be distinct non-negative integers")
    if cfg.data.kind == "tokfsm":
        if not 2 <= a.prompt_states:
            raise ConfigError(f"analysis.prompt_states={a.prompt_states} must be >= 2 (steering swaps the last state for a sibling)")
        if fsm.edges < 3:
            raise ConfigError(f"data.fsm.edges={fsm.edges} must be >= 3 (steering draws two other successors of a state)")
        if cfg.model.name_or_path:
            raise ConfigError("model.name_or_path needs data.kind=text (TokFSM trains its own small transformer)")
        if not 1 <= a.prompt_states < fsm.seq_states:
            raise ConfigError(f"analysis.prompt_states={a.prompt_states} must be in [1, data.fsm.seq_states={fsm.seq_states})")
        if fsm.eval_sequences < 2:
            raise ConfigError("data.fsm.eval_sequences must be >= 2 (half selects features, half measures them)")
    if cfg.codebook.layers and not cfg.model.name_or_path and max(cfg.codebook.layers) >= cfg.model.n_layers:
        raise ConfigError(f"codebook.layers={list(cfg.codebook.layers)}: the model has {cfg.model.n_layers} layers")


# ---------------------------------------------------------------------------- stages
def train_stage(with_codebooks: bool, replace: bool = True):
    def fn(ctx: StageContext) -> dict:
        cfg, cb = ctx.cfg, ctx.cfg.codebook
        data = load_data(cfg)
        frozen_baseline = cb.freeze_lm and not with_codebooks
        steps = 0 if frozen_baseline else (cb.steps or None) if with_codebooks else None
        engine = ctx.engine(max_steps=steps)
        if with_codebooks and cb.init == "baseline":
            lm = AutoModelForCausalLM.from_pretrained(ctx.results["baseline"]["model"])
        else:
            lm = build_lm(cfg.model, data["vocab_size"], data["seq_len"])
        model = attach(cfg, lm, with_codebooks)
        method = CodebookLM(model, data["train"], data["held_out"], data["batch_size"], seed=cfg.run.seed,
                            recon_weight=cb.recon_weight, replace_every=cb.replace_every if replace else 0,
                            replace_min_uses=cb.replace_min_uses, kmeans_iters=cb.kmeans_iters,
                            freeze_lm=cb.freeze_lm and with_codebooks, code_lr_scale=cb.code_lr_scale)
        started, cpu_started = time.perf_counter(), time.process_time()
        engine, final = ctx.fit(method, engine=engine)
        # one torch thread: process CPU time is what the stage would take alone on an idle core
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        ctx.save_pretrained(engine, "model", ctx.dir / "model")
        return {"eval_loss": final["loss"], "model": str(ctx.dir / "model"), "steps": engine.step,
                "train_seconds": seconds, "train_cpu_seconds": cpu_seconds, "replaced_codes": method.replaced_total}
    return fn


def stages(cfg: CodebookPaperConfig) -> list[Stage]:
    if cfg.seeds:  # one process per run seed; this process only gathers their reports
        return [Stage("seeds", seeds_stage, describe=f"run seeds {list(cfg.seeds)}, one process each")]
    start = ("baseline",) if cfg.codebook.init == "baseline" else ()
    out = [Stage("baseline", train_stage(False), describe="the transformer without codebooks"),
           Stage("codebook", train_stage(True), needs=start, describe="the same transformer with codebooks")]
    if cfg.codebook.compare_no_replacement and cfg.codebook.replace_every:
        out.append(Stage("codebook_no_replace", train_stage(True, replace=False), needs=start,
                         describe="codebooks without dead-code replacement"))
    out.append(Stage("analysis", analysis_stage, needs=tuple(s.name for s in out),
                     describe="transition accuracy, state features, dead codes, steering"))
    return out


def report_any(ctx: StageContext, results: dict) -> dict:
    return seeds_report(ctx, results["seeds"]) if "seeds" in results else report(ctx, results)


PAPER = Paper(name="codebook", config=CodebookPaperConfig, stages=stages, report=report_any, check=check, summary=summary,
              main_model="model", card="transformers", model_class="athanor.methods.codebook:CodebookModel")
