"""Codebook Features as a runner paper: config, stages, report.

Stages (TokFSM, the tiny default): ``baseline`` (the transformer alone), ``codebook`` (the same
transformer with codebooks, dead-code replacement on), ``codebook_no_replace`` (replacement off,
for the dead-code comparison), ``analysis`` (transition accuracy, state features, purity, dead
codes, steering). With ``data.kind=text`` the same codebooks go on the pretrain corpus or any HF
causal LM (``model.name_or_path``) and the report gives the LM-loss cost of the bottleneck.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field

from athanor.config import ConfigError, OptimConfig, RunConfig, TrainConfig, choice, positive
from athanor.data.text import TextDataConfig, load_text_data
from athanor.hub import HubConfig, write_model_card
from athanor.runner import Paper, Stage, StageContext

from .layers import SITES, CodebookModel
from .method import CodebookLM
from .tokfsm import TokFSM, TokFSMConfig


@dataclass
class ModelConfig:
    name_or_path: str = ""  # any HF causal LM (hub id or local folder); empty: AthanorGPT built from the fields below
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4  # per-head codebooks have d_model / n_heads dims
    d_ff: int = 0  # 0: 4 * d_model
    position: str = "rotary"  # rotary | learned (learned absolute positions made codes position-dependent)

    def validate(self) -> None:
        choice(self.position, ("learned", "rotary"), "model.position")
        if not self.name_or_path and self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")


@dataclass
class CodebookConfig:
    # The paper's TokFSM setting (its fsm_main config): a codebook per attention head before the
    # output projection AND one on each MLP output, k=1. Heads alone carry only what attention
    # moves (at a state's last digit: the earlier digit), so no head tuple can name the state.
    sites: list[str] = field(default_factory=lambda: ["heads", "mlp"])  # heads | attn | mlp (any subset)
    layers: list[int] = field(default_factory=list)  # decoder layers with codebooks (empty: all)
    num_codes: int = 256  # codes per codebook (per head for the heads site)
    # Codes per codebook for some sites (others: num_codes). The MLP code is the whole MLP output, which
    # must name the next-token distribution (~100 states x digit positions): with 256 codes the
    # codebook model lost 4.4 points of transition accuracy, with 1024 2.8 (2 layers, 1000 steps).
    site_codes: dict[str, int] = field(default_factory=lambda: {"mlp": 1024})
    k: int = 1  # codes chosen per token
    reduce: str = "sum"  # sum | mean of the k codes
    recon_weight: float = 1.0  # weight of the reconstruction MSE next to the LM loss
    kmeans_iters: int = 10  # spherical k-means initialisation (0: random codes)
    replace_every: int = 100  # steps between dead-code replacements (0: never)
    replace_min_uses: float = 1.0  # a code chosen fewer times than this since the last check is dead
    compare_no_replacement: bool = True  # also train without replacement (dead-code comparison)
    freeze_lm: bool = False  # train only the codebooks (probe a pretrained LM); the baseline is then untrained
    # Where the codebook model's LM weights start: "baseline" (the trained baseline, codebooks inserted
    # and k-means-initialised on its activations: how the paper builds its language-model codebooks)
    # or "scratch" (the baseline's initialisation). From scratch, 1000 steps left the 100-state
    # TokFSM codebook model unconverged (eval loss 1.42-1.54 vs the baseline's 1.21) and its
    # transition accuracy swung 0.81-0.97 with the reconstruction weight alone.
    init: str = "baseline"
    steps: int = 0  # training steps of the codebook models (0: run.max_steps, as the baseline)
    # LR multiplier of the codes. At 1, the 100-state TokFSM codes fell behind their inputs (recon MSE
    # 1.4-2.5 in LayerNorm units, most codes dead, LM loss flat at ~log 10 from step 200 to 575).
    code_lr_scale: float = 1.0

    def validate(self) -> None:
        if not self.sites:
            raise ConfigError("codebook.sites is empty; choose from " + ", ".join(SITES))
        for site in self.sites:
            choice(site, SITES, "codebook.sites[]")
        choice(self.reduce, ("sum", "mean"), "codebook.reduce")
        positive(self.num_codes, "codebook.num_codes")
        for site, n in self.site_codes.items():
            choice(site, SITES, "codebook.site_codes key")
            positive(n, f"codebook.site_codes.{site}")
        smallest = min([self.num_codes, *self.site_codes.values()])
        if not 1 <= self.k <= smallest:
            raise ConfigError(f"codebook.k={self.k} must be in [1, {smallest}] (the smallest codebook)")
        positive(self.recon_weight, "codebook.recon_weight", allow_zero=True)
        positive(self.kmeans_iters, "codebook.kmeans_iters", allow_zero=True)
        positive(self.replace_every, "codebook.replace_every", allow_zero=True)
        positive(self.code_lr_scale, "codebook.code_lr_scale")
        choice(self.init, ("baseline", "scratch"), "codebook.init")
        positive(self.steps, "codebook.steps", allow_zero=True)


@dataclass
class DataConfig:
    kind: str = "tokfsm"  # tokfsm | text
    fsm: TokFSMConfig = field(default_factory=TokFSMConfig)
    text: TextDataConfig = field(default_factory=lambda: TextDataConfig(block_size=64, batch_size=16, max_chars=400_000))

    def validate(self) -> None:
        choice(self.kind, ("tokfsm", "text"), "data.kind")


@dataclass
class AnalysisConfig:
    prompt_states: int = 16  # states in a held-out prompt before generation
    new_states: int = 4  # states generated per prompt for transition accuracy
    steering_prompts: int = 8  # prompts per target state
    steering_targets: int = 0  # target states steered to (0: all)
    code_batch: int = 128  # sequences per analysis forward


@dataclass
class CodebookPaperConfig(TrainConfig):
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/codebook", max_steps=1000, log_every=25))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=50, schedule="cosine"))
    model: ModelConfig = field(default_factory=ModelConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    data: DataConfig = field(default_factory=DataConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    hub: HubConfig = field(default_factory=HubConfig)


def check(cfg: CodebookPaperConfig) -> None:
    a, fsm = cfg.analysis, cfg.data.fsm
    if cfg.data.kind == "tokfsm":
        if cfg.model.name_or_path:
            raise ConfigError("model.name_or_path needs data.kind=text (TokFSM trains its own small transformer)")
        if not 1 <= a.prompt_states < fsm.seq_states:
            raise ConfigError(f"analysis.prompt_states={a.prompt_states} must be in [1, data.fsm.seq_states={fsm.seq_states})")
        if fsm.eval_sequences < 2:
            raise ConfigError("data.fsm.eval_sequences must be >= 2 (half selects features, half measures them)")
    if cfg.codebook.layers and not cfg.model.name_or_path and max(cfg.codebook.layers) >= cfg.model.n_layers:
        raise ConfigError(f"codebook.layers={list(cfg.codebook.layers)}: the model has {cfg.model.n_layers} layers")


# ---------------------------------------------------------------------------- data and models
def load_data(cfg: CodebookPaperConfig) -> dict:
    """{'train', 'held_out': {'input_ids'}, 'vocab_size', 'seq_len', 'fsm' (TokFSM or None)}."""
    if cfg.data.kind == "tokfsm":
        fsm = TokFSM(cfg.data.fsm)
        sets = fsm.datasets()
        return {"train": sets["train"], "held_out": {"input_ids": sets["eval"]["input_ids"]}, "walks": sets["eval"]["states"],
                "vocab_size": fsm.vocab_size, "seq_len": fsm.seq_len, "fsm": fsm, "batch_size": cfg.data.fsm.batch_size}
    text = load_text_data(cfg.data.text)
    return {"train": {"input_ids": text.train_blocks}, "held_out": {"input_ids": text.eval_blocks}, "fsm": None,
            "vocab_size": len(text.tokenizer), "seq_len": text.train_blocks.shape[1], "batch_size": cfg.data.text.batch_size}


def build_lm(cfg: ModelConfig, vocab_size: int, seq_len: int):
    if cfg.name_or_path:
        from transformers import AutoModelForCausalLM

        import athanor.models  # noqa: F401  (AthanorGPT folders load through the Auto classes)

        lm = AutoModelForCausalLM.from_pretrained(cfg.name_or_path)
        if lm.config.vocab_size < vocab_size:
            raise ConfigError(f"model.name_or_path has a vocabulary of {lm.config.vocab_size}, the tokenizer {vocab_size}")
        return lm
    from athanor.models import AthanorGPT, AthanorGPTConfig

    # max_seq_len leaves room for the tokens generated after a full-length prompt
    return AthanorGPT(AthanorGPTConfig(vocab_size=vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                                       d_ff=cfg.d_ff, max_seq_len=seq_len + 16, position=cfg.position))


def attach(cfg: CodebookPaperConfig, lm, with_codebooks: bool) -> CodebookModel:
    cb = cfg.codebook
    if not with_codebooks:
        return CodebookModel(lm, sites=())
    return CodebookModel(lm, sites=cb.sites, layers=cb.layers, num_codes=cb.num_codes, k=cb.k, reduce=cb.reduce,
                         site_codes=cb.site_codes)


# ---------------------------------------------------------------------------- stages
def train_stage(with_codebooks: bool, replace: bool = True):
    def fn(ctx: StageContext) -> dict:
        cfg, cb = ctx.cfg, ctx.cfg.codebook
        data = load_data(cfg)
        frozen_baseline = cb.freeze_lm and not with_codebooks
        steps = 0 if frozen_baseline else (cb.steps or None) if with_codebooks else None
        engine = ctx.engine(max_steps=steps)
        if with_codebooks and cb.init == "baseline":
            from transformers import AutoModelForCausalLM

            import athanor.models  # noqa: F401  (registers AthanorGPT with the Auto classes)

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
    from .report import analysis_stage

    start = ("baseline",) if cfg.codebook.init == "baseline" else ()
    out = [Stage("baseline", train_stage(False), describe="the transformer without codebooks"),
           Stage("codebook", train_stage(True), needs=start, describe="the same transformer with codebooks")]
    if cfg.codebook.compare_no_replacement and cfg.codebook.replace_every:
        out.append(Stage("codebook_no_replace", train_stage(True, replace=False), needs=start,
                         describe="codebooks without dead-code replacement"))
    out.append(Stage("analysis", analysis_stage, needs=tuple(s.name for s in out),
                     describe="transition accuracy, state features, dead codes, steering"))
    return out


def publish_folder(ctx: StageContext, report: dict) -> None:
    """OUTPUT/model: the codebook model (LM + codebooks), loadable with CodebookModel.from_pretrained."""
    target = ctx.root / "model"
    shutil.copytree(ctx.results["codebook"]["model"], target, dirs_exist_ok=True)
    metrics = {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    write_model_card(target, title="Codebook Features model (athanor)", metrics=metrics, tags=["codebook-features"],
                     summary="A causal LM with codebook bottlenecks (Tamkin et al. 2024). Load with "
                             "`from athanor.methods.codebook import CodebookModel; "
                             "CodebookModel.from_pretrained(folder)` to keep the codebooks; "
                             "`AutoModelForCausalLM.from_pretrained(folder)` gives the LM without them.")


def make_paper() -> Paper:
    from .report import report, summary

    return Paper(name="codebook", config=CodebookPaperConfig, stages=stages, report=report, check=check, summary=summary)

