"""SLURM: submit a recipe as a (multi-node) batch job, watch it, cancel it, requeue on preemption.

``athanor submit`` writes an sbatch script and hands it to ``sbatch``. The script starts one
``accelerate launch`` per node through ``srun`` with ``--num_machines N --machine_rank
$SLURM_NODEID --main_process_ip <first node's address> --main_process_port P``; accelerate (and
torch's elastic launcher under it) starts the processes of that node. Generated scripts rather
than a library that serialises Python calls (submitit): the script is what ``--dry-run`` prints,
what an admin can read and rerun with plain ``sbatch``, and it controls exactly which process
gets which signal (below).

Preemption and time limits. The engine writes a checkpoint and exits with code 75 when a
process receives SIGUSR1 or SIGTERM (``athanor.engine.PREEMPTED_EXIT_CODE``). The job asks SLURM
for ``--signal=B:USR1@<grace>``: SIGUSR1 goes to the batch shell ``grace`` seconds before the
time limit; the shell passes it to ``srun``, which forwards it to every task, and the launchers
ignore it (``trap '' USR1`` before ``exec``) so only the recipe's processes act on it; they
inherit the ignored disposition until the engine installs its handler. When the step ends after
such a signal without success, the shell runs ``scontrol requeue $SLURM_JOB_ID``: the same job
id runs again from the top and ``run.resume auto`` continues from the newest checkpoint. The
shell decides on the signal rather than on exit code 75 because ``accelerate launch`` turns any
worker failure into its own exit code 1. ``athanor cancel --signal USR1 JOB`` sends the same
signal by hand (what a preemption test does); a plain cancel stops the job for good.

Every value that reaches a script is quoted for whoever reads it: ``#SBATCH`` values in double
quotes as sbatch's own parser reads them (paths with spaces, quotes, ``#``), shell words with
``shlex.quote``. A line break in any value is refused before anything is written, since it would
end a comment or directive and start a line of its own.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository (launch/ configs live there)
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}


class ClusterError(RuntimeError):
    """A SLURM command failed or is missing; the CLI prints it on one line."""


@dataclass
class JobSpec:
    """One recipe run on ``nodes`` nodes; everything ``athanor submit`` takes."""

    recipe: str
    recipe_args: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 0  # 0: a CPU job (gloo)
    procs_per_node: int = 0  # 0: one per GPU, or 1 on CPU
    cpus_per_task: int = 0  # 0: the partition's default
    partition: str = ""
    time: str = ""  # SLURM time limit, e.g. 4:00:00
    launch_config: str = ""  # accelerate config; default: ddp(-cpu).yaml, or cpu.yaml for one process
    job_name: str = ""
    signal_grace_s: int = 90  # SIGUSR1 this long before the time limit -> checkpoint + requeue
    port: int = 0  # main process port; 0: derived from the job id
    log_dir: str = ""  # where the script and slurm-<jobid>.out go
    sbatch_args: list[str] = field(default_factory=list)  # passed as #SBATCH lines unchanged
    setup: list[str] = field(default_factory=list)  # shell lines run first (module load, venv, ...)
    python: str = sys.executable
    command: str = ""  # the submitting command line, recorded in the script's header

    @property
    def processes_per_node(self) -> int:
        return self.procs_per_node or self.gpus_per_node or 1

    @property
    def num_processes(self) -> int:
        return self.nodes * self.processes_per_node

    def resolved_launch_config(self) -> Path:
        if self.launch_config:
            return Path(self.launch_config).resolve()
        if self.num_processes == 1:
            return ROOT / "launch" / "cpu.yaml"
        return ROOT / "launch" / ("ddp.yaml" if self.gpus_per_node else "ddp-cpu.yaml")

    def resolved_log_dir(self) -> Path:
        if self.log_dir:
            return Path(self.log_dir).resolve()
        output_dir = recipe_output_dir(self.recipe_args)
        return (Path(output_dir) / "slurm" if output_dir else Path("outputs") / "slurm").resolve()

    def validate(self) -> None:
        if not Path(self.recipe).is_file():
            raise ClusterError(f"recipe not found: {self.recipe}")
        if not self.resolved_launch_config().is_file():
            raise ClusterError(f"launch config not found: {self.resolved_launch_config()}")
        if self.nodes < 1:
            raise ClusterError("--nodes must be >= 1")
        for name in ("gpus_per_node", "procs_per_node", "cpus_per_task", "signal_grace_s", "port"):
            if getattr(self, name) < 0:
                raise ClusterError(f"--{name.replace('_', '-')} must be >= 0")
        if self.time and not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", self.time):
            raise ClusterError(f"--time {self.time!r}: use SLURM's forms, e.g. 30, 4:00:00, 1-12:00:00")
        check_script_values({"recipe argument": self.recipe_args, "--sbatch-arg": self.sbatch_args,
                             "--setup": self.setup, "recipe": self.recipe, "--launch-config": self.launch_config,
                             "--job-name": self.job_name, "--partition": self.partition,
                             "--log-dir": self.log_dir, "python": self.python, "command": self.command})
        if "\\" in str(self.resolved_log_dir()):  # sbatch then leaves %j unexpanded in --output
            raise ClusterError(f"log folder {str(self.resolved_log_dir())!r} holds a backslash, which sbatch's "
                               f"--output does not allow beside %j: choose another --run.output_dir or --log-dir")


LINE_BREAKS = ("\n", "\r", "\x00", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")
SBATCH_OPTION = re.compile(r"--?[A-Za-z][\w-]*")


def check_script_values(values: dict) -> None:
    """Refuse, on one line, any value holding a line break (it would become a script line of its
    own), and ``--sbatch-arg`` values that are not one ``--option[=value]``."""
    for name, value in {**values, "working directory": str(Path.cwd())}.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if any(c in str(item) for c in LINE_BREAKS):
                raise ClusterError(f"{name} {str(item)!r} holds a line break, which would become a line of "
                                   f"the sbatch script: remove it")
    for arg in values.get("--sbatch-arg", []):
        if not SBATCH_OPTION.fullmatch(arg.split("=", 1)[0]):
            raise ClusterError(f"--sbatch-arg {arg!r}: expected one sbatch option, --name or --name=value")


def sbatch_quote(value) -> str:
    """A ``#SBATCH`` option value as sbatch reads it back: in double quotes, with backslash and
    double quote escaped (sbatch's directive parser honours both quote kinds and backslash
    escapes; ``#`` outside quotes would start a comment). Plain words stay unquoted, readable."""
    if re.fullmatch(r"[\w@%+=:,./-]+", str(value)):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _directive(option: str) -> str:
    """``--name=value`` with its value quoted for sbatch; ``--flag`` unchanged."""
    name, eq, value = option.partition("=")
    return f"{name}={sbatch_quote(value)}" if eq else name


def _log_pattern(folder: Path, name: str) -> str:
    """An --output value: ``%`` in the folder is literal (``%%``), the file name's ``%j`` is SLURM's."""
    return str(folder).replace("%", "%%") + "/" + name


def recipe_output_dir(args: list[str]) -> str | None:
    """``--run.output_dir X`` (or ``=X``) among recipe overrides, if given."""
    for i, arg in enumerate(args):
        if arg == "--run.output_dir" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--run.output_dir="):
            return arg.split("=", 1)[1]
    return None


def _q(value) -> str:
    return shlex.quote(str(value))


def _q_without_secrets(value, secrets: dict[str, str]) -> str:
    """A shell word for ``value`` in which a secret (``HF_TOKEN``'s value, ...) is not written out
    but read from the job's environment (sbatch passes the submitter's on): the script file on
    disk holds ``"${HF_TOKEN}"``, the run gets the same value."""
    pieces = [(str(value), False)]  # (text, is a variable name)
    for secret, name in sorted(secrets.items(), key=lambda item: -len(item[0])):
        if os.environ.get(name) != secret or not re.fullmatch(r"[A-Za-z_]\w*", name):
            continue  # only a variable the job will see holds the value
        split = []
        for text, is_name in pieces:
            if is_name or secret not in text:
                split.append((text, is_name))
                continue
            for k, part in enumerate(text.split(secret)):
                split += [(name, True), (part, False)] if k else [(part, False)]
        pieces = split
    word = "".join(f'"${{{text}}}"' if is_name else shlex.quote(text) for text, is_name in pieces if is_name or text)
    return word or "''"


def _run_and_requeue(command: str) -> list[str]:
    """Script lines: run ``command`` in the background, pass SIGUSR1 on to it, and requeue the
    job when the run stopped on that signal without finishing."""
    return [
        "# SIGUSR1 (time limit near, or `athanor cancel --signal USR1`): pass it on, and requeue",
        "# once the run has checkpointed and exited.",
        'stop_signal=""',
        "forward_usr1() {",
        '  stop_signal=USR1',
        '  echo "athanor: SIGUSR1 received: the run checkpoints at the end of its step"',
        '  [ -n "${STEP_PID:-}" ] && kill -USR1 "$STEP_PID" 2>/dev/null',
        "}",
        "trap forward_usr1 USR1",
        "",
        f"{command} &",
        "STEP_PID=$!",
        "# `wait` returns early when a trapped signal arrives; wait again until the run has exited.",
        'while :; do wait "$STEP_PID"; rc=$?; kill -0 "$STEP_PID" 2>/dev/null || break; done',
        'if [ -n "$stop_signal" ] && [ "$rc" -ne 0 ]; then',
        '  echo "athanor: stopped by SIG$stop_signal (exit $rc): requeueing job $SLURM_JOB_ID to resume"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'echo "athanor: exit $rc, $(date -Is)"',
        'exit "$rc"',
    ]


def _set_options(**options) -> list[str]:
    """``--gpus-per-node=8``-style sbatch options for the settings that are set (not 0 or "")."""
    return [f"--{key.replace('_', '-')}={value}" for key, value in options.items() if value]


def sbatch_script(spec: JobSpec) -> str:
    """The batch script for ``spec`` (what ``--dry-run`` prints)."""
    name = spec.job_name or f"athanor-{Path(spec.recipe).stem}"
    log_dir = spec.resolved_log_dir()
    spec.validate()  # no line break reaches the script, whoever calls this
    directives = [f"--job-name={name}", f"--nodes={spec.nodes}", "--ntasks-per-node=1",
                  f"--output={_log_pattern(log_dir, 'slurm-%j.out')}", "--open-mode=append",  # a requeued run appends
                  f"--chdir={Path.cwd()}", "--requeue", f"--signal=B:USR1@{spec.signal_grace_s}"]
    directives += _set_options(gpus_per_node=spec.gpus_per_node, cpus_per_task=spec.cpus_per_task,
                               partition=spec.partition, time=spec.time) + spec.sbatch_args

    launch = [spec.python, "-m", "accelerate.commands.launch", "--config_file", str(spec.resolved_launch_config())]
    if spec.num_processes > 1:
        launch += ["--num_processes", str(spec.num_processes), "--num_machines", str(spec.nodes)]
    launch_line = " ".join(_q(a) for a in launch)
    if spec.num_processes > 1:  # per-node values come from the task's environment at run time
        launch_line += ' --machine_rank "$SLURM_NODEID" --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT"'
    from .redact import redact, secret_values

    secrets = secret_values()  # a token among the arguments is read from the job's environment instead
    launch_line += " " + " ".join(_q_without_secrets(a, secrets) for a in [Path(spec.recipe).resolve(), *spec.recipe_args])
    # The node's command: ignore SIGUSR1 in the launcher (the recipe's processes handle it), set
    # thread counts for CPU jobs, then exec accelerate.
    node_command = 'trap "" USR1; exec ' + launch_line
    threads = ""
    if not spec.gpus_per_node:
        threads = (f'[ -n "${{SLURM_CPUS_PER_TASK:-}}" ] && [ -z "${{OMP_NUM_THREADS:-}}" ] && '
                   f'export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK / {spec.processes_per_node} > 0 ? '
                   f'SLURM_CPUS_PER_TASK / {spec.processes_per_node} : 1 ))\n')
    port = str(spec.port) if spec.port else "$(( 20000 + SLURM_JOB_ID % 20000 ))"
    lines = ["#!/bin/bash",
             f"# Written by `athanor submit` on {datetime.datetime.now().isoformat(timespec='seconds')}."]
    if spec.command:
        lines.append(f"# {redact(spec.command)}")
    lines += [f"#SBATCH {_directive(d)}" for d in directives]
    lines += ["", "set -uo pipefail", "export PYTHONUNBUFFERED=1", *spec.setup, ""]
    lines += [
        '# The first node runs the main process; its NodeAddr is reachable from the others (on a',
        '# cluster of virtual nodes it is 127.0.0.1 while the node names do not resolve).',
        'FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'export MAIN_IP=$(scontrol show node "$FIRST_NODE" | sed -n "s/.*NodeAddr=\\([^ ]*\\).*/\\1/p")',
        f"export MAIN_PORT={port}",
        'echo "athanor: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST,'
        ' main process $MAIN_IP:$MAIN_PORT, $(date -Is)"',
        threads.rstrip("\n"),
        "",
        *_run_and_requeue(f"srun --nodes={spec.nodes} --ntasks-per-node=1 --kill-on-bad-exit=0 "
                          f"bash -c {_q(node_command)}"),
    ]
    return "\n".join(line for line in lines if line is not None) + "\n"


# ------------------------------------------------------------------ SLURM commands

def _slurm(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    if shutil.which(args[0]) is None:
        raise ClusterError(f"{args[0]} not found: run this on a SLURM login node "
                           f"(or start one here: launch/slurm/local-cluster.sh start)")
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        msg = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()[-1]
        raise ClusterError(f"{' '.join(args[:2])}: {msg}")
    return proc


def submit(spec: JobSpec) -> tuple[str, Path]:
    """Write the script next to the logs and submit it; returns (job id, script path)."""
    spec.validate()
    log_dir = spec.resolved_log_dir()
    log_dir.mkdir(parents=True, exist_ok=True)
    script = log_dir / f"submit-{datetime.datetime.now():%Y%m%d-%H%M%S-%f}.sbatch"
    script.write_text(sbatch_script(spec))
    out = _slurm("sbatch", "--parsable", str(script)).stdout.strip()
    job_id = out.split(";")[0]  # --parsable: "id" or "id;cluster"
    return job_id, script


def job_info(job_id: str) -> dict | None:
    """``scontrol show job`` as a dict (None once SLURM has forgotten the job)."""
    proc = _slurm("scontrol", "show", "job", "-o", str(job_id), check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    info = {}
    # Values may contain spaces only in the trailing Command/WorkDir-like fields; split on keys.
    for match in re.finditer(r"(\w[\w/:]*)=(.*?)(?=\s\w[\w/:]*=|$)", proc.stdout.strip().splitlines()[0]):
        info[match.group(1)] = match.group(2)
    return info


def job_exit_status(info: dict) -> int:
    """The job's exit status as a process would report it: rc, or 128+signal, or 1."""
    rc, _, sig = info.get("ExitCode", "0:0").partition(":")
    if int(sig or 0):
        return 128 + int(sig)
    if int(rc or 0):
        return int(rc)
    return 0 if info.get("JobState") == "COMPLETED" else 1


def wait(job_id: str, poll_s: float = 2.0, timeout_s: float | None = None, on_change=None) -> dict:
    """Block until the job reaches a final state (a requeued job is followed through its
    restarts: the same id goes back to PENDING). Returns the last ``scontrol`` record."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = None
    while True:
        info = job_info(job_id)
        if info is None:
            raise ClusterError(f"job {job_id} is unknown to SLURM (finished more than MinJobAge ago?)")
        state = info.get("JobState", "")
        key = (state, info.get("Restarts"))
        if on_change and key != last:
            on_change(info)
        last = key
        if state in TERMINAL_STATES:
            return info
        if deadline is not None and time.monotonic() > deadline:
            raise ClusterError(f"job {job_id} still {state} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def queue(user_only: bool = True) -> str:
    args = ["squeue", "-o", "%.10i %.20j %.9T %.10M %.6D %R"]
    if user_only:
        args.append("--me")
    return _slurm(*args).stdout


def cancel(job_id: str, signal: str | None = None) -> None:
    """Cancel the job; with ``signal`` (USR1), send it to the batch shell instead, which makes the
    run checkpoint and requeue, exactly as at the time limit."""
    if signal:
        _slurm("scancel", "--batch", f"--signal={signal}", str(job_id))
    else:
        _slurm("scancel", str(job_id))


# ------------------------------------------------------------------ sweeps on SLURM

@dataclass
class SlurmExecutor:
    """Runs ``athanor.sweep`` jobs as one SLURM job array, one array task per run (the
    ``sweep.Executor`` interface: ``run(jobs)`` yields ``(job, Outcome)`` as runs end).

    Each task calls ``sweep.run_job`` on its job (the recipe's ``main(argv)`` in one process),
    which records ``STAGE.json`` in the run's folder: that file is how a finished run is seen,
    here and by any later sweep. Tasks checkpoint and requeue on SIGUSR1 like ``athanor submit``
    jobs. Its knobs use the sweep's words, so ``sweep.make_executor("slurm", workers=...,
    threads_per_worker=...)`` means the same as for local workers."""

    workers: int = 0  # array tasks running at once (--array=0-N%workers); 0: as many as the cluster allows
    threads_per_worker: int = 1  # --cpus-per-task of each array task (and its OMP_NUM_THREADS)
    gpus_per_task: int = 0
    partition: str = ""
    time: str = ""
    signal_grace_s: int = 90
    log_dir: str = ""  # default: <sweep root>/slurm
    sbatch_args: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    poll_s: float = 2.0
    python: str = sys.executable

    def script(self, jobs_file: Path, n_jobs: int, log_dir: Path, name: str = "athanor-sweep") -> str:
        check_script_values({"--sbatch-arg": self.sbatch_args, "setup": self.setup, "partition": self.partition,
                             "time": self.time, "log dir": str(log_dir), "jobs file": str(jobs_file),
                             "python": self.python, "job name": name})
        array = f"0-{n_jobs - 1}" + (f"%{self.workers}" if self.workers else "")
        directives = [f"--job-name={name}", f"--array={array}", "--ntasks=1",
                      f"--cpus-per-task={self.threads_per_worker}",
                      f"--output={_log_pattern(log_dir, 'sweep-%A_%a.out')}", "--open-mode=append",
                      f"--chdir={Path.cwd()}",
                      "--requeue", f"--signal=B:USR1@{self.signal_grace_s}"]
        directives += _set_options(gpus_per_task=self.gpus_per_task, partition=self.partition,
                                   time=self.time) + self.sbatch_args
        run = " ".join(_q(a) for a in [self.python, "-m", "athanor.cluster", "sweep-task", jobs_file])
        return "\n".join([
            "#!/bin/bash", "# Written by athanor.cluster.SlurmExecutor: one array task per sweep run.",
            *(f"#SBATCH {_directive(d)}" for d in directives), "",
            "set -uo pipefail", "export PYTHONUNBUFFERED=1", *self.setup,
            'export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}',
            'echo "athanor: sweep task ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} (job $SLURM_JOB_ID, restart '
            '${SLURM_RESTART_COUNT:-0}) on $SLURMD_NODENAME, $(date -Is)"', "",
            *_run_and_requeue(f'{run} "$SLURM_ARRAY_TASK_ID"'),
        ]) + "\n"

    def _live_tasks(self, array_id: str) -> set[int]:
        """Array task indices SLURM still holds as pending, running or completing."""
        proc = _slurm("squeue", "-h", "-r", "-j", array_id, "-o", "%K", check=False)
        return {int(x) for x in proc.stdout.split() if x.isdigit()} if proc.returncode == 0 else set()

    def run(self, jobs):
        from .sweep import Outcome

        jobs = list(jobs)
        if not jobs:
            return
        log_dir = Path(self.log_dir or Path(jobs[0].root) / "slurm").resolve()
        log_dir.mkdir(parents=True, exist_ok=True)
        stamp = f"{datetime.datetime.now():%Y%m%d-%H%M%S-%f}"
        jobs_file = log_dir / f"sweep-{stamp}.json"
        jobs_file.write_text(json.dumps([{**dataclasses.asdict(job), "root": str(Path(job.root).resolve()),
                                          "script": str(Path(job.script).resolve())} for job in jobs], indent=1))
        script = log_dir / f"sweep-{stamp}.sbatch"
        script.write_text(self.script(jobs_file, len(jobs), log_dir))
        array_id = _slurm("sbatch", "--parsable", str(script)).stdout.strip().split(";")[0]
        start, pending = time.monotonic(), dict(enumerate(jobs))
        try:
            while pending:
                live = self._live_tasks(array_id)  # read before the folders: a task may end in between
                for index, job in list(pending.items()):
                    if job.finished():
                        del pending[index]
                        yield job, Outcome(job.name, True, result=job.stored_result(),
                                           seconds=time.monotonic() - start)
                    elif index not in live:
                        del pending[index]
                        log = log_dir / f"sweep-{array_id}_{index}.out"
                        tail = log.read_text()[-1500:] if log.is_file() else "(no log)"
                        yield job, Outcome(job.name, False, error=f"SLURM task {array_id}_{index} ended without a "
                                           f"result; log {log}:\n{tail}", seconds=time.monotonic() - start)
                if pending:
                    time.sleep(self.poll_s)
        finally:
            if pending:  # the sweep was stopped: do not leave its runs queued
                _slurm("scancel", array_id, check=False)


def _sweep_task(jobs_file: str, index: str) -> int:
    """Array task body: run job ``index`` of ``jobs_file`` (exit 75 when preempted)."""
    from .sweep import Job, run_job

    job = Job(**json.loads(Path(jobs_file).read_text())[int(index)])
    print(f"athanor: sweep run {job.name} -> {job.output_dir}", flush=True)
    run_job(job)  # SystemExit(75) from the engine passes through
    return 0


def register_sweep_executor() -> None:
    """Make ``sweep.make_executor("slurm", ...)`` (e.g. ``--sweep.executor slurm``) find this executor."""
    from . import sweep

    sweep.EXECUTORS.setdefault("slurm", SlurmExecutor)


if __name__ == "__main__":  # python -m athanor.cluster sweep-task JOBS.json INDEX
    if len(sys.argv) == 4 and sys.argv[1] == "sweep-task":
        sys.exit(_sweep_task(sys.argv[2], sys.argv[3]))
    sys.exit("usage: python -m athanor.cluster sweep-task JOBS.json INDEX")
