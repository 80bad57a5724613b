"""SeND's declared stages and ``PAPER``: an EigenScore exactness check, the starting point, then every
arm (normal, SeND, random-neuron dropout) trained for each seed.

    eigenscore_check -> base -> normal_s<seed>, send_s<seed>, random_s<seed> (for every seed) -> report

The default starting point is the paper's regime: from scratch (a GPT-NeoX initialised from the run
seed) or an early checkpoint of a pretrained LM (``model.name_or_path`` + ``model.revision``, e.g.
Pythia's ``step1000``); ``data.old_people`` > 0 trains a base on old facts first instead. Every arm of
one seed starts from the same weights and sees the same stream of batches (the stream and the
initialisation depend on the seed only), so the arms are paired by seed.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ...config import ConfigError, OptimConfig
from ...data import ShuffledBatches
from ...parts.lm import AnswerLM, answer_matches, build_lm, encode_records, load_tokenizer
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
    if cfg.data.old_people and not cfg.model.name_or_path and cfg.base.max_steps == 0:
        raise ConfigError("base.max_steps=0 needs a model.name_or_path that already knows the old facts")
    if cfg.model.revision and not cfg.model.name_or_path:
        raise ConfigError("model.revision needs a model.name_or_path")


def load_pretrained(model_cfg, folder: str | None = None, cache_dir: str | None = None):
    """``from_pretrained`` of ``folder`` (a saved base) or of model.name_or_path at model.revision."""
    name = folder or model_cfg.name_or_path
    revision = None if folder or not model_cfg.revision else model_cfg.revision
    try:
        return AutoModelForCausalLM.from_pretrained(name, revision=revision, cache_dir=cache_dir,
                                                    dtype=getattr(torch, model_cfg.dtype))
    except Exception as e:
        raise ConfigError(f"model {name!r} (revision {revision!r}): {str(e).splitlines()[0][:200]}") from None


def load_pretrained_tokenizer(model_cfg, folder: str | None = None, cache_dir: str | None = None):
    name = folder or model_cfg.name_or_path
    revision = None if folder or not model_cfg.revision else model_cfg.revision
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=revision, cache_dir=cache_dir)
    except Exception as e:
        raise ConfigError(f"tokenizer {name!r} (revision {revision!r}): {str(e).splitlines()[0][:200]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def _encode(tokenizer, cfg: SendPaperConfig, records) -> dict:
    return encode_records(tokenizer, records, cfg.data.prompt_template, cfg.data.max_length)


# ---------------------------------------------------------------------------- stages
def eigenscore_stage(ctx: StageContext) -> dict:
    """Gram-exact log det vs a float64 dense Cholesky log det on random embeddings."""
    return random_eigenscore_check(samples=ctx.cfg.eigenscore.samples, alpha=ctx.cfg.eigenscore.alpha)


def base_stage(ctx: StageContext) -> dict:
    """The starting point: from scratch (the tokenizer only; each seed initialises its own model), a
    pretrained checkpoint as is, or (data.old_people > 0) a base LM trained on the old facts."""
    cfg = ctx.cfg
    data, split = load_facts(cfg.data)
    if cfg.model.name_or_path and (cfg.base.max_steps == 0 or not cfg.data.old_people):
        return {"model_dir": None, "pretrained": cfg.model.name_or_path, "revision": cfg.model.revision, "steps": 0}
    tokenizer = (load_pretrained_tokenizer(cfg.model) if cfg.model.name_or_path
                 else make_tokenizer(cfg.data, data, ""))
    if not cfg.data.old_people:  # from scratch
        tok_dir = ctx.dir / "tokenizer"
        if ctx.is_main:
            tokenizer.save_pretrained(tok_dir)
        ctx.barrier()
        return {"model_dir": None, "tokenizer_dir": str(tok_dir), "from_scratch": True, "steps": 0}
    old = _encode(tokenizer, cfg, [split.records[i] for i in split.old])
    model = load_pretrained(cfg.model) if cfg.model.name_or_path else build_lm(cfg.model, len(tokenizer),
                                                                                cfg.data.max_length)
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


def starting_point(cfg: SendPaperConfig, base: dict, seed: int):
    """(tokenizer, model) every arm of ``seed`` starts from: the same weights for every arm."""
    if base.get("from_scratch"):
        tokenizer = load_tokenizer(base["tokenizer_dir"])
        torch.manual_seed(10_007 + seed)  # the initialisation depends on the seed only (pairing across arms)
        return tokenizer, build_lm(cfg.model, len(tokenizer), cfg.data.max_length)
    if base.get("model_dir"):
        return load_tokenizer(base["model_dir"]), load_pretrained(cfg.model, base["model_dir"])
    return load_pretrained_tokenizer(cfg.model), load_pretrained(cfg.model)


def continued_training(ctx: StageContext, arm: str, seed: int) -> dict:
    """One arm from the starting point: the replayed old facts (if any) plus additions opening one by one."""
    t0 = time.time()
    cfg = ctx.cfg
    data, split = load_facts(cfg.data)
    tokenizer, model = starting_point(cfg, ctx.results["base"], seed)
    train_ids = sorted(set(split.replay) | set(split.new))
    row_of = {i: r for r, i in enumerate(train_ids)}
    train = _encode(tokenizer, cfg, [split.records[i] for i in train_ids])
    chunk_of_group = {split.records[c[0]].group: -1 for c in [split.old] if c}
    chunk_of_group.update({split.records[i].group: c for c, chunk in enumerate(split.chunks) for i in chunk})
    evals, chunk_of = {}, {}
    for name, ids in (("train", split.old + split.new), ("test", split.test), ("tracking", split.tracking)):
        evals[name] = _encode(tokenizer, cfg, [split.records[i] for i in ids])
        chunk_of[name] = torch.tensor([chunk_of_group.get(split.records[i].group, -1) for i in ids])
    steps_per_addition = math.ceil(cfg.run.max_steps / cfg.data.additions)
    phase_len = steps_per_addition * cfg.engine.grad_accum
    send_cfg = dataclasses.replace(cfg.send, drop=arm != "normal")
    method = ContinuedTraining(model, evals, chunk_of, phase_len, send_cfg, cfg.engine.grad_accum,
                               cfg.data.batch_size, cfg.eigenscore, tokenizer.eos_token_id,
                               random_control=arm == "random", seed=seed)
    engine = ctx.engine(seed=seed)
    method.setup(engine)
    stream = FactStream({k: v for k, v in train.items() if k != "answer_mask"},
                        [row_of[i] for i in split.replay], [[row_of[i] for i in c] for c in split.chunks],
                        phase_len, cfg.data.batch_size, seed, engine.rank)
    final = engine.fit(method, stream)
    # EigenScore's AUROC at flagging wrong answers on the held-out test phrasings (final model)
    model_eval = method.model
    model_eval.eval()
    test = evals["test"]
    wrong = ~answer_matches(model_eval, test)
    scores = sampled_eigenscores(model_eval, test, cfg.eigenscore, tokenizer.eos_token_id, seed)
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
           Stage("base", base_stage, describe="the starting point (from scratch, a checkpoint, or a base on old facts)")]
    for seed in cfg.experiment.seeds:
        for arm in cfg.experiment.arms:
            out.append(Stage(f"{arm}_s{seed}", arm_stage(arm, seed), needs=("base",),
                             describe=f"continued training, {arm}, seed {seed}"))
    return out


PAPER = Paper(name="send", config=SendPaperConfig, stages=stages, report=report, check=check, summary=summary,
              main_model="send_s0/model", card="transformers")  # saved with --experiment.save_models true
