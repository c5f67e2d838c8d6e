"""Warmup-stable-decay schedules, and cooldowns branched from a run's checkpoints into their own run directories."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from danube.plot import read_scalars
from danube.schedule import Schedule
from danube.sweep import find_jobs
from danube.tasks.train import load, run
from tests.conftest import REPO
from tests.train.conftest import SMALL, compose_train

# debug=fast in two shorter stages: seq64 (6 steps) and seq128 (4 steps) of 4,096 tokens, warm-up 8,192 tokens to
# 1e-2, floor 1e-3. The decay covers the last 20,480 tokens: it starts after step 5 of seq64 and crosses into seq128.
WSD = ["optim.schedule=wsd", "optim.decay_tokens=20480", "train.keep_checkpoints=5", "train.checkpoint_every_n_steps=2",
       "recipe.stages=[{name: seq64, seq_len: 64, tokens: 24576}, {name: seq128, seq_len: 128, tokens: 16384}]"]


def wsd_lr(t: float, *, shape: str = "linear", decay_start: float = 20480, total: float = 40960) -> float:
    """The WSD run's LR at t tokens, written out."""
    if t < 8192:
        return 1e-2 * t / 8192
    if t <= decay_start:
        return 1e-2
    f = min((t - decay_start) / (total - decay_start), 1.0)
    left = {"linear": 1 - f, "sqrt": 1 - math.sqrt(f), "cosine": (1 + math.cos(math.pi * f)) / 2}[shape]
    return 1e-3 + 9e-3 * left


@pytest.mark.parametrize("shape", ["linear", "sqrt", "cosine"])
def test_wsd_is_warmup_constant_then_the_decay_shape(shape):
    schedule = Schedule(lr=1e-2, min_lr=1e-3, warmup=8192, total=65536, kind="wsd", decay=32768, shape=shape)
    for t in range(0, 70000, 512):
        assert schedule(t) == pytest.approx(wsd_lr(t, shape=shape, decay_start=32768, total=65536),
                                            rel=1e-12, abs=1e-15), t
    assert schedule(1) > 0 and schedule(65536) == 1e-3 and schedule.decay_start == 32768


@pytest.mark.parametrize("overrides, message", [
    (["optim.schedule=wsd", "optim.decay_tokens=65536"], r"optim.decay_tokens=65,536: the decay is longer than the "
                                                         r"run's 57,344 tokens after the warm-up"),
    (["optim.schedule=wsd", "optim.decay_fraction=0"], r"optim.decay_fraction=0 must be > 0"),
    (["optim.schedule=wsd", "optim.decay_fraction=1.5"], r"optim.decay_fraction=1.5 must be <= 1"),
    (["optim.decay_tokens=4096"], r"optim.decay_tokens=4096 is a setting of optim.schedule=wsd"),
    (["optim.decay_shape=exp"], r"optim.decay_shape='exp'; allowed: linear, sqrt, cosine"),
    (["cooldown.checkpoint=x.ckpt"], r"cooldown.checkpoint=x.ckpt needs cooldown.tokens=N"),
    (["cooldown.tokens=4096"], r"cooldown.tokens=4096 needs cooldown.checkpoint=PATH"),
    (["cooldown.checkpoint=x.ckpt", "cooldown.tokens=4096", "stage=seq64"], r"stage=seq64 with cooldown.checkpoint"),
])
def test_bad_schedule_values_are_one_line_before_any_work(overrides, message):
    with pytest.raises(ValueError, match=message):
        load(compose_train(["debug=fast", *overrides]))


