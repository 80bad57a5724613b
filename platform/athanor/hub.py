"""Hugging Face Hub side: model cards for finished runs, and publishing them.

``publish`` (``athanor publish OUTPUT --repo-id user/name``, or ``hub.push_to_hub`` at the end of
a recipe) assembles an upload folder from a finished run (weights, tokenizer/adapter/pipeline,
resolved config, report and plots, a generated model card) and sends it with
``HfApi.upload_folder`` over HTTP. ``HF_TOKEN`` and ``HF_ENDPOINT`` are honoured; offline,
unreachable, unanswering (``ATHANOR_HUB_TIMEOUT`` seconds per request, ``ATHANOR_HUB_DEADLINE`` per
call: ``hub_http``) or unauthorised ends in one line, with credentials in URLs and the token shown
as ``***``. The staging folder is one publish made itself (marked by ``.athanor-upload``): a folder
it did not make is never emptied; a read-only run folder is staged in a temporary one. Nothing
outside the run folder is read: symbolic links are skipped (one line names them). The card is
``hub_card``'s.
"""
from __future__ import annotations

import errno
import fnmatch
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import ModelCard
from huggingface_hub.errors import OfflineModeIsEnabled

from .config import ConfigError
from .hub_http import HUB_TIMEOUT_S, HubError, PublishInputError, hub_deadline, hub_error, hub_timeout  # noqa: F401
from .hub_http import with_deadline
from .hub_card import BOOKKEEPING_KEYS, build_model_card, write_model_card  # noqa: F401
from .hub_card import own_dir as _own_dir
from .hub_card import own_file as _own_file
from .redact import holds_secret, redact
from .runfiles import read_run_record


# ---------------------------------------------------------------- publishing

HUB_UPLOAD_DIR = "hub_upload"  # default staging folder inside a run's output dir
ARTIFACT_MARKERS = ("model_index.json", "adapter_config.json", "config.json")  # diffusers, peft, transformers
NOT_ARTIFACTS = {"checkpoints", "tensorboard", HUB_UPLOAD_DIR, "slurm"}
RUN_FILES = ("report.md", "report.json", "metrics.jsonl")  # copied beside the weights, with *.png plots
# Optimizer state as accelerate and DeepSpeed write it into checkpoints; uploaded only when asked.
OPTIMIZER_PATTERNS = ("optimizer*", "*optim_states*", "scheduler*")
# Checkpoint files only a Python-object loader reads (DeepSpeed's ZeRO shards, anything planted beside
# ours): never uploaded, so resuming from a downloaded checkpoint runs no code from it.
CODE_LOADED_PATTERNS = ("*.pt", "*.pth", "*.bin", "*.pkl", "*.ckpt", "zero_to_*.py")  # and the scripts that read them
STAGING_MARKER = ".athanor-upload"  # in a staging folder publish made: only such a folder is ever emptied


