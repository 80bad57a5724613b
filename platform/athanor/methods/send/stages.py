"""SeND's declared stages and ``PAPER``: an EigenScore exactness check, a base LM trained to convergence on the old facts,
then continued training on a stream of new facts, normal vs SeND, for each seed.

    eigenscore_check -> base -> normal_s<seed>, send_s<seed> (for every seed) -> report

Every arm of one seed starts from the same base model and sees the same stream of batches (the
stream depends on the seed only), so normal vs SeND is paired by seed.
"""
from __future__ import annotations

import math
import time

import torch

from ...config import ConfigError, OptimConfig
from ...data import ShuffledBatches
from ...parts.lm import AnswerLM, answer_matches, build_lm, encode_records, load_lm, load_tokenizer
from ...runner import Paper, Stage, StageContext
from .config import SendPaperConfig
from .eigenscore import random_eigenscore_check
from .facts import FactStream, load_facts, make_tokenizer
from .method import ContinuedTraining, auroc, sampled_eigenscores
from .report import report, summary


def check(cfg: SendPaperConfig) -> None:
    if cfg.run.max_steps < cfg.data.additions:
        raise ConfigError(f"run.max_steps={cfg.run.max_steps} cannot hold data.additions={cfg.data.additions}")
    if not cfg.model.name_or_path and not -cfg.model.num_layers <= cfg.send.layer < cfg.model.num_layers:
        raise ConfigError(f"send.layer={cfg.send.layer} is outside the model's {cfg.model.num_layers} layers")
    if not cfg.model.name_or_path and cfg.base.max_steps == 0:
        raise ConfigError("base.max_steps=0 needs a model.name_or_path that already knows the old facts")


def _encode(tokenizer, cfg: SendPaperConfig, records) -> dict:
    return encode_records(tokenizer, records, cfg.data.prompt_template, cfg.data.max_length)


# ---------------------------------------------------------------------------- stages
def eigenscore_stage(ctx: StageContext) -> dict:
    """Gram-exact log det vs a float64 dense Cholesky log det on random embeddings."""
    return random_eigenscore_check(samples=ctx.cfg.eigenscore.samples, alpha=ctx.cfg.eigenscore.alpha)


def base_stage(ctx: StageContext) -> dict:
    """The base LM learns the old facts (trained phrasings) to convergence."""
    cfg = ctx.cfg
    data, split = load_facts(cfg.data)
    if cfg.model.name_or_path and cfg.base.max_steps == 0:
        return {"model_dir": cfg.model.name_or_path, "steps": 0}
    tokenizer = make_tokenizer(cfg.data, data, cfg.model.name_or_path)
    old = _encode(tokenizer, cfg, [split.records[i] for i in split.old])
    model = build_lm(cfg.model, len(tokenizer), cfg.data.max_length)
    method = AnswerLM(model, old, {"old": old}, cfg.data.batch_size)
    optim = OptimConfig(**{**cfg.optim.__dict__, "lr": cfg.base.lr, "schedule": "cosine", "warmup_steps": 20})
    engine = ctx.engine(max_steps=cfg.base.max_steps, optim=optim, eval_every=0)
    method.setup(engine)
    batches = ShuffledBatches(old, cfg.data.batch_size, cfg.run.seed, engine.rank, engine.world_size)
    final = engine.fit(method, batches)
    if final["acc_old"] < cfg.base.min_accuracy:
        raise ConfigError(f"the base LM reached {final['acc_old']:.3f} on the old facts, below base.min_accuracy="
                          f"{cfg.base.min_accuracy}: not converged (raise base.max_steps or base.lr)")
    model_dir = ctx.dir / "model"
    engine.save_pretrained("model", model_dir)
    if ctx.is_main:
        tokenizer.save_pretrained(model_dir)
    ctx.barrier()
    return {"model_dir": str(model_dir), "steps": engine.step, "acc_old": final["acc_old"],
            "params": sum(p.numel() for p in model.parameters())}