def test_a_decay_fraction_of_one_decays_from_the_end_of_warmup(capsys):
    run(compose_train(["debug=fast", "optim.schedule=wsd", "optim.decay_fraction=1", "plan=true"]))
    foot = capsys.readouterr().out.strip().splitlines()[-1]
    assert "constant to 8,192, then linear decay over 57,344 tokens to 0.001" in foot
    run(compose_train(["debug=fast", *WSD, "optim.decay_shape=sqrt", "plan=true"]))
    foot = capsys.readouterr().out.strip().splitlines()[-1]
    assert "constant to 20,480, then sqrt decay over 20,480 tokens" in foot
    assert "the decay starts in stage seq64, after its step 5" in foot


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root``: (sha256, mtime): what "never written" means."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def branched(tmp_path_factory, data_root):
    """A WSD run stopped in its first stage (train.max_steps=5), two cooldowns branched from it in one multirun
    (steps 2 and 4, both before the decay), then the run continued to its end."""
    tmp = tmp_path_factory.mktemp("wsd")
    parent = tmp / "run"
    common = [*SMALL, *WSD, "train.val_batches=2", f"paths.data_dir={data_root}"]
    first = run(compose_train([*common, f"run_dir={parent}", "train.max_steps=5"]))
    assert not first.complete
    before = tree_digest(parent)
    sweep = tmp / "cooldowns"
    checkpoints = ",".join(str(parent / "seq64" / "checkpoints" / f"step{k:08d}.ckpt") for k in (2, 4))
    out = subprocess.run(
        [sys.executable, "train.py", "-m", *common, f"cooldown.checkpoint={checkpoints}", "cooldown.tokens=8192",
         "cooldown.shape=sqrt", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    after = tree_digest(parent)
    report = subprocess.run([sys.executable, "-m", "danube.cli", "sweep-report", str(sweep)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    final = run(compose_train([*common, f"run_dir={parent}"]))
    return dict(parent=parent, sweep=sweep, before=before, after=after, final=final, log=out.stdout + out.stderr)


@pytest.mark.slow
def test_the_lr_of_a_resumed_multi_stage_wsd_run_is_the_closed_form_at_every_step(branched):
    assert branched["final"].complete and branched["final"].tokens_seen == 40960
    points = read_scalars(branched["parent"])["train/lr"]
    steps = {t for t, _ in points if t % 4096 == 0 and t > 0}
    assert steps == {4096 * k for k in range(1, 11)}  # every step, across the resume and the stage boundary
    for tokens, value in points:
        assert value == pytest.approx(wsd_lr(tokens), rel=1e-6), tokens


@pytest.mark.slow
def test_cooldowns_never_write_the_run_they_branch_from(branched):
    assert branched["after"] == branched["before"]
    assert sorted(p.name for p in branched["parent"].parent.iterdir()) == ["cooldowns", "run"]


@pytest.mark.slow
def test_a_cooldown_starts_where_its_checkpoint_left_and_decays_to_min_lr(branched):
    parent = read_scalars(branched["parent"])
    parent_loss = dict(parent["train/loss"])
    parent_steps = (branched["parent"] / "seq64" / "data" / "steps.jsonl").read_text().splitlines()
    jobs = find_jobs(branched["sweep"])
    assert [j.status for j in jobs] == ["complete", "complete"]
    for job, step in zip(jobs, (2, 4)):
        start = 4096 * step
        assert (job.path / "cooldown" / "model" / "model.safetensors").is_file()
        assert json.loads((job.path / "cooldown" / "complete.json").read_text())["tokens_seen"] == start + 8192
        scalars = read_scalars(job.path)
        for tokens, value in scalars["train/lr"]:  # from the checkpoint's LR (the peak) down the sqrt
            assert value == pytest.approx(1e-3 + 9e-3 * (1 - math.sqrt((tokens - start) / 8192)), rel=1e-6), tokens
        assert scalars["train/lr"][-1] == (start + 8192, pytest.approx(1e-3))
        # the same weights and the same next batch as the run: its first step's loss is the run's next one
        assert scalars["train/loss"][0] == (start + 4096, pytest.approx(parent_loss[start + 4096], rel=1e-6))
        ours = [json.loads(r)["sources"] for r in (job.path / "cooldown" / "data" / "steps.jsonl").read_text().split()]
        assert ours == [json.loads(r)["sources"] for r in parent_steps[step:step + 2]]
        assert job.val_loss is not None and math.isfinite(job.val_loss)
    rows = [r for r in (branched["sweep"] / "sweep.md").read_text().splitlines() if r.startswith("| ")]
    assert "cooldown.checkpoint" in rows[0] and len(rows) == 3
    assert "decay from 8,192" in branched["log"] and "decay from 16,384" in branched["log"]


@pytest.mark.slow
def test_a_cooldown_refuses_a_run_dir_in_its_parent_and_another_model(branched, data_root):
    ckpt = branched["parent"] / "seq64" / "checkpoints" / "step00000004.ckpt"
    common = [*SMALL, *WSD, f"paths.data_dir={data_root}", f"cooldown.checkpoint={ckpt}", "cooldown.tokens=4096"]
    before = tree_digest(branched["parent"])
    with pytest.raises(ValueError, match="never inside the run it branches from"):
        run(compose_train([*common, f"run_dir={branched['parent'] / 'cd'}"]))
    with pytest.raises(ValueError, match=r"made with other values of model.n_layer: 2 -> 3"):
        run(compose_train([*common, "model.n_layer=3"]))
    with pytest.raises(FileNotFoundError, match=r"cooldown.checkpoint=.*step00000099.ckpt: no such file"):
        run(compose_train([*common[:-2], f"cooldown.checkpoint={ckpt.with_name('step00000099.ckpt')}",
                           "cooldown.tokens=4096"]))
    assert tree_digest(branched["parent"]) == before
