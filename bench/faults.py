"""Fault injection: kill `python train.py` at random moments and damage its files; count what survives.

Kills: each trial starts the debug run (``debug=fast``: two stages, 16 optimizer steps of
4 micro-batches, a checkpoint every 3 steps) and SIGKILLs or SIGTERMs it after a random
delay, again and again, until a run completes; the trial's final weights and logged losses
are compared bit for bit with one uninterrupted run. Corruptions: random bytes written into
the newest step checkpoint of a stopped run, into a finished stage's ``final.ckpt``, into a
model directory's weights, and a truncated checkpoint; each case counts as detected when
the next command either refuses the file naming it or falls back to an intact one and still
ends bit-exact.

    python bench/faults.py                 # 6 kill trials, every corruption case; writes its section
    python bench/faults.py --quick         # 2 trials (prints only)
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

FAST = ["debug=fast", "data.num_workers=0", "train.checkpoint_every_n_steps=3"]


def train(data: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *FAST, f"paths.data_dir={data}", f"run_dir={run_dir}", *extra],
                            cwd=benchlib.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate()
    return proc.returncode, out


def same_run(a: Path, b: Path) -> bool:
    """Final weights equal bit for bit, and every logged train/val loss and LR at the same tokens."""
    import torch
    from safetensors.torch import load_file

    from danube.plot import read_scalars

    wa, wb = (load_file(str(d / "seq128" / "model" / "model.safetensors")) for d in (a, b))
    if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
        return False
    sa, sb = read_scalars(a), read_scalars(b)
    return all(sa[t] == sb[t] for t in ("train/loss", "val/loss", "train/lr"))


def kill_trial(data: Path, run_dir: Path, rng: random.Random, max_delay: float) -> dict:
    kills = {"SIGKILL": 0, "SIGTERM": 0}
    codes = []
    while True:
        proc = train(data, run_dir)
        delay = rng.uniform(1.0, max_delay)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            sig = signal.SIGTERM if rng.random() < 0.3 else signal.SIGKILL
            proc.send_signal(sig)
            kills[sig.name] += 1
        rc, err = finish(proc)
        codes.append(rc)
        if rc == 0:
            return {"kills": kills, "codes": codes}
        if rc not in (-signal.SIGKILL, 143, -signal.SIGTERM):
            raise RuntimeError(f"train.py failed with {rc} after a kill:\n{err[-2000:]}")


def damage(path: Path, rng: random.Random, nbytes: int = 4096) -> None:
    with open(path, "r+b") as f:
        f.seek(rng.randrange(0, max(1, path.stat().st_size - nbytes)))
        f.write(os.urandom(nbytes))


def corruption_cases(data: Path, work: Path, straight: Path, rng: random.Random) -> list[tuple[str, bool, str]]:
    from danube.checkpoints import step_checkpoints

    results = []
    # 1. the newest step checkpoint of a stopped run: the next run must fall back and still end bit-exact
    run_dir = work / "c1"
    rc, err = finish(train(data, run_dir, "stage=seq64", "train.max_steps=7", "train.keep_checkpoints=2"))
    assert rc == 0, err[-2000:]
    newest = step_checkpoints(run_dir / "seq64" / "checkpoints")[0][1]
    damage(newest, rng)
    rc, err = finish(train(data, run_dir))
    ok = rc == 0 and "is damaged" in err and same_run(straight, run_dir)
    results.append(("random bytes in the newest step checkpoint", ok, "set aside, the one before resumed"))
    # 2. truncated newest checkpoint
    run_dir = work / "c2"
    rc, err = finish(train(data, run_dir, "stage=seq64", "train.max_steps=7", "train.keep_checkpoints=2"))
    newest = step_checkpoints(run_dir / "seq64" / "checkpoints")[0][1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])
    rc, err = finish(train(data, run_dir))
    ok = rc == 0 and "is damaged" in err and same_run(straight, run_dir)
    results.append(("truncated newest step checkpoint", ok, "set aside, the one before resumed"))
    # 3. a finished stage's final.ckpt, needed by the next stage
    run_dir = work / "c3"
    rc, err = finish(train(data, run_dir, "stage=seq64"))
    damage(run_dir / "seq64" / "final.ckpt", rng)
    rc, err = finish(train(data, run_dir, "stage=seq128"))
    ok = rc == 1 and "corrupt file" in err and "final.ckpt" in err
    results.append(("random bytes in the previous stage's final.ckpt", ok, "refused, naming it"))
    # 4. a model directory's weights
    model_dir = work / "c4"
    shutil.copytree(straight / "seq128" / "model", model_dir)
    damage(model_dir / "model.safetensors", rng)
    rc = subprocess.run([sys.executable, "-m", "danube.cli", "export-hf", str(model_dir), str(work / "c4_hf")],
                        capture_output=True, text=True)
    ok = rc.returncode == 1 and "corrupt file" in rc.stderr and not (work / "c4_hf").exists()
    results.append(("random bytes in a model directory's weights", ok, "export-hf refused, naming the file"))
    # 5. a pickle planted as a checkpoint
    run_dir = work / "c5"
    rc, err = finish(train(data, run_dir, "stage=seq64", "train.max_steps=2"))
    marker = work / "c5_ran"
    planted = run_dir / "seq64" / "checkpoints" / "step00000099.ckpt"
    subprocess.run([sys.executable, "-c", "import sys, pathlib, torch\n"
                    "class P:\n def __reduce__(self): return (pathlib.Path.write_text, (pathlib.Path(sys.argv[1]), 'x'))\n"
                    "torch.save({'evil': P()}, sys.argv[2])", str(marker), str(planted)], check=True)
    rc, err = finish(train(data, run_dir))
    ok = not marker.exists() and rc == 1 and "refusing to unpickle" in err
    results.append(("a pickle planted as the newest checkpoint", ok, "refused, never run"))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6, help="kill trials (each killed until it completes)")
    parser.add_argument("--max-delay", type=float, default=None,
                        help="seconds after a start a kill may come (default: 90%% of the uninterrupted run's time)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 trials")
    benchlib.add_write_flags(parser)
    args = parser.parse_args(argv)
    trials = 2 if args.quick else args.trials
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="danube-bench-faults-"))
    data = work / "data"
    straight = work / "straight"
    start = time.perf_counter()
    rc, err = finish(train(data, straight))
    if rc != 0:
        raise SystemExit(f"the uninterrupted run failed:\n{err[-3000:]}")
    started = time.perf_counter()
    rc, err = finish(train(data, work / "timing"))  # the data is built now: this is the run's own time
    args.max_delay = args.max_delay or 0.9 * (time.perf_counter() - started)
    rows, kills, exact = [], {"SIGKILL": 0, "SIGTERM": 0}, 0
    for t in range(trials):
        outcome = kill_trial(data, work / f"k{t}", rng, args.max_delay)
        same = same_run(straight, work / f"k{t}")
        exact += same
        for k, n in outcome["kills"].items():
            kills[k] += n
        rows.append([f"kills, trial {t + 1}", f"{outcome['kills']['SIGKILL']} SIGKILL, {outcome['kills']['SIGTERM']} SIGTERM",
                     " ".join(map(str, outcome["codes"])), "bit-exact" if same else "DIFFERENT"])
    cases = corruption_cases(data, work, straight, rng)
    rows += [[what, "", how, "detected" if ok else "MISSED"] for what, ok, how in cases]
    total = sum(kills.values())
    note = (f"{trials} trials, {total} kills ({kills['SIGKILL']} SIGKILL, {kills['SIGTERM']} SIGTERM) at random moments "
            f"1 to {args.max_delay:.0f} s after each start (start-up, training, validation, checkpoint writes): {exact} of "
            f"{trials} trials ended bit-exact with the uninterrupted run (weights and every logged loss). "
            f"{sum(ok for _, ok, _ in cases)} of {len(cases)} file faults detected. *exit codes*: one per start "
            "(-9: SIGKILL, 143: SIGTERM handled at a step boundary after a checkpoint, -15: SIGTERM during start-up, "
            "before training began, with nothing to save (a shell reports it as 143), 0: complete). "
            f"{time.perf_counter() - start:.0f} s in all.\n")
    benchlib.publish("faults", "Fault injection (train.py debug=fast, CPU)", ["case", "faults", "exit codes", "result"],
                     rows, note, write=benchlib.should_write(args))
    return 0 if exact == trials and all(ok for _, ok, _ in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