def arm_stage(arm: str, seed: int):
    def fn(ctx: StageContext) -> dict:
        return continued_training(ctx, arm, seed)
    return fn


def continued_training(ctx: StageContext, arm: str, seed: int) -> dict:
    """From the base model: the replayed old facts plus additions opening one by one; SeND or not."""
    t0 = time.time()
    cfg = ctx.cfg
    data, split = load_facts(cfg.data)
    base_dir = ctx.results["base"]["model_dir"]
    tokenizer = load_tokenizer(base_dir)
    model = load_lm(base_dir, cfg.model.dtype)
    train_ids = sorted(set(split.replay) | set(split.new))
    row_of = {i: r for r, i in enumerate(train_ids)}
    train = _encode(tokenizer, cfg, [split.records[i] for i in train_ids])
    new_chunk = torch.tensor([c for c, chunk in enumerate(split.chunks) for _ in chunk])
    evals = {"old": _encode(tokenizer, cfg, [split.records[i] for i in split.old]),
             "new": _encode(tokenizer, cfg, [split.records[i] for i in split.new]),
             "tracking": _encode(tokenizer, cfg, [split.records[i] for i in split.tracking])}
    steps_per_addition = math.ceil(cfg.run.max_steps / cfg.data.additions)
    phase_len = steps_per_addition * cfg.engine.grad_accum
    method = ContinuedTraining(model, evals, new_chunk, phase_len, None if arm == "normal" else cfg.send,
                               cfg.engine.grad_accum, cfg.data.batch_size, cfg.eigenscore, tokenizer.eos_token_id,
                               random_control=arm == "random", seed=seed)
    engine = ctx.engine(seed=seed)
    method.setup(engine)
    stream = FactStream({k: v for k, v in train.items() if k != "answer_mask"},
                        [row_of[i] for i in split.replay], [[row_of[i] for i in c] for c in split.chunks],
                        phase_len, cfg.data.batch_size, seed, engine.rank)
    final = engine.fit(method, stream)
    # EigenScore's AUROC at flagging wrong answers, on every taught fact (old + new)
    taught = _encode(tokenizer, cfg, [split.records[i] for i in split.old + split.new])
    model_eval = method.model
    model_eval.eval()
    wrong = ~answer_matches(model_eval, taught)
    scores = sampled_eigenscores(model_eval, taught, cfg.eigenscore, tokenizer.eos_token_id, seed)
    result = {"arm": arm, "seed": seed, "final": final, "eigenscore_auroc": auroc(scores, wrong),
              "wrong": int(wrong.sum()), "answers": len(wrong),
              "eigenscore_mean_right": float(scores[~wrong].mean()) if (~wrong).any() else None,
              "eigenscore_mean_wrong": float(scores[wrong].mean()) if wrong.any() else None,
              "stopped_at": method.stopped_at, "reestimations": len(method.estimates),
              "dropped_last": method.estimates[-1]["dropped"] if method.estimates else [],
              "steps": engine.step}
    if cfg.experiment.save_models:
        engine.save_pretrained("model", ctx.dir / "model")
    result["seconds"] = time.time() - t0
    return result


def stages(cfg: SendPaperConfig) -> list[Stage]:
    out = [Stage("eigenscore_check", eigenscore_stage, describe="Gram-exact EigenScore vs float64 Cholesky"),
           Stage("base", base_stage, describe="base LM converged on the old facts")]
    for seed in cfg.experiment.seeds:
        for arm in cfg.experiment.arms:
            out.append(Stage(f"{arm}_s{seed}", arm_stage(arm, seed), needs=("base",),
                             describe=f"continued training, {arm}, seed {seed}"))
    return out


PAPER = Paper(name="send", config=SendPaperConfig, stages=stages, report=report, check=check, summary=summary,
              main_model="send_s0/model", card="transformers")  # saved with --experiment.save_models true
