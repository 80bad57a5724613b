"""The template's report: report.json/md and the loss curve."""
from __future__ import annotations

from ...report import plot_metrics, write_report
from ...runner import StageContext


def report(ctx: StageContext, results: dict) -> dict:
    out = {"held_out_mse": results["evaluate"]["held_out_mse"], "weight_error": results["evaluate"]["weight_error"],
           "noise_floor": ctx.cfg.data.noise ** 2, "steps": results["fit"]["steps"]}
    plot_metrics(ctx.stage_dir("fit"), ["loss"], "loss.png", title="training loss")
    write_report(ctx.root, out, "Template: linear regression",
                 [f"Held-out MSE {out['held_out_mse']:.4f} (noise floor {out['noise_floor']:.4f})."])
    return out


def summary(report: dict) -> str:
    """The one closing line the runner prints."""
    return f"held-out MSE {report['held_out_mse']:.4f}"
