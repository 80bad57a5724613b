"""Typed recipe configs: dataclass defaults < ``--config file.yaml`` < dotted CLI overrides.

Every recipe declares one top-level dataclass whose fields are sections (``run``, ``optim``,
``engine``, ``model``, ``data``, ...). OmegaConf's structured configs do the merging and type
checking; this module turns their multi-line exceptions into the one-line errors a user should
see, and exits with code 2 before any model is built.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A bad config key, type, value or path. Recipes print it on one line and exit 2."""


def choice(value: Any, options: Sequence[Any], key: str) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, options))}")


def positive(value: float, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


NAME_MAX, PATH_MAX = 255, 4096  # bytes, as Linux file systems count them
MAX_CPU_THREADS = 1024  # engine.cpu_threads above this (and above this machine's CPUs) is a typo


def _path_text_problem(output_dir: str) -> str | None:
    """Why ``output_dir`` is no name to write a run under, whatever the disk says: control characters
    (a newline in a path breaks every log and script naming it), bytes that are not UTF-8, a name
    longer than the file system allows. (A ``#`` that YAML would cut off is refused with the
    command-line value; one kept verbatim is a valid name, quoted wherever athanor writes it.)"""
    bad = next((c for c in output_dir if not c.isprintable() and c != " "), None)
    if bad is not None and "\udc80" <= bad <= "\udcff":
        return f"is not valid UTF-8 (byte 0x{ord(bad) - 0xdc00:02x}); choose a UTF-8 name"
    if bad is not None:
        return f"holds the control character {bad!r}; choose a name without it"
    if len(output_dir.encode()) > PATH_MAX:
        return f"is longer than {PATH_MAX} bytes"
    long = next((part for part in Path(output_dir).parts if len(part.encode()) > NAME_MAX), None)
    if long is not None:
        return f"has a folder name longer than {NAME_MAX} bytes ({long[:20]}...)"
    return None


def _output_dir_problem(output_dir: str) -> str | None:
    """Why the run could not write into ``output_dir``, else None: checked at parse time so a
    typo costs one line, not a traceback after the model is built."""
    if not output_dir:
        return "is empty"
    problem = _path_text_problem(output_dir)
    if problem:
        return problem
    try:
        return _output_dir_disk_problem(Path(output_dir).absolute())
    except OSError as e:
        return f"cannot be inspected: {e.strerror}"


def _output_dir_disk_problem(path: Path) -> str | None:
    if path.exists() and not path.is_dir():
        return "is a file, not a folder"
    existing = path
    while not existing.exists() and existing != existing.parent:  # the folder it would be created in
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot be created: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"is not writable ({existing} does not let this user create or change files)"
    return None


# run.trackers name -> the package it needs
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "aim": "aim"}


@dataclass
class RunConfig:
    output_dir: str = "outputs/run"  # everything the run writes goes here
    seed: int = 0
    max_steps: int = 100  # optimizer steps of the primary model
    log_every: int = 1  # one metrics.jsonl line every N steps
    eval_every: int = 0  # 0: evaluate only at the start and the end
    save_every: int = 0  # 0: checkpoint only at the end (and on SIGUSR1/SIGTERM)
    keep_last: int = 2  # checkpoints kept; older ones are pruned
    resume: str = "auto"  # auto: newest complete checkpoint if any | none: refuse a used dir | a checkpoint path
    progress: bool = True  # tqdm bar on the main process
    # A NaN/inf loss or gradient: stop (exit 3, no checkpoint written for it) | skip (drop that
    # step's update and count it; nonfinite_limit dropped steps in a row of one model stop the run)
    on_nonfinite: str = "stop"
    nonfinite_limit: int = 5
    # Where metrics go besides metrics.jsonl: tensorboard | mlflow | wandb | aim (the installed ones);
    # a resumed or requeued run continues the same tracker run (athanor/engine/trackers.py)
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])

    def validate(self) -> None:
        choice(self.on_nonfinite, ("stop", "skip"), "run.on_nonfinite")
        positive(self.nonfinite_limit, "run.nonfinite_limit")
        positive(self.max_steps, "run.max_steps", allow_zero=True)
        positive(self.log_every, "run.log_every")
        positive(self.eval_every, "run.eval_every", allow_zero=True)
        positive(self.save_every, "run.save_every", allow_zero=True)
        positive(self.keep_last, "run.keep_last")
        for name in self.trackers:
            choice(name, tuple(TRACKER_PACKAGES), "run.trackers")
            if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
                raise ConfigError(f"run.trackers: {name} is not installed (pip install {TRACKER_PACKAGES[name]})")
        if not 0 <= self.seed < 2**32:  # what numpy (seeded with torch and random) accepts
            raise ConfigError(f"run.seed={self.seed} must be in [0, 2**32 - 1]")
        problem = _output_dir_problem(self.output_dir)
        if problem:
            raise ConfigError(f"run.output_dir={self.output_dir!r} {problem}")
        if self.resume not in ("auto", "none") and not Path(self.resume).is_dir():
            raise ConfigError(f"run.resume={self.resume!r}: expected auto, none or an existing checkpoint directory")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    # Wortsman et al.: decay by lambda * s_t (schedule multiplier), not lambda * lr_t.
    independent_weight_decay: bool = False
    warmup_steps: int = 0
    schedule: str = "cosine"  # constant | cosine | linear (all after linear warm-up)
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio for cosine/linear
    grad_clip: float = 1.0  # 0 disables clipping

    def validate(self) -> None:
        choice(self.name, ("adamw", "sgd"), "optim.name")
        choice(self.schedule, ("constant", "cosine", "linear"), "optim.schedule")
        positive(self.lr, "optim.lr")
        positive(self.eps, "optim.eps")
        positive(self.weight_decay, "optim.weight_decay", allow_zero=True)
        positive(self.warmup_steps, "optim.warmup_steps", allow_zero=True)
        positive(self.grad_clip, "optim.grad_clip", allow_zero=True)
        if not (0 <= self.min_lr_ratio <= 1):
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)} must be in [0, 1)")


