"""SeND's knobs tuned on a dev world (``data.seed`` 1; the report's world is seed 0), never on the
report's data:

    python -m athanor.methods.send.tune [--out outputs/send_tune] [--seeds 0 1]

Grid: ``send.fraction`` × ``send.drop_window`` for the SeND arm, each paired with the normal arm on the
same run seeds. Criterion (lower is better): the paired SeND − normal difference of the held-out
hallucination rate's std across checkpoints plus that of the final held-out hallucination rate, averaged
over the dev seeds. The stopping rule's EigenScore threshold is set from the dev normal runs: the
median final held-out EigenScore (training stops once the tracking EigenScore reaches what a
converged run shows), with ``stop_loss`` 0.01. Writes ``tune.json`` with every grid point.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ...runner import run
from .stages import PAPER

DEV_DATA_SEED = 1
GRID = [(0.1, 30), (0.2, 30), (0.3, 30), (0.2, 10), (0.2, 60)]


def _run(out: Path, seeds: list[int], arms: list[str], extra: list[str]) -> dict:
    return run(PAPER, ["--run.output_dir", str(out), "--data.seed", str(DEV_DATA_SEED), "--experiment.seeds",
                       json.dumps(seeds), "--experiment.arms", json.dumps(arms), *extra])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/send_tune")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args(argv)
    out = Path(args.out)
    normal = _run(out / "normal", args.seeds, ["normal"], [])["normal"]
    rows = []
    for fraction, window in GRID:
        send = _run(out / f"f{fraction}_w{window}", args.seeds, ["send"],
                    ["--send.fraction", str(fraction), "--send.drop_window", str(window)])["send"]
        score = statistics.fmean(s["heldout_halluc_std"] - n["heldout_halluc_std"] + s["final_heldout_halluc"]
                                 - n["final_heldout_halluc"] for s, n in zip(send, normal))
        rows.append({"fraction": fraction, "drop_window": window, "score": score,
                     "final_heldout_halluc": [s["final_heldout_halluc"] for s in send],
                     "heldout_halluc_std": [s["heldout_halluc_std"] for s in send]})
        print(json.dumps(rows[-1]), flush=True)
    best = min(rows, key=lambda r: r["score"])
    stop_es = statistics.median(n["eigenscore_heldout_final"] for n in normal)
    result = {"dev_data_seed": DEV_DATA_SEED, "seeds": args.seeds, "grid": rows, "best": best,
              "normal": [{"final_heldout_halluc": n["final_heldout_halluc"],
                          "heldout_halluc_std": n["heldout_halluc_std"],
                          "eigenscore_heldout_final": n["eigenscore_heldout_final"]} for n in normal],
              "stop_loss": 0.01, "stop_eigenscore": stop_es}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"best": best, "stop_eigenscore": stop_es}))
    return result


if __name__ == "__main__":
    main()
