"""The pretrain paper's report: eval loss before/after, the loss curve."""
from __future__ import annotations

from ...report import plot_metrics, write_report
from ...runner import StageContext


def report(ctx: StageContext, results: dict) -> dict:
    out = {k: v for k, v in results["train"].items() if k != "seconds"}
    plot_metrics(ctx.root, ["loss", "eval_loss"], "loss.png", title="pretraining loss")
    drop = out["initial_eval_loss"] - out["final_eval_loss"]
    write_report(ctx.root, out, "Pretraining report", [
        f"Eval loss {out['initial_eval_loss']:.3f} at initialisation -> {out['final_eval_loss']:.3f} "
        f"after {out['steps']} steps ({drop:+.3f}). Loss curve: loss.png."])
    return out


def summary(report: dict) -> str:
    """The one closing line the runner prints."""
    return f"eval loss {report['initial_eval_loss']:.3f} -> {report['final_eval_loss']:.3f}"
