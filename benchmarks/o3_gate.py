"""O3's gated inference as the number of unlearning requests T grows, next to the base LM.

    .venv/bin/python benchmarks/o3_gate.py                    # CPU, tiny default LM, T = 1 3 10 30
    .venv/bin/python benchmarks/o3_gate.py --today 1 3        # also the previous path at T = 1, 3
    python benchmarks/o3_gate.py --device cuda --lm 1b        # a 1B-class GPT-NeoX built from config

One run prints: the base LM's generate time over the questions, one plain encoder (MiniLM) pass
over the same questions, and gated generation (``O3Model.generate`` under the ``max`` gate:
detectors, then the LM with the adapters) at each T, with latency (median of ``--repeats`` after a
warm-up) and peak memory. Each row is measured in a fresh process: on CPU the memory is the rise of
peak resident memory (VmHWM) over the process's memory before the model was loaded, i.e. what the
O3 model and one generate cost; on CUDA it is torch's peak allocated memory.

Everything is synthetic except the tiny world's questions: an untrained base LM of the recipe's
shape (or ``--lm 1b``), T LoRA adapters with random A and B (peft's format, the recipe's LoRA
config), and T detectors fitted on MiniLM features of the recipe's three forget sets (cycled, each
request its own copy of the files; each
keeps its Mahalanobis statistics low-rank, ``layer_stats.LayerStats``: n·d + n² numbers per layer for
n stored questions instead of a d x d precision, so what grows with T is small). The
targets (issue 16): gated at T=30 <= 1.5x gated at T=1 (latency and memory); gated at T=3 <= one
encoder pass + 1.5x the base LM's generate.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

LMS = {"tiny": None,  # the O3 recipe's default ModelConfig
       "1b": dict(hidden_size=2048, num_layers=20, num_heads=16, intermediate_size=8192)}  # ~1.0B params


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class Memory:
    """Peak memory of what runs after ``start()``: CUDA peak allocated, or the CPU peak RSS rise."""

    def __init__(self, device: str):
        self.device = device

    def start(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            self.before = _status_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS

    def peak_mib(self) -> float:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.before) / 2**20
        return (_status_kib("VmHWM") * 1024 - self.before) / 2**20


def prepare(work: Path, t_max: int, lm: str, n_questions: int) -> dict:
    """Base LM folder, ``t_max`` adapters, three fitted detectors, the questions."""
    import torch
    from peft import get_peft_model

    from athanor.methods.o3.detector import Detector, SharedEncoder, resolve_backbone
    from athanor.parts.lm import build_lm
    from athanor.methods.o3.method import UnlearnConfig, lora_config
    from athanor.methods.o3 import O3Config, world
    from athanor.parts.fact_world import build_word_tokenizer

    cfg = O3Config()
    cfg.detector.cv_folds = 2  # calibration only: inference costs the same, fitting is 5x cheaper
    data, sets = world(cfg)
    if LMS[lm]:
        for key, value in LMS[lm].items():
            setattr(cfg.model, key, value)
    tokenizer = build_word_tokenizer(data, extra_words=cfg.unlearn.refusal.split())
    torch.manual_seed(0)
    base = build_lm(cfg.model, len(tokenizer), cfg.data.max_length)
    base.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    n_params = sum(p.numel() for p in base.parameters())
    peft_model = get_peft_model(base, lora_config(UnlearnConfig()))
    adapters = []
    for t in range(1, t_max + 1):
        gen = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:  # B != 0, so every adapter changes the outputs
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        peft_model.save_pretrained(work / "adapters" / f"request_{t}", safe_serialization=True)
        adapters.append(str(work / "adapters" / f"request_{t}"))
    encoder = SharedEncoder(resolve_backbone(cfg.detector.backbone, None))
    detectors = []
    for k, forget in enumerate(sets.forget_train, start=1):
        records = [data.records[i] for i in forget]
        feats = encoder.features([r.question for r in records], cfg.detector.max_length, None)
        detector = Detector(encoder.model, encoder.tokenizer, cfg.detector, cfg.detector.backbone)
        detector.fit(feats, seed=k, groups=[r.fact for r in records])
        detector.save(work / "detectors" / f"request_{k}")
        detectors.append(str(work / "detectors" / f"request_{k}"))
    for t in range(len(detectors) + 1, t_max + 1):  # own files per request: no page cache shared between them
        shutil.copytree(detectors[(t - 1) % len(sets.forget_train)], work / "detectors" / f"request_{t}")
        detectors.append(str(work / "detectors" / f"request_{t}"))
    step = max(1, len(data.records) // n_questions)
    questions = [r.question for r in data.records[::step]][:n_questions]
    return {"base": str(work / "base"), "adapters": adapters, "detectors": detectors, "questions": questions,
            "lm_params": n_params, "encoder_path": resolve_backbone(cfg.detector.backbone, None),
            "max_length": cfg.detector.max_length, "prompt_template": cfg.data.prompt_template}


def measure(kind: str, T: int, setup: dict, device: str, repeats: int, threads: int) -> dict:
    """One row, in this (fresh) process."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from athanor.methods.o3.detector import SharedEncoder
    from athanor.methods.o3.model import O3Model

    memory = Memory(device)
    memory.start()
    questions = setup["questions"]
    if kind == "encoder":
        encoder = SharedEncoder(setup["encoder_path"], device)
        work = lambda: encoder.features(questions, setup["max_length"], None)  # noqa: E731
    else:
        detectors = setup["detectors"][:T]
        gate = "off" if kind == "base" else "max"
        o3 = O3Model.from_parts(setup["base"], setup["adapters"][:T], detectors, gate,
                                setup["prompt_template"], stack=kind != "today").to(device)
        work = lambda: o3.generate(questions)  # noqa: E731
    outputs = work()  # warm-up (and the outputs, to compare paths)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"kind": kind, "T": T, "ms": 1e3 * statistics.median(times), "peak_mib": memory.peak_mib(),
            "outputs": outputs if kind != "encoder" else None}


