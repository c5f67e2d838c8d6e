"""``danube plot RUN_DIR``: the report's Figure 1 from a run's TensorBoard logs.

A pretraining run is drawn against tokens seen (``1.5M``, ``2B``), its stages marked
where they begin; each stage logs a point at its first token, so the sequence-length
step falls on the boundary. A fine-tuning run (``finetune.py``) is drawn against
optimizer steps, with its own panels (DPO: reward margin and accuracy).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import yaml

PANELS = (
    ("train/loss", "Training loss"),
    ("val/loss", "Validation loss"),
    ("train/lr", "Learning rate"),
    ("train/seq_len", "Sequence length"),
)
FINETUNE_PANELS = {
    "sft": (("train/loss", "Training loss (answer tokens)"), ("train/lr", "Learning rate"),
            ("train/answer_tokens", "Answer tokens per step")),
    "dpo": (("train/loss", "DPO loss"), ("train/lr", "Learning rate"),
            ("rewards/margins", "Reward margin (chosen - rejected)"), ("rewards/accuracies", "Reward accuracy")),
}

Series = dict[str, list[tuple[int, float]]]


def read_stages(run_dir: str | Path) -> dict[str, Series]:
    """Every scalar of every stage (TensorBoard version directory), ordered by where the stage starts."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = Path(run_dir) / "tensorboard"
    stage_dirs = sorted({p.parent for p in tb.rglob("events.out.tfevents.*")})
    if not stage_dirs:
        raise FileNotFoundError(f"no TensorBoard event files under {tb}: is {run_dir} a danube run directory?")
    # Reading logs "No path found after <file>" for every event file at INFO, and a WARNING each time
    # it hides the points a resumed run logged again (the purge_step danube asks for): not news.
    logging.getLogger("tensorboard").setLevel(logging.ERROR)
    stages: dict[str, Series] = {}
    for stage_dir in stage_dirs:
        acc = EventAccumulator(str(stage_dir), size_guidance={"scalars": 0})
        acc.Reload()
        series = {tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}
        stages[str(stage_dir.relative_to(tb))] = series
    return dict(sorted(stages.items(), key=lambda kv: stage_start(kv[1])))


def stage_start(series: Series) -> int:
    """Where a stage begins: its first logged point (each stage logs one at its first token)."""
    firsts = [points[0][0] for points in series.values() if points]
    return min(firsts) if firsts else 0


def read_scalars(run_dir: str | Path) -> Series:
    """Every scalar of every stage of a run, as (x, value): stages in order, each sorted by x.

    x is tokens seen for pretraining, the optimizer step for fine-tuning. At a stage
    boundary the earlier stage's last point comes before the later stage's first.
    """
    series: Series = {}
    for stage in read_stages(run_dir).values():
        for tag, points in stage.items():
            series.setdefault(tag, []).extend(points)
    return series


def finetune_loss(run_dir: str | Path) -> str | None:
    """``sft`` or ``dpo`` for a ``finetune.py`` run directory (its config.yaml says), else None."""
    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        return None
    with open(config) as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict) or "model_dir" not in cfg or not isinstance(cfg.get("loss"), dict):
        return None
    return cfg["loss"].get("name")


def format_tokens(x: float, _pos=None) -> str:
    """Axis labels in tokens: 0, 500K, 1.5M, 2B, 1T."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.0f}"


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write a PNG of the run's curves (default ``RUN_DIR/figure1.png``); see :func:`make_figure`."""
    import matplotlib.pyplot as plt

    fig = make_figure(run_dir)
    output = Path(output) if output else Path(run_dir) / "figure1.png"
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def make_figure(run_dir: str | Path):
    """Figure 1's four panels against tokens (stages marked), or a fine-tuning run's against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    stages = read_stages(run_dir)
    series = read_scalars(run_dir)
    loss = finetune_loss(run_dir)
    panels = FINETUNE_PANELS.get(loss, FINETUNE_PANELS["sft"]) if loss else PANELS
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (tag, title) in zip(axes.flat, panels):
        points = series.get(tag, [])
        if points:
            x, y = zip(*points)
            ax.plot(x, y, drawstyle="steps-post" if tag == "train/seq_len" else "default", lw=1.2)
        else:
            ax.text(0.5, 0.5, f"no {tag} logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for i in range(len(panels), axes.size):
        axes.flat[i].axis("off")
        above = axes.flat[i - axes.shape[1]]  # the panel above an empty one carries the x-axis itself
        above.xaxis.set_tick_params(labelbottom=True)
    if loss:
        xlabel = "optimizer step"
    else:
        xlabel = "tokens seen"
        for ax in axes.flat[: len(panels)]:
            ax.xaxis.set_major_formatter(FuncFormatter(format_tokens))
        if len(stages) > 1:  # mark where each stage begins, named along the top panels
            for i, (name, stage) in enumerate(stages.items()):
                start = stage_start(stage)
                for j, ax in enumerate(axes.flat[: len(panels)]):
                    if i:
                        ax.axvline(start, color="0.5", ls="--", lw=0.8)
                    if j < axes.shape[1]:  # the top row
                        ax.text(start, 1.0, f" {name}", transform=ax.get_xaxis_transform(), va="top", ha="left",
                                fontsize=8, color="0.35")
    for i, ax in enumerate(axes.flat[: len(panels)]):
        if i + axes.shape[1] >= len(panels):  # nothing drawn below it: this panel shows the x-axis
            ax.set_xlabel(xlabel)
    fig.suptitle(f"{Path(run_dir).name}: {'fine-tuning (' + loss + ')' if loss else 'training'} logs")
    fig.tight_layout()
    return fig


def plot_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="danube plot", description="Plot a run's loss, LR and sequence length.")
    parser.add_argument("run_dir", help="a run directory of `python train.py` or `python finetune.py` "
                                        "(holds tensorboard/)")
    parser.add_argument("-o", "--output", help="PNG to write (default: RUN_DIR/figure1.png)")
    args = parser.parse_args(argv)
    print(f"wrote {plot_run(args.run_dir, args.output)}")
    return 0
