"""What ``train.deterministic`` costs on CPU, and whether it gives the same bits.

Runs ``python train.py`` (the tiny default model, its first ``train.max_steps`` optimizer
steps) with ``train.deterministic=true`` and ``=false`` in turn, rounds alternating the
order so a busy machine slows both alike. Each run is a fresh process (MKL reads its mode
at its first call). The figure is the median of ``perf/tokens_per_sec`` over a run's
logged steps, then the median over rounds; "same bits" compares each setting's runs with
its first (final weights, every logged train/val loss and LR).

    python bench/determinism.py              # 3 rounds of 12 steps; writes its BENCHMARKS.md section
    python bench/determinism.py --quick      # 1 round of 6 steps, prints only
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import benchlib


def train(run_dir: Path, deterministic: bool, steps: int) -> None:
    cmd = [sys.executable, "train.py", f"train.max_steps={steps}", f"train.deterministic={str(deterministic).lower()}",
           "train.val_every_n_steps=1000", f"run_dir={run_dir}"]
    done = subprocess.run(cmd, cwd=benchlib.REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def tokens_per_sec(run_dir: Path) -> float:
    from danube.plot import read_scalars

    return statistics.median(v for _, v in read_scalars(run_dir)["perf/tokens_per_sec"])


def last_weights(run_dir: Path):
    from danube.checkpoints import load_checkpoint, step_checkpoints

    stages = sorted(p for p in run_dir.iterdir() if (p / "checkpoints").is_dir())
    _, newest = step_checkpoints(stages[-1] / "checkpoints")[0]  # train.max_steps stops in the first stage
    return load_checkpoint(newest)["state_dict"]


def same_bits(a: Path, b: Path) -> bool:
    import torch

    from danube.plot import read_scalars

    wa, wb = last_weights(a), last_weights(b)
    if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
        return False
    sa, sb = read_scalars(a), read_scalars(b)
    return all(sa[t] == sb[t] for t in ("train/loss", "train/lr"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps (train.max_steps: of the first stage)")
    parser.add_argument("--quick", action="store_true", help="1 round of 6 steps")
    benchlib.add_write_flags(parser)
    args = parser.parse_args(argv)
    rounds, steps = (1, 6) if args.quick else (args.rounds, args.steps)
    speeds: dict[bool, list[float]] = {True: [], False: []}
    runs: dict[bool, list[Path]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="danube-determinism-") as tmp:
        for r in range(rounds):
            for setting in ((True, False) if r % 2 == 0 else (False, True)):
                run_dir = Path(tmp) / f"{setting}-{r}"
                train(run_dir, setting, steps)
                speeds[setting].append(tokens_per_sec(run_dir))
                runs[setting].append(run_dir)
                print(f"round {r + 1}/{rounds} deterministic={setting}: {speeds[setting][-1]:,.0f} tokens/s", flush=True)
        identical = {s: all(same_bits(runs[s][0], other) for other in runs[s][1:]) for s in runs}
    base = statistics.median(speeds[False])
    rows = [[f"train.deterministic={str(s).lower()}", f"{statistics.median(speeds[s]):,.0f}",
             f"{min(speeds[s]):,.0f}-{max(speeds[s]):,.0f}", f"{statistics.median(speeds[s]) / base:.2f}",
             ("yes" if identical[s] else "no") if rounds > 1 else "-"] for s in (True, False)]
    note = (f"The tiny default model (`python train.py`), its first {steps} optimizer steps (`train.max_steps`), "
            f"{rounds} rounds alternating the order; tokens/s is the median over a run's logged steps, then over rounds. "
            "'Same bits': every run of that setting ends with the first one's weights and logged losses. "
            "`auto` (the default) is `true` on CPU.")
    benchlib.publish("determinism", "Deterministic numerics on CPU (train.deterministic)",
                     ["setting", "tokens/s", "range over rounds", "vs false", "same bits across invocations"], rows, note,
                     write=benchlib.should_write(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