def _child(queue, *args) -> None:
    try:
        queue.put(measure(*args))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def measure_in_child(*args) -> dict:
    # CPU: fork (the child starts with torch and transformers imported: seconds, not a minute on a
    # loaded machine; its memory baseline is taken after the fork). CUDA cannot be forked: spawn.
    ctx = mp.get_context("spawn" if args[2] == "cuda" else "fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, *args))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{args[:2]}: {result['error']}")
    return result


def run(args) -> tuple[list[dict], dict]:
    work = Path(args.work or tempfile.mkdtemp(prefix="o3-gate-"))
    print(f"preparing {max(args.T + args.today + [1])} adapters and detectors in {work}", flush=True)
    setup = prepare(work, max(args.T + args.today + [1]), args.lm, args.questions)
    if args.device == "cpu":  # imported here once, so that forked children start with them
        import peft  # noqa: F401
        import transformers  # noqa: F401

        from athanor.methods.o3.model import O3Model  # noqa: F401
    plan = [("base", 0), ("encoder", 0)] + [("gated", T) for T in args.T] + [("today", T) for T in args.today]
    rows = []
    for kind, T in plan:
        row = measure_in_child(kind, T, setup, args.device, args.repeats, args.threads)
        rows.append(row)
        print(f"  {kind} T={T}: {row['ms']:.0f} ms, {row['peak_mib']:.0f} MiB", flush=True)
    return rows, setup


def table(rows: list[dict], setup: dict, args) -> tuple[str, bool]:
    by = {(r["kind"], r["T"]): r for r in rows}
    base, enc = by[("base", 0)], by[("encoder", 0)]
    lines = [f"{len(setup['questions'])} questions, LM {args.lm} ({setup['lm_params'] / 1e6:.1f}M params), "
             f"device {args.device}, median of {args.repeats}:", "",
             "| what | T | latency ms | x base LM | peak memory MiB |", "|---|---:|---:|---:|---:|"]
    names = {"base": "base LM generate", "encoder": "one plain encoder pass", "gated": "gated generate (max gate)",
             "today": "previous path (peft hooks, encoder per detector)"}
    for r in rows:
        lines.append(f"| {names[r['kind']]} | {r['T'] or '-'} | {r['ms']:.1f} | {r['ms'] / base['ms']:.2f} | "
                     f"{r['peak_mib']:.0f} |")
    ok = True
    lines.append("")
    if ("gated", 1) in by and ("gated", 30) in by:
        g1, g30 = by[("gated", 1)], by[("gated", 30)]
        for what, key in (("latency", "ms"), ("memory", "peak_mib")):
            ratio = g30[key] / max(g1[key], 1e-9)
            met = ratio <= 1.5
            ok &= met
            lines.append(f"- gated T=30 / T=1 {what}: {ratio:.2f} (target <= 1.5): {'MET' if met else 'NOT MET'}")
    if ("gated", 3) in by:
        budget = enc["ms"] + 1.5 * base["ms"]
        met = by[("gated", 3)]["ms"] <= budget
        ok &= met
        lines.append(f"- gated T=3 {by[('gated', 3)]['ms']:.1f} ms vs one encoder pass + 1.5x base LM = "
                     f"{budget:.1f} ms: {'MET' if met else 'NOT MET'}")
    for T in args.today:
        if ("gated", T) in by:
            same = by[("gated", T)]["outputs"] == by[("today", T)]["outputs"]
            lines.append(f"- T={T}: stacked path and previous path generate the same text: {same}")
    return "\n".join(lines), ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--T", type=int, nargs="+", default=[1, 3, 10, 30], help="numbers of requests")
    parser.add_argument("--today", type=int, nargs="*", default=[], help="T values to run the previous path at")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--lm", default="tiny", choices=sorted(LMS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per measuring process (0: default)")
    parser.add_argument("--work", default="", help="folder for the synthetic models (default: a temporary one)")
    parser.add_argument("--json", default="", help="also write the rows here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows, setup = run(args)
    text, ok = table(rows, setup, args)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [{k: v for k, v in r.items() if k != "outputs"} for r in rows],
                                               "table": text, "targets_met": ok}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