@dataclass
class EngineConfig:
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 needs a GPU)
    grad_accum: int = 1  # micro-batches per optimizer step
    cpu: bool = False  # force CPU even when CUDA is available
    # torch threads per process on CPU (0: torch's default, every core). Tiny models: one thread is as fast, and two
    # threads on two loaded cores measured 16x slower per step. OMP_NUM_THREADS, when set, wins.
    cpu_threads: int = 1
    # torch.compile (inductor) every registered model, through accelerate. The first steps pay the
    # compilation (~40 s for the tiny pretrain model on an idle CPU); its speed effect is not measured yet.
    compile: bool = False
    # Recompute each layer's activations in backward instead of keeping them (built-in GPT: per block;
    # HF models: their own gradient checkpointing): less activation memory for one more forward.
    activation_checkpointing: bool = False

    def validate(self) -> None:
        choice(self.mixed_precision, ("no", "bf16", "fp16"), "engine.mixed_precision")
        positive(self.grad_accum, "engine.grad_accum")
        positive(self.cpu_threads, "engine.cpu_threads", allow_zero=True)
        # torch would start that many OpenMP threads per process. A config may be written for a bigger
        # machine (the runner uses at most this one's CPUs), so only a number no machine has is refused.
        most = max(MAX_CPU_THREADS, os.cpu_count() or 1)
        if self.cpu_threads > most:
            raise ConfigError(f"engine.cpu_threads={self.cpu_threads} is more than any machine's CPUs (at most "
                              f"{most}; 0: torch's default)")


@dataclass
class TrainConfig:
    """The sections every recipe shares; recipes subclass it and add model/data/method sections."""

    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


def _valid_keys_message(schema: Any, full_key: str) -> str:
    parent_path, _, leaf = full_key.rpartition(".")
    parent = OmegaConf.select(schema, parent_path) if parent_path else schema
    if not OmegaConf.is_dict(parent):
        return f"unknown config key '{full_key}'"
    valid = list(parent.keys())
    guess = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" (did you mean '{(parent_path + '.' if parent_path else '') + guess[0]}'?)" if guess else ""
    where = f"in '{parent_path}'" if parent_path else "at the top level"
    return f"unknown config key '{full_key}'{hint}; valid keys {where}: {', '.join(map(str, valid))}"


