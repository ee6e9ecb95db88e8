"""``clinmega plot <run-dir>``: a PNG of the loss (train and validation) and LR curves of a run and,
when it scored ``train.eval_benchmarks``, benchmark accuracy against training tokens seen; read from
its ``metrics.jsonl`` (written by :mod:`clinmega.training.logging`)."""

from __future__ import annotations

from pathlib import Path

from clinmega.training.metrics_file import read_metrics
from clinmega.utils.atomic import tmp_sibling


def accuracy_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Per benchmark, (training tokens seen, accuracy) of each ``eval/<benchmark>/acc`` record."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for key, value in r.items():
            if key.startswith("eval/") and key.endswith("/acc") and "tokens" in r:
                out.setdefault(key[len("eval/"):-len("/acc")], []).append((r["tokens"], value))
    return out


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
    accuracy = accuracy_series(records)
    if accuracy:
        fig = plt.figure(figsize=(8, 9))
        ax_loss = fig.add_subplot(3, 1, 1)
        ax_lr = fig.add_subplot(3, 1, 2, sharex=ax_loss)
        ax_acc = fig.add_subplot(3, 1, 3)
        for name, points in sorted(accuracy.items()):
            ax_acc.plot(*zip(*points), label=name, marker=".")
        ax_acc.set_xlabel("training tokens seen")
        ax_acc.set_ylabel("accuracy")
        ax_acc.set_ylim(0, 1)
        ax_acc.legend()
        ax_acc.grid(alpha=0.3)
    else:
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
