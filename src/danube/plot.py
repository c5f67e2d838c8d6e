"""``danube plot RUN_DIR``: the report's Figure 1 from a run's TensorBoard logs."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

PANELS = (
    ("train/loss", "Training loss"),
    ("val/loss", "Validation loss"),
    ("train/lr", "Learning rate"),
    ("train/seq_len", "Sequence length"),
)


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of every stage of a run, as (tokens seen, value) sorted by tokens."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = Path(run_dir) / "tensorboard"
    stage_dirs = sorted({p.parent for p in tb.rglob("events.out.tfevents.*")})
    if not stage_dirs:
        raise FileNotFoundError(f"no TensorBoard event files under {tb}: is {run_dir} a danube run directory?")
    # Reading logs "No path found after <file>" for every event file at INFO: not news.
    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    series: dict[str, list[tuple[int, float]]] = {}
    for stage_dir in stage_dirs:
        acc = EventAccumulator(str(stage_dir), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(points) for tag, points in series.items()}


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write a 2x2 PNG: train loss, val loss, LR and sequence length against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_scalars(run_dir)
    output = Path(output) if output else Path(run_dir) / "figure1.png"
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (tag, title) in zip(axes.flat, PANELS):
        points = series.get(tag, [])
        if points:
            x, y = zip(*points)
            ax.plot(x, y, drawstyle="steps-post" if tag == "train/seq_len" else "default", lw=1.2)
        else:
            ax.text(0.5, 0.5, f"no {tag} logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("tokens seen")
    fig.suptitle(f"{Path(run_dir).name}: training logs")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def plot_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="danube plot", description="Plot a run's loss, LR and sequence length.")
    parser.add_argument("run_dir", help="a run directory of `python train.py` (holds tensorboard/)")
    parser.add_argument("-o", "--output", help="PNG to write (default: RUN_DIR/figure1.png)")
    args = parser.parse_args(argv)
    print(f"wrote {plot_run(args.run_dir, args.output)}")
    return 0