def repo_id_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` is not a Hub ``user/name`` (or ``org/name``), else None. huggingface_hub's
    own validator decides; a namespace is required since a run is published to someone's account."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        return "expected user/name or org/name"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        return f"expected user/name or org/name ({str(e).splitlines()[0].split(':')[0]})"
    if not repo_id.isprintable() or any(c.isspace() for c in repo_id):  # belt and braces: no newline, tab, ...
        return "expected user/name or org/name (no spaces or control characters)"
    return None


@dataclass
class HubConfig:
    push_to_hub: bool = False  # upload the finished run (as `athanor publish` does) at the end of the recipe
    repo_id: str = ""  # user/name or org/name; created if missing
    private: bool = False  # create the repository as private
    include_checkpoint: bool = False  # also upload the newest checkpoint (weights, trainer state)
    include_optimizer_state: bool = False  # ... with its optimizer state (large; off unless asked)

    def validate(self) -> None:
        if self.push_to_hub and not self.repo_id:
            raise ConfigError("hub.push_to_hub=true needs hub.repo_id (user/name)")
        problem = repo_id_problem(self.repo_id) if self.repo_id else None
        if problem:
            raise ConfigError(f"hub.repo_id={self.repo_id!r}: {problem}")


@dataclass
class PublishResult:
    folder: Path  # the assembled upload folder
    repo_id: str
    url: str | None  # the commit's URL; None on a dry run
    card: ModelCard


def find_artifacts(output_dir: Path, main: str = "") -> list[Path]:
    """Folders under ``output_dir`` that ``from_pretrained`` loads (a transformers model, a peft
    adapter, a diffusers pipeline), main one first: the one the paper declares (``main``, relative
    to the run folder), else the run folder itself, then ``model/``, then the rest by path.
    Checkpoints, TensorBoard and staging folders are not artifacts."""
    found: list[Path] = []

    def visit(folder: Path) -> None:
        if any(_own_file(folder / m) for m in ARTIFACT_MARKERS):
            found.append(folder)  # a pipeline's unet/ or vae/ belongs to it: do not descend
            return
        for child in sorted(p for p in folder.iterdir() if _own_dir(p)):  # never into a linked folder
            if (child.name not in NOT_ARTIFACTS and not child.name.startswith(".")
                    and not (child / STAGING_MARKER).exists()):  # an earlier upload folder is no artifact
                visit(child)

    visit(output_dir)
    declared = (output_dir / main) if main else None
    found.sort(key=lambda p: (p != declared, p != output_dir, p != output_dir / "model", str(p)))
    return found


def _links_skipped(names: list[str]) -> None:
    """One line for every symbolic link publish left out: it reads nothing outside the run folder."""
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        print(f"warning: publish skipped {len(names)} symbolic link(s), since it uploads nothing from outside "
              f"the run folder: {shown}", file=sys.stderr, flush=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # weights can be large: a hard link costs nothing
    except OSError:
        shutil.copy2(src, dst)


def _copy_text_without_secrets(src: Path, dst: Path) -> None:
    """Run files (config, report, metrics) go to the Hub: a secret in one (a config.yaml written
    before secrets were kept out, a URL with a password) is uploaded as ``***``."""
    text = src.read_text(encoding="utf-8", errors="replace")
    if not holds_secret(text):
        _link_or_copy(src, dst)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(redact(text), encoding="utf-8")


def _prepare_staging(stage: Path, out: Path) -> None:
    """Make ``stage`` an empty upload folder. Only a folder an earlier publish made (it holds
    ``STAGING_MARKER``) is emptied; an empty folder is taken; anything else is refused, so a
    mistaken ``--staging-dir`` (the run's checkpoints, a home folder) loses nothing."""
    if stage == out or out.is_relative_to(stage):
        raise PublishInputError(f"staging folder {stage} must not contain the run folder")
    if stage.is_symlink() or (stage.exists() and not stage.is_dir()):
        raise PublishInputError(f"staging folder {stage} is not a folder publish made; choose a new path")
    if stage.exists() and any(stage.iterdir()):
        if not (stage / STAGING_MARKER).is_file():
            raise PublishInputError(f"staging folder {stage} exists and was not made by athanor publish "
                                    f"(no {STAGING_MARKER}); nothing in it was touched: choose a new or empty folder")
        for child in stage.iterdir():  # our own earlier upload folder: replace its contents
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    stage.mkdir(parents=True, exist_ok=True)
    (stage / STAGING_MARKER).write_text("made by athanor publish; emptied by the next publish into it\n")


def _copy_tree(src: Path, dst: Path, skip: tuple[str, ...] = (), links: list[str] | None = None) -> None:
    """The regular files under ``src`` (links neither followed nor copied: named in ``links``)."""
    for folder, dirs, names in os.walk(src):  # followlinks=False: a linked folder is listed, not entered
        here = Path(folder)
        for name in sorted(names + [d for d in dirs if (here / d).is_symlink()]):
            path, rel = here / name, (here / name).relative_to(src)
            if any(fnmatch.fnmatch(part, pat) for part in rel.parts for pat in skip):
                continue
            if not _own_file(path):
                if links is not None and path.is_symlink():
                    links.append(path.as_posix())
                continue
            _link_or_copy(path, dst / rel)


def build_upload_folder(output_dir: str | Path, repo_id: str, staging_dir: str | Path | None = None, *,
                        include_checkpoint: bool = False, include_optimizer_state: bool = False,
                        command: str | None = None) -> tuple[Path, ModelCard]:
    """Assemble what goes to the Hub: the main model/adapter/pipeline at the top (loadable with
    ``from_pretrained(folder)``), other saved models under their run-relative paths, the resolved
    config as ``training_config.yaml``, report and plots, and a generated ``README.md``.
    Checkpoints only when asked, and their optimizer state only when asked again."""
    out = Path(output_dir).resolve()
    if not out.is_dir():
        raise PublishInputError(f"no such run folder: {output_dir}")
    record = read_run_record(out)  # what the paper declared: its main model, its card's kind; the command
    artifacts = find_artifacts(out, record.get("main_model") or "")
    if not artifacts:
        raise PublishInputError(f"{output_dir} holds no saved model (config.json, adapter_config.json or "
                                f"model_index.json): has the run finished?")
    if record.get("main_model") and artifacts[0] != out / record["main_model"]:
        raise PublishInputError(f"{output_dir}: the paper's main model {record['main_model']} is not saved there "
                                f"(has the run finished?)")
    stage = _staging_folder(out, staging_dir, artifacts)
    links: list[str] = []
    try:
        main = _fill_upload_folder(stage, out, artifacts, links, include_checkpoint, include_optimizer_state)
        files = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*")
                       if p.is_file() and p.name not in ("README.md", STAGING_MARKER))
        card = build_model_card(out, main, repo_id, ["README.md", *files], command or record.get("command"),
                                kind=record.get("card") or "", model_class=record.get("model_class") or "")
        (stage / "README.md").unlink(missing_ok=True)  # may be a hard link to the run's own card
        card.save(stage / "README.md")
    except OSError as e:  # a full disk, a folder that turned read-only: one line, the run folder untouched
        raise HubError(f"cannot build the upload folder in {stage}: {e.strerror or e}") from None
    _links_skipped([Path(link).relative_to(out).as_posix() for link in links])
    return stage, card


def _staging_folder(out: Path, staging_dir: str | Path | None, artifacts: list[Path]) -> Path:
    """The emptied upload folder: ``--staging-dir``, else ``OUTPUT/hub_upload``, else (the run folder
    is read-only) a new temporary folder, said on one line."""
    stage = Path(staging_dir).absolute() if staging_dir else out / HUB_UPLOAD_DIR
    stage = stage.parent.resolve() / stage.name  # the folder itself, if a link, is refused rather than followed
    if any(a == stage or a.is_relative_to(stage) or stage.is_relative_to(a) for a in artifacts):
        raise PublishInputError(f"staging folder {stage} must not be or hold a saved model of the run")
    try:
        _prepare_staging(stage, out)
        return stage
    except OSError as e:
        if staging_dir or e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise PublishInputError(f"cannot make the upload folder {stage}: {e.strerror or e}") from None
    stage = Path(tempfile.mkdtemp(prefix="athanor-upload-"))
    _prepare_staging(stage, out)
    print(f"note: {out} is not writable: the upload folder is built in {stage} (--staging-dir chooses where)",
          file=sys.stderr, flush=True)
    return stage


def _fill_upload_folder(stage: Path, out: Path, artifacts: list[Path], links: list[str],
                        include_checkpoint: bool, include_optimizer_state: bool) -> Path:
    """Copy (hard-link) the run's own files into ``stage``; returns the main artifact."""
    main = artifacts[0]
    for artifact in artifacts:
        _copy_tree(artifact, stage if artifact == main else stage / artifact.relative_to(out), links=links)
    run_files = [("config.yaml", "training_config.yaml"), *((f, f) for f in RUN_FILES)]
    plots = [(p.relative_to(out).as_posix(),) * 2 for p in _plots(out, artifacts)]  # a stage's too, at its path
    for name, target in run_files + plots:
        path = out / name
        if path.is_symlink():
            links.append(path.as_posix())
        elif _own_file(path) and path.suffix == ".png":
            _link_or_copy(path, stage / target)
        elif _own_file(path):
            _copy_text_without_secrets(path, stage / target)
    if include_checkpoint or include_optimizer_state:
        from .engine.checkpoint import latest_verified_checkpoint

        ckpt = latest_verified_checkpoint(out)
        if ckpt is None:
            raise PublishInputError(f"{out} has no checkpoint (that verifies against its manifest) to include")
        if not _own_dir(ckpt):
            raise PublishInputError(f"checkpoint {ckpt} is reached through a symbolic link: publish reads nothing "
                                    f"outside the run folder")
        skip = CODE_LOADED_PATTERNS + (() if include_optimizer_state else OPTIMIZER_PATTERNS)
        _copy_tree(ckpt, stage / "checkpoint" / ckpt.name, skip=skip, links=links)
    return main


def _plots(out: Path, artifacts: list[Path]) -> list[Path]:
    """Every ``*.png`` of the run (the root's and each stage's), outside saved models (copied with
    them), checkpoints, TensorBoard, upload folders and linked folders (never entered)."""
    found = []
    for folder, dirs, names in os.walk(out):  # followlinks=False
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if d not in NOT_ARTIFACTS and not d.startswith(".")
                         and here / d not in artifacts and not (here / d / STAGING_MARKER).exists())
        found += [here / n for n in sorted(names) if n.endswith(".png")]
    return found


def publish(output_dir: str | Path, repo_id: str, *, private: bool = False, dry_run: bool = False,
            staging_dir: str | Path | None = None, include_checkpoint: bool = False,
            include_optimizer_state: bool = False, token: str | None = None, endpoint: str | None = None,
            command: str | None = None) -> PublishResult:
    """Build the upload folder and, unless ``dry_run``, create the repo and ``upload_folder`` it
    (HTTP). ``HF_TOKEN`` and ``HF_ENDPOINT`` are honoured; failures raise ``HubError``."""
    problem = repo_id_problem(repo_id or "")
    if problem:
        raise PublishInputError(f"--repo-id {repo_id!r}: {problem}")
    folder, card = build_upload_folder(output_dir, repo_id, staging_dir, include_checkpoint=include_checkpoint,
                                       include_optimizer_state=include_optimizer_state, command=command)
    if dry_run:
        return PublishResult(folder, repo_id, None, card)
    from huggingface_hub import HfApi, constants, get_token

    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    if constants.HF_HUB_OFFLINE:
        raise hub_error(OfflineModeIsEnabled(), endpoint, repo_id)
    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN (with write access) or run `hf auth login`")
    hub_timeout(), hub_deadline()  # a bad ATHANOR_HUB_TIMEOUT/DEADLINE is bad input (exit 2), said before any call
    api = HfApi(endpoint=endpoint, token=token)
    # Belt and braces: the folder holds no optimizer state unless asked, and the upload skips it too.
    ignore = [STAGING_MARKER, *([] if include_optimizer_state else [f"**/{p}" for p in OPTIMIZER_PATTERNS])]
    try:  # each call within ATHANOR_HUB_DEADLINE seconds, each request within ATHANOR_HUB_TIMEOUT
        with_deadline(lambda: api.create_repo(repo_id, private=private, exist_ok=True), "creating the repository")
        info = with_deadline(lambda: api.upload_folder(
            folder_path=folder, repo_id=repo_id, ignore_patterns=ignore,
            commit_message=f"athanor publish {Path(output_dir).name}"), "the upload")
    except Exception as e:  # every failure becomes one line; the folder stays for a retry
        raise hub_error(e, endpoint, repo_id) from None
    return PublishResult(folder, repo_id, getattr(info, "commit_url", None) or str(info), card)


def maybe_publish(hub: HubConfig, output_dir: str | Path, *, is_main: bool | None = None) -> PublishResult | None:
    """End of a recipe: publish when ``hub.push_to_hub`` is set (main process only). A failed
    upload prints one line (the outputs stay on disk for ``athanor publish``) and exits 1."""
    if not hub.push_to_hub:
        return None
    if is_main is None:
        is_main = int(os.environ.get("RANK", "0")) == 0
    if not is_main:
        return None
    recorded = read_run_record(output_dir).get("command")  # the recipe's own arguments, as RUN.json has them
    command = recorded or " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    try:
        result = publish(output_dir, hub.repo_id, private=hub.private, include_checkpoint=hub.include_checkpoint,
                         include_optimizer_state=hub.include_optimizer_state, command=command)
    except HubError as e:
        print(f"error: publishing to {hub.repo_id} failed: {e} (outputs are in {output_dir}; retry with "
              f"`athanor publish {output_dir} --repo-id {hub.repo_id}`)", file=sys.stderr)
        sys.exit(1)
    print(f"published {output_dir} to {redact(str(result.url))}")  # an endpoint URL may carry a password
    return result
