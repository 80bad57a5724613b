"""Engine overhead: the pretrain recipe's step through ``Engine.fit`` against a bare torch loop and a
plain accelerate loop on the same model, data, AdamW, schedule and clipping. One run:

    .venv/bin/python benchmarks/overhead.py                 # ~5 min on an idle 2-core machine
    .venv/bin/python benchmarks/overhead.py --rounds 2      # quick look
    .venv/bin/python benchmarks/overhead.py --write         # also (re)writes its section of RESULTS.md

How the arms stay comparable on a machine other jobs are loading: the engine runs one long
``fit`` (the pretrain recipe's config, eval off), and its data iterator hands over to the other two
arms every ``--block`` engine steps: a block of bare steps, then a block of accelerate steps (the
order rotates each round). Each block's per-step time is timed on its own; an engine block's time
runs from one ``next(data)`` to the next, so it holds everything the engine does around the
method's step (metrics, probes, logging, progress bar, signal checks). The figures are medians over
blocks, so a burst of load hits all three arms about alike. The first round is warm-up and left out,
as are the end-of-run eval and checkpoint (a fixed cost, not a per-step one). ``--block`` should be a
multiple of the probe period (``probes.every``, 100 by default), so every engine block pays its share of probes.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Engine overhead (benchmarks/overhead.py)"


class BareArm:
    """model(input_ids, labels).loss, backward, clip, AdamW step, schedule step, zero_grad."""

    name = "bare torch"

    def __init__(self, model, cfg):
        from athanor.engine.schedule import Schedule, build_optimizer, param_groups

        self.model = model.train()
        self.optimizer = build_optimizer(param_groups(model, cfg.optim), cfg.optim)
        self.schedule = Schedule(self.optimizer, cfg.optim, cfg.run.max_steps)
        self.clip = cfg.optim.grad_clip

    def step(self, batch):
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)


class AccelerateArm(BareArm):
    """The same, through ``accelerator.prepare`` / ``backward`` / ``clip_grad_norm_``."""

    name = "plain accelerate"

    def __init__(self, model, cfg, accelerator):
        super().__init__(model, cfg)
        self.accelerator = accelerator
        self.model, self.optimizer = accelerator.prepare(self.model, self.optimizer)

    def step(self, batch):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)


class InterleavedData:
    """The engine's data stream; every ``block`` engine steps it times that block, then runs one
    block of each other arm (their order rotating) on the same batches."""

    def __init__(self, inner, arms, block: int, rounds: int):
        self.inner, self.arms, self.block, self.rounds = inner, arms, block, rounds
        names = ["engine", *(a.name for a in arms)]
        self.times = {n: [] for n in names}  # wall seconds per step, one entry per block
        self.cpu = {n: [] for n in names}  # CPU seconds of this process per step (all its threads)
        self.calls, self.t0, self.c0, self.round = 0, None, None, 0

    def __iter__(self):
        return self

    def __next__(self):
        now, cpu = time.perf_counter(), time.process_time()
        if self.calls and self.calls % self.block == 0:
            self.times["engine"].append((now - self.t0) / self.block)
            self.cpu["engine"].append((cpu - self.c0) / self.block)
            self._other_arms()
            now, cpu = time.perf_counter(), time.process_time()
        if self.calls % self.block == 0:
            self.t0, self.c0 = now, cpu
        self.calls += 1
        return next(self.inner)

    def _other_arms(self) -> None:
        batches = [next(self.inner) for _ in range(self.block)]  # each arm sees the same batches
        order = self.arms[self.round % len(self.arms):] + self.arms[:self.round % len(self.arms)]
        for arm in order:
            start, cpu = time.perf_counter(), time.process_time()
            for batch in batches:
                arm.step(batch)
            self.times[arm.name].append((time.perf_counter() - start) / self.block)
            self.cpu[arm.name].append((time.process_time() - cpu) / self.block)
        self.round += 1

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def measure(rounds: int, block: int, overrides: list[str]) -> dict:
    from accelerate import Accelerator

    from athanor.config import load_config
    from athanor.data import ShuffledBatches, load_text_data
    from athanor.engine import Engine
    from athanor.methods.pretrain import Pretrain, PretrainConfig, build_model
    from athanor.runner import set_cpu_threads

    out_dir = tempfile.mkdtemp(prefix="athanor-overhead-")
    max_steps = block * (rounds + 1) + 1  # +1: the last step (eval, checkpoint) is never inside a block
    cfg = load_config(PretrainConfig, ["--run.output_dir", out_dir, "--run.eval_every", "0",
                                       "--run.max_steps", str(max_steps), "--run.progress", "false", *overrides])
    set_cpu_threads(cfg.engine.cpu_threads)
    data = load_text_data(cfg.data)
    method = Pretrain(cfg.model, data, cfg.data.batch_size, cfg.data.eval_batches, probe_every=cfg.probes.every)
    engine = Engine(cfg)
    method.setup(engine)
    model = engine.unwrap("model")
    arms = [BareArm(copy.deepcopy(model), cfg), AccelerateArm(copy.deepcopy(model), cfg, Accelerator(cpu=True))]
    stream = InterleavedData(ShuffledBatches(data.train_blocks, cfg.data.batch_size, cfg.run.seed), arms, block, rounds)
    start = time.perf_counter()
    engine.fit(method, stream)
    wall = time.perf_counter() - start
    tokens = cfg.data.batch_size * (cfg.data.block_size - 1)  # targets per step, as the engine counts them
    rows = {}
    for name in stream.times:
        wall_s, cpu_s = stream.times[name][1:], stream.cpu[name][1:]  # round 0 is warm-up
        rows[name] = {"wall_ms": 1e3 * statistics.median(wall_s), "cpu_ms": 1e3 * statistics.median(cpu_s),
                      "tokens_per_s": tokens / statistics.median(wall_s),
                      "tokens_per_cpu_s": tokens / statistics.median(cpu_s)}
    for row in rows.values():
        row["ratio_wall"] = row["tokens_per_s"] / rows["bare torch"]["tokens_per_s"]
        row["ratio_cpu"] = row["tokens_per_cpu_s"] / rows["bare torch"]["tokens_per_cpu_s"]
    # pairwise: each round's engine block against the bare block run right next to it
    paired = {kind: [b / e for e, b in zip(series["engine"][1:], series["bare torch"][1:])]
              for kind, series in (("wall", stream.times), ("cpu", stream.cpu))}
    return {"rows": rows, "paired": paired, "wall_s": wall, "load": _load(),
            "config": f"d_model={cfg.model.d_model} n_layers={cfg.model.n_layers} batch={cfg.data.batch_size}x"
                      f"{cfg.data.block_size} log_every={cfg.run.log_every} threads={torch.get_num_threads()}"}


def _load() -> str:
    path = Path("/proc/loadavg")
    return " ".join(path.read_text().split()[:3]) if path.exists() else "?"


def table(result: dict, rounds: int, block: int) -> str:
    lines = ["| arm | wall ms/step | tokens/s (wall) | vs bare (wall) | CPU ms/step | tokens/CPU-s | vs bare (CPU) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['wall_ms']:.1f} | {r['tokens_per_s']:.0f} | {r['ratio_wall']:.3f} | "
                     f"{r['cpu_ms']:.1f} | {r['tokens_per_cpu_s']:.0f} | {r['ratio_cpu']:.3f} |")
    lines.append("")
    for kind, pairs in result["paired"].items():
        lines.append(f"- engine/bare tokens-per-{kind}-second, median of the {len(pairs)} per-round ratios: "
                     f"**{statistics.median(pairs):.3f}** (range {min(pairs):.3f}-{max(pairs):.3f})")
    lines.append(f"- {rounds} measured rounds (+1 warm-up) x {block} steps per arm, {result['config']}; "
                 f"{result['wall_s']:.0f} s wall; load average {result['load']} at the end")
    return "\n".join(lines)


def write_section(text: str) -> None:
    """Replace (or append) this script's section of RESULTS.md, leaving every other section alone."""
    path = ROOT / "benchmarks" / "RESULTS.md"
    old = path.read_text()
    lines = old.split("\n")
    if SECTION in lines:
        start = lines.index(SECTION)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = text.rstrip("\n").split("\n") + [""]
        path.write_text("\n".join(lines))
    else:
        path.write_text(old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds (plus one warm-up)")
    parser.add_argument("--block", type=int, default=100, help="steps per arm per round (a multiple of probes.every)")
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    parser.add_argument("overrides", nargs="*", help="pretrain config overrides, e.g. --model.d_model 256")
    args, overrides = parser.parse_known_args(argv)
    result = measure(args.rounds, args.block, args.overrides + overrides)
    text = table(result, args.rounds, args.block)
    print(text)
    if args.write:
        write_section(f"{SECTION}\n\n`.venv/bin/python benchmarks/overhead.py --write` on the shared 2-core "
                      f"CPU machine, torch {torch.__version__}. Wall times are inflated and noisy from other "
                      f"jobs; the CPU time of this process (all its threads, `time.process_time`) is what "
                      f"load disturbs least, so the CPU ratio is the headline.\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
