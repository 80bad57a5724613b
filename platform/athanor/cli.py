"""``athanor``: submit recipes to SLURM, watch and cancel jobs, publish finished runs to the Hub.

    athanor submit --nodes 2 --gpus-per-node 8 --partition gpu --time 4:00:00 \\
        --launch-config launch/zero3.yaml recipes/o3.py --optim.lr 3e-4
    athanor submit --nodes 2 --cpus-per-task 1 --wait recipes/pretrain.py --run.max_steps 20
    athanor status [JOB ...]          # squeue for your jobs, or state/exit/log of given jobs
    athanor cancel JOB [--signal USR1] # stop; with USR1: checkpoint, requeue, resume
    athanor publish outputs/pretrain --repo-id you/tiny-gpt [--private] [--dry-run]
    athanor tokenize corpus.tokens --data.source corpus/ --data.streaming true   # for --data.token_file

Errors are one line on stderr: exit 2 for bad input, 1 for a failed SLURM or Hub call.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from . import cluster


def _submit(args: argparse.Namespace) -> int:
    spec = cluster.JobSpec(
        recipe=args.recipe, recipe_args=args.recipe_args, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        procs_per_node=args.procs_per_node, cpus_per_task=args.cpus_per_task, partition=args.partition,
        time=args.time, launch_config=args.launch_config, job_name=args.job_name,
        signal_grace_s=args.signal_grace, port=args.port, log_dir=args.log_dir, sbatch_args=args.sbatch_arg,
        setup=args.setup, command=shlex.join(["athanor", *sys.argv[1:]]))
    try:
        spec.validate()
    except cluster.ClusterError as e:
        return _fail(e, 2)
    problem = _recipe_config_problem(args.recipe, args.recipe_args)
    if problem:
        print(problem, file=sys.stderr)  # the recipe's own one line (it starts with "error: ")
        return 2
    if args.dry_run:
        print(cluster.sbatch_script(spec), end="")
        print(f"# would be written to {spec.resolved_log_dir()}/submit-<time>.sbatch; "
              f"log: {spec.resolved_log_dir()}/slurm-<jobid>.out", file=sys.stderr)
        return 0
    job_id, script = cluster.submit(spec)
    log = spec.resolved_log_dir() / f"slurm-{job_id}.out"
    print(f"submitted job {job_id}: {spec.nodes} node(s) x {spec.processes_per_node} process(es)")
    print(f"  script: {script}\n  log:    {log}")
    print(f"  watch:  athanor status {job_id}    stop: athanor cancel {job_id}")
    if not args.wait:
        return 0

    def report(info: dict) -> None:
        print(f"job {job_id}: {info.get('JobState')} (restarts {info.get('Restarts', 0)})", flush=True)

    try:
        info = cluster.wait(job_id, on_change=report)
    except KeyboardInterrupt:
        print(f"stopped waiting; job {job_id} goes on (athanor cancel {job_id} stops it)", file=sys.stderr)
        return 130
    status = cluster.job_exit_status(info)
    print(f"job {job_id} ended {info.get('JobState')} with exit status {status}; log: {log}")
    return status


def _recipe_config_problem(recipe: str, recipe_args: list[str]) -> str | None:
    """The recipe's config checked here, as the node would parse it, before any script is written:
    the script runs with ``ATHANOR_CHECK_ONLY=1`` (the runner parses, checks and lists the stages,
    then exits 0). A script that does not run through ``athanor.runner`` is not started here."""
    import os
    import subprocess
    from pathlib import Path

    from .runner import CHECK_ONLY_ENV

    if "athanor.runner" not in Path(recipe).read_text(errors="replace"):
        return None
    env = {**os.environ, CHECK_ONLY_ENV: "1"}
    proc = subprocess.run([sys.executable, recipe, *recipe_args], capture_output=True, text=True, env=env)
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    said = next((line for line in reversed(lines) if line.startswith("error: ")), None)
    return said or f"error: {recipe} refused its arguments (exit {proc.returncode}): {(lines or [''])[-1][:300]}"


def _status(args: argparse.Namespace) -> int:
    if not args.jobs:
        print(cluster.queue(user_only=not args.all), end="")
        return 0
    missing = 0
    for job_id in args.jobs:
        info = cluster.job_info(job_id)
        if info is None:
            print(f"{job_id}: unknown to SLURM (never existed, or finished longer ago than MinJobAge)")
            missing += 1
            continue
        print(f"{job_id}: {info.get('JobState')} exit={info.get('ExitCode')} restarts={info.get('Restarts')} "
              f"nodes={info.get('NodeList')} log={info.get('StdOut')}")
    return 1 if missing else 0


def _cancel(args: argparse.Namespace) -> int:
    cluster.cancel(args.job, signal=args.signal)
    what = f"sent SIG{args.signal} (checkpoint, requeue, resume)" if args.signal else "cancelled"
    print(f"job {args.job}: {what}")
    return 0


def _publish(args: argparse.Namespace) -> int:
    from . import hub

    try:
        result = hub.publish(args.output_dir, args.repo_id, private=args.private, dry_run=args.dry_run,
                             staging_dir=args.staging_dir, include_checkpoint=args.include_checkpoint,
                             include_optimizer_state=args.include_optimizer_state)
    except hub.PublishInputError as e:
        return _fail(e, 2)
    except hub.HubError as e:
        return _fail(e, 1)
    files = sorted(p.relative_to(result.folder).as_posix() for p in result.folder.rglob("*")
                   if p.is_file() and p.name != hub.STAGING_MARKER)  # the marker is not uploaded
    if args.dry_run:
        print(f"dry run: upload folder {result.folder} ({len(files)} files) for {args.repo_id}; nothing uploaded")
        for name in files:
            print(f"  {name}")
    else:
        from .redact import redact

        print(f"published {len(files)} files to {redact(result.url)}")  # an endpoint URL may carry a password
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    """Write a token file from ``data.*`` (as a recipe's config reads them) for ``data.token_file``."""
    from pathlib import Path

    from .config import ConfigError, load_config
    from .data.sources import TokenizeConfig, tokenize_corpus
    from .data.token_file import meta_path

    out = Path(args.token_file)
    try:
        if meta_path(out).exists():
            raise ConfigError(f"{out} is already written (delete it and {meta_path(out).name} to write it again)")
        cfg = load_config(TokenizeConfig, args.data_args).data
        meta = tokenize_corpus(cfg, out)
    except ConfigError as e:
        return _fail(e, 2)
    print(f"wrote {meta['tokens']:,} {cfg.tokenizer} tokens ({meta['dtype']}) to {out}")
    return 0


def _fail(error: Exception, code: int) -> int:
    from .redact import redact

    print(f"error: {redact(str(error))}", file=sys.stderr)  # no password from a URL, no token
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="athanor", description=__doc__.replace("``", "`"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("submit", help="submit a recipe to SLURM (one accelerate launch per node)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0: a CPU job (gloo)")
    p.add_argument("--procs-per-node", type=int, default=0, help="processes per node (default: GPUs, or 1)")
    p.add_argument("--cpus-per-task", type=int, default=0, help="CPUs per node task (default: partition's)")
    p.add_argument("--partition", default="")
    p.add_argument("--time", default="", help="time limit, e.g. 4:00:00")
    p.add_argument("--launch-config", default="", help="accelerate config (default: launch/ddp.yaml on "
                                                          "GPUs, launch/ddp-cpu.yaml on CPUs)")
    p.add_argument("--job-name", default="")
    p.add_argument("--signal-grace", type=int, default=90,
                   help="seconds before the time limit at which the run checkpoints and requeues")
    p.add_argument("--port", type=int, default=0, help="main process port (default: from the job id)")
    p.add_argument("--log-dir", default="", help="script and log folder (default: <run.output_dir>/slurm)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra sbatch option, e.g. --sbatch-arg=--account=abc (repeatable)")
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run before launching, e.g. 'module load cuda' (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    p.add_argument("--wait", action="store_true", help="block until the job ends; exit with its status")
    p.add_argument("recipe", help="recipe script, e.g. recipes/pretrain.py")
    p.add_argument("recipe_args", nargs=argparse.REMAINDER, help="recipe overrides (--section.key value ...)")
    p.set_defaults(func=_submit)

    p = sub.add_parser("status", help="your queued/running jobs, or the state, exit code and log of given jobs")
    p.add_argument("jobs", nargs="*")
    p.add_argument("--all", action="store_true", help="every user's jobs")
    p.set_defaults(func=_status)

    p = sub.add_parser("cancel", help="cancel a job, or send it the preemption signal")
    p.add_argument("job")
    p.add_argument("--signal", choices=["USR1"], help="USR1: checkpoint, requeue and resume instead of stopping")
    p.set_defaults(func=_cancel)

    p = sub.add_parser("publish", help="upload a finished run to the Hugging Face Hub")
    p.add_argument("output_dir")
    p.add_argument("--repo-id", required=True, help="user/name or org/name")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="build the upload folder; upload nothing")
    p.add_argument("--staging-dir", default=None, help="where the upload folder is built "
                                                         "(default: OUTPUT_DIR/hub_upload)")
    p.add_argument("--include-checkpoint", action="store_true",
                   help="also upload the newest checkpoint (without optimizer state)")
    p.add_argument("--include-optimizer-state", action="store_true",
                   help="with --include-checkpoint: keep the optimizer state too")
    p.set_defaults(func=_publish)

    p = sub.add_parser("tokenize", help="pre-tokenize data.source into a token file for --data.token_file")
    p.add_argument("token_file", help="the file to write (and its .json sidecar)")
    p.add_argument("data_args", nargs=argparse.REMAINDER, help="--data.source ... --data.tokenizer ... (as a recipe)")
    p.set_defaults(func=_tokenize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except cluster.ClusterError as e:
        return _fail(e, 1)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
