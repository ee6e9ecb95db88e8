"""``clinmega plot <run-dir>``: a PNG of the loss (train and validation) and LR curves of a run,
read from its ``metrics.jsonl`` (written by :mod:`clinmega.training.logging`)."""

from __future__ import annotations

from pathlib import Path

from clinmega.training.metrics_file import read_metrics
from clinmega.utils.atomic import tmp_sibling


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write ``<run-dir>/curves.png`` (or ``output``); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    series = {key: [(r["step"], r[key]) for r in records if key in r]
              for key in ("loss", "val_loss", "lr", "moe_aux_loss")}
    if not series["loss"]:
        raise ValueError(f"{run_dir}: metrics.jsonl has no training loss records")
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for key, label in (("loss", "train loss"), ("val_loss", "validation loss"),
                       ("moe_aux_loss", "MoE load-balancing loss")):
        if series[key]:
            ax_loss.plot(*zip(*series[key]), label=label, marker="." if key == "val_loss" else None)
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if series["lr"]:
        ax_lr.plot(*zip(*series["lr"]), color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(output) if output else Path(run_dir) / "curves.png"
    tmp = tmp_sibling(out, suffix=".png")
    try:
        fig.savefig(tmp, dpi=100)
        tmp.replace(out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out