def _cli_to_dotlist(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``--config a.yaml --optim.lr 3e-4 --run.seed=1`` into config files and a dotlist."""
    files, dotlist = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        problem = _cli_value_problem(value)
        if problem:
            raise ConfigError(f"--{key} {problem}")
        if key == "config":
            files.append(value)
        else:
            dotlist.append(f"{key}={value}")
    return files, dotlist


def _cli_value_problem(value: str) -> str | None:
    """A command-line value YAML would not read back as typed: control characters (a newline is
    folded into a space), bytes that are not UTF-8."""
    bad = next((c for c in value if not c.isprintable() and c not in " \t"), None)
    if bad is None:
        return None
    if "\udc80" <= bad <= "\udcff":
        return f"value is not valid UTF-8 (byte 0x{ord(bad) - 0xdc00:02x})"
    return f"value holds the control character {bad!r}"


def _parse_override(item: str) -> Any:
    """One ``key=value`` as YAML reads it. A plain (unquoted) string must come back as typed: a
    `` #`` would start a comment and drop the rest silently. Tags (``!!python/object``) and other
    YAML errors are one line naming the key."""
    import yaml

    key, _, raw = item.partition("=")
    try:
        layer = OmegaConf.from_dotlist([item])
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"bad value for --{key} {raw!r}: {str(e).splitlines()[0]}") from None
    parsed = OmegaConf.to_container(layer, resolve=False)  # ${...} stays as typed
    for part in key.split("."):
        parsed = parsed.get(part) if isinstance(parsed, dict) else None
    if isinstance(parsed, str) and raw.strip()[:1] not in ("'", '"') and parsed != raw.strip():
        raise ConfigError(f"bad value for --{key} {raw!r}: YAML reads it as {parsed!r} (a ' #' starts a "
                          f"comment); quote it to keep it whole")
    return layer


def _load_yaml(path: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(p)
    except Exception as e:  # yaml errors span lines; keep the first
        raise ConfigError(f"cannot read config file {path}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    if not OmegaConf.is_dict(loaded):
        raise ConfigError(f"config file {path} holds a {type(loaded).__name__.replace('Config', '').lower()}, "
                          f"expected a mapping of sections (run:, optim:, ...)")
    return loaded


def _reject_nonfinite(obj: Any, prefix: str = "") -> None:
    """No config value may be NaN or inf (``--optim.lr nan`` passes every ``x > 0`` check and
    trains to NaN); lists and tuples of numbers included."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            _reject_nonfinite(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _reject_nonfinite(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _reject_nonfinite(v, f"{prefix}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ConfigError(f"{prefix}={obj} must be a finite number")


def _validate_tree(obj: Any, path: str = "") -> None:
    """Every section's ``validate()``; one that takes an argument gets its dotted path, so a section
    class used twice (``teacher: MLPConfig``, ``student: MLPConfig``) names the right keys."""
    if dataclasses.is_dataclass(obj):
        if hasattr(obj, "validate"):
            obj.validate(path) if inspect.signature(obj.validate).parameters else obj.validate()
        for f in dataclasses.fields(obj):
            _validate_tree(getattr(obj, f.name), f"{path}.{f.name}" if path else f.name)


def load_config(cls: type, argv: Sequence[str] | None = None) -> Any:
    """Build ``cls`` from defaults, ``--config`` files and dotted overrides; raise ConfigError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    schema = OmegaConf.structured(cls)
    files, dotlist = _cli_to_dotlist(argv)
    layers = [_load_yaml(f) for f in files]
    layers.extend(_parse_override(item) for item in dotlist)
    merged = schema
    for layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except ConfigKeyError as e:
            raise ConfigError(_valid_keys_message(schema, e.full_key)) from None
        except ValidationError as e:
            raise ConfigError(f"bad value for '{e.full_key}': {str(e).splitlines()[0]}") from None
        except (OmegaConfBaseException, TypeError) as e:
            raise ConfigError(f"bad config: {str(e).splitlines()[0]}") from None
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad config: {str(e).splitlines()[0]}") from None
    _reject_nonfinite(config)
    _validate_tree(config)
    return config


def to_dict(config: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def parse_or_exit(cls: type, argv: Sequence[str] | None = None) -> Any:
    """Recipe entry point: a config, or one line on stderr and exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(f"usage: {Path(sys.argv[0]).name} [--config FILE.yaml ...] [--section.key VALUE ...]\n")
        print(to_yaml(cls()))
        sys.exit(0)
    try:
        return load_config(cls, args)
    except ConfigError as e:
        _say_once(e)
        sys.exit(2)


def _say_once(error: Exception) -> None:
    """The error line, from the main process only: under ``accelerate launch`` every process meets
    the same bad value (or refused resume), and the user reads it once."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {_redacted(error)}", file=sys.stderr, flush=True)


def _redacted(error: Exception) -> str:
    """The message without URL credentials or secret values (a value may be a URL with a password)."""
    from .redact import redact

    return redact(str(error))


class exit_on_config_error:
    """Context manager: a ``ConfigError`` raised while setting up becomes one line + exit 2."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, ConfigError):
            _say_once(exc)
            sys.exit(2)
        return False


def config_text(config: Any) -> str:
    """The YAML ``save_config`` writes. A secret a value holds (``${oc.env:HF_TOKEN}`` resolves to
    the token) is written back as its ``${oc.env:NAME}`` reference: the file never holds the token
    and still loads to the same value where the variable is set."""
    from .redact import secret_values, unresolve_secrets

    text = to_yaml(config)
    secrets = secret_values()
    if any(value in text for value in secrets):
        text = OmegaConf.to_yaml(unresolve_secrets(OmegaConf.to_container(OmegaConf.structured(config)), secrets))
    return text


def save_config(config: Any, output_dir: str | Path) -> Path:
    """``OUTPUT/config.yaml`` (``config_text``), written through a temporary name and renamed over
    the old one: a full disk leaves the previous file whole."""
    path = Path(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".config.yaml.tmp")
    try:
        tmp.write_text(config_text(config))
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return path
