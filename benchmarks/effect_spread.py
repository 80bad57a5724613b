"""Spread of an effect test's figures over run seeds and torch's CPU kernel paths.

An effect test's threshold must hold on any machine, so it is set from this table, not from one
run: each (seed, ATEN_CPU_CAPABILITY) pair runs in its own process (the capability is read once,
when torch loads), and the table gives every figure the test asserts with its mean, sd and min.

    python benchmarks/effect_spread.py codebook --seeds 0 1 2 3 4
    python benchmarks/effect_spread.py codebook --capabilities default avx2 native

Only `codebook` (tests/test_codebook.py::test_recipe_end_to_end_tiny) is wired in today; add a
recipe by naming its tiny arguments and the figures its test reads.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# recipe -> (module holding the test's tiny arguments, their name, figures read from report.json)
EFFECTS = {
    "codebook": ("test_codebook", "TINY", {
        "transition_gap": "r['transition_acc']['baseline'] - r['transition_acc']['codebook']",
        "code_precision": "r['state_features']['code']['precision_at_recall_0.5']['precision']",
        "code_recall": "r['state_features']['code']['precision_at_recall_0.5']['recall']",
        "neuron_precision_at_code_recall": "r['state_features']['neuron']['at_code_recall']['precision']",
        "js_other_minus_target": "r['steering']['other_state_codes']['both']['js_divergence']"
                                 " - r['steering']['state_positions_only']['both']['js_divergence']",
        "js_no_patch_minus_target": "r['steering']['no_patch']['js_divergence']"
                                    " - r['steering']['state_positions_only']['both']['js_divergence']",
        "valid_target_minus_other": "r['steering']['state_positions_only']['both']['valid_successor']"
                                    " - r['steering']['other_state_codes']['both']['valid_successor']",
    }),
}

CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from athanor.runner import run
from athanor.methods import {recipe} as paper
from {module} import {args_name} as tiny
r = run(paper.PAPER, ["--run.output_dir", {out!r}, "--run.seed", {seed!r}, *tiny])
print("FIGURES " + json.dumps({{k: eval(e) for k, e in {figures!r}.items()}}))
"""


def one_run(recipe: str, seed: int, capability: str, workdir: Path) -> dict:
    """Figures of one run in a fresh process under one kernel path ('native' leaves torch's choice)."""
    module, args_name, figures = EFFECTS[recipe]
    code = CHILD.format(tests=str(ROOT / "tests"), recipe=recipe, module=module, args_name=args_name,
                        out=str(workdir / f"{capability}-{seed}"), seed=str(seed), figures=figures)
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability != "native":
        env["ATEN_CPU_CAPABILITY"] = capability
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("FIGURES ")]
    if proc.returncode != 0 or not line:
        raise SystemExit(f"seed {seed} / {capability} failed:\n{proc.stderr[-2000:]}")
    return json.loads(line[-1][len("FIGURES "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", choices=sorted(EFFECTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--capabilities", nargs="+", default=["default", "avx2", "native"])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for capability in args.capabilities:
            for seed in args.seeds:
                rows.append({"capability": capability, "seed": seed,
                             **one_run(args.recipe, seed, capability, Path(tmp))})
                print(json.dumps(rows[-1]), flush=True)
    names = list(EFFECTS[args.recipe][2])
    print("\n| figure | mean | sd | min | max |\n|---|---|---|---|---|")
    for name in names:
        values = [row[name] for row in rows]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name} | {statistics.mean(values):.3f} | {sd:.3f} | {min(values):.3f} | {max(values):.3f} |")


if __name__ == "__main__":
    main()
