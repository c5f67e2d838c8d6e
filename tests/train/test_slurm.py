"""danube under a real SLURM: the shipped sbatch script, preemption by SIGUSR1, requeue, resume.

The cluster is the one-machine SLURM of ``slurm/local_cluster.sh`` (Debian's slurm-wlm and
munge, daemons on localhost), brought up by ``.ci/run`` and, if needed, by the fixture below:
both need root, and apt-get when the packages are missing. The jobs are the README's
``sbatch slurm/train.sbatch ...`` with CPU overrides: 2 tasks (gloo) instead of 8 GPUs.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.conftest import slurm_job as _job
from tests.conftest import wait_slurm_job as _wait_done
from tests.train.conftest import SMALL, TWO_RANKS

pytestmark = pytest.mark.slow

CPU = ["--ntasks-per-node=2", "--gpus-per-node=0"]
ARGS = TWO_RANKS  # two_processes (tests/train/conftest.py) is the same run on two local processes


def _sbatch(env: dict, out: Path, *args: str, options: tuple[str, ...] = ()) -> str:
    sub = subprocess.run(["sbatch", "--parsable", *CPU, *options, f"--output={out}", "slurm/train.sbatch", *args],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return sub.stdout.strip().split(";")[0]


def _wait_for(path: Path, env: dict, job: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.is_file():
        assert _job(env, job).get("JobState") in ("PENDING", "RUNNING"), _job(env, job)
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.2)


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = (load_file(str(d / "seq128" / "model" / "model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for stage in ("seq64", "seq128"):
        assert (a / stage / "data" / "steps.jsonl").read_text() == (b / stage / "data" / "steps.jsonl").read_text()


def test_the_sbatch_script_trains_what_two_local_processes_train(slurm, two_processes, data_root, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = _sbatch(slurm, out, *ARGS, f"paths.data_dir={data_root}", f"run_dir={run_dir}")
    info = _wait_done(slurm, job)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert re.search(rf"danube: job {job} start 1 on \S+: 1 node\(s\) x 2 task\(s\)", text), text[-3000:]
    assert text.count("train.py done in") == 1  # rank zero reports; the other rank says nothing
    _same_weights(two_processes, run_dir)
    assert not list(tmp_path.rglob("hpc_ckpt*")) and not list(REPO.glob("hpc_ckpt*"))


def test_the_sbatch_script_on_two_nodes_trains_what_two_local_processes_train(slurm, two_processes, data_root,
                                                                             tmp_path):
    """`sbatch --nodes=2 slurm/train.sbatch ... trainer=multinode`: one task per node, the README's N-node line."""
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = _sbatch(slurm, out, *ARGS, "trainer=multinode", "trainer.accelerator=cpu", f"paths.data_dir={data_root}",
                  f"run_dir={run_dir}", options=("--nodes=2", "--ntasks-per-node=1"))
    info = _wait_done(slurm, job)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert f"danube: job {job} start 1 on " in text and ": 2 node(s) x 1 task(s)" in text
    assert text.count("train.py done in") == 1  # global rank zero reports, on the first node
    _same_weights(two_processes, run_dir)


def test_sigusr1_checkpoints_requeues_and_the_requeued_job_resumes_bit_exactly(slurm, two_processes, data_root,
                                                                            tmp_path):
    """scancel --signal=USR1 (what --signal=USR1@120 sends before a preemption): checkpoint, requeue, resume."""
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = _sbatch(slurm, out, *ARGS, "data.num_workers=1", f"paths.data_dir={data_root}", f"run_dir={run_dir}")
    _wait_for(run_dir / "seq64" / "checkpoints" / "step00000003.ckpt", slurm, job)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
    info = _wait_done(slurm, job)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-3000:]
    assert "stopped by SIGUSR1 at optimizer step" in text
    assert f"SLURM job {job} requeued: it resumes from this checkpoint" in text
    assert f"danube: job {job} start 2" in text and "train.py done in" in text
    assert len(list((run_dir / "history").glob("*.yaml"))) == 2  # the first start and the requeued one
    _same_weights(two_processes, run_dir)
    assert not list(tmp_path.rglob("hpc_ckpt*"))


def test_scancel_stops_every_task_at_one_step_with_a_checkpoint_and_a_new_job_resumes(slurm, two_processes,
                                                                                      data_root, tmp_path):
    """`scancel` (and the time limit): SIGTERM to every task, SIGKILL after KillWait (10 s here).

    Both ranks stop at the same optimizer step within KillWait, with a checkpoint; the job is
    cancelled, not requeued; the same sbatch again resumes and ends bit-exact.
    """
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    args = [*ARGS, "data.num_workers=1", f"paths.data_dir={data_root}", f"run_dir={run_dir}"]
    job = _sbatch(slurm, out, *args)
    _wait_for(run_dir / "seq64" / "checkpoints" / "step00000003.ckpt", slurm, job)
    subprocess.run(["scancel", job], env=slurm, check=True)
    info = _wait_done(slurm, job)
    text = out.read_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", (info, text[-3000:])
    assert "stopped by SIGTERM at optimizer step" in text, text[-3000:]
    step = int(re.search(r"stopped by SIGTERM at optimizer step (\d+)", text).group(1))
    assert (run_dir / "seq64" / "checkpoints" / f"step{step:08d}.ckpt").is_file()
    assert "Traceback" not in text and "exited unexpectedly" not in text
    again = _sbatch(slurm, tmp_path / "again.out", *args)
    assert _wait_done(slurm, again)["JobState"] == "COMPLETED"
    _same_weights(two_processes, run_dir)


def test_a_job_that_may_not_be_requeued_exits_138_and_says_to_submit_again(slurm, two_processes, data_root,
                                                                        tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    args = [*ARGS, f"paths.data_dir={data_root}", f"run_dir={run_dir}"]
    job = _sbatch(slurm, out, *args, options=("--no-requeue",))
    _wait_for(run_dir / "seq64" / "checkpoints" / "step00000003.ckpt", slurm, job)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
    info = _wait_done(slurm, job)
    text = out.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("138"), (info, text[-3000:])
    assert f"SLURM job {job} does not allow a requeue (submit with sbatch --requeue); submit it again" in text
    again = _sbatch(slurm, tmp_path / "again.out", *args)
    assert _wait_done(slurm, again)["JobState"] == "COMPLETED"
    _same_weights(two_processes, run_dir)


def test_a_sweep_runs_each_job_as_a_slurm_job_and_a_preempted_job_resumes(slurm, data_root, tmp_path):
    """`train.py -m hydra/launcher=slurm` (submitit): one SLURM job per sweep job, each in its own run directory.

    Job 0 gets submitit's preemption warning (SIGUSR2) after its first checkpoint: it stops at the next
    optimizer step with a checkpoint, requeues itself and resumes; the sweep ends with both jobs complete.
    """
    from danube.sweep import sweep_report

    sweep_dir = tmp_path / "multirun"
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug",
           "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "optim.lr=3e-3,1e-2", *SMALL,
           "recipe.stages=[{name:seq64,seq_len:64,tokens:40960}]", "data.num_workers=1", "train.checkpoint_every_n_steps=3", f"paths.data_dir={data_root}",
           f"paths.runs_dir={tmp_path}/runs", f"hydra.sweep.dir={sweep_dir}"]
    sweep = subprocess.Popen(cmd, cwd=REPO, env=slurm, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = sweep_dir / "0" / "seq64" / "checkpoints" / "step00000003.ckpt"
    deadline = time.time() + 300
    while not first.is_file():
        assert sweep.poll() is None and time.time() < deadline, "job 0 wrote no checkpoint"
        time.sleep(0.2)
    jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm, capture_output=True, text=True).stdout.split()
    job0 = next(j for j in jobs if j.endswith("_0"))
    subprocess.run(["scancel", "--signal=USR2", job0], env=slurm, check=True)
    deadline = time.time() + 600
    while sweep.poll() is None:  # a requeued job is let start at once (SLURM holds it ~2 minutes)
        assert time.time() < deadline, "the sweep did not end"
        info = _job(slurm, job0)
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job0}", "StartTime=now"], env=slurm, capture_output=True)
        time.sleep(1)
    out = sweep.communicate()[0]
    assert sweep.returncode == 0, out[-3000:]
    logs = "".join(p.read_text() for p in (sweep_dir / ".submitit").rglob(f"{job0}_*_log.*"))
    assert "stopped by SIGUSR2 at optimizer step" in logs, logs[-3000:]
    assert "requeued: it resumes from this checkpoint" in logs and "resuming" in logs, logs[-3000:]
    assert len(list((sweep_dir / "0" / "history").glob("*.yaml"))) == 2  # started, requeued and resumed
    assert len(list((sweep_dir / "1" / "history").glob("*.yaml"))) == 1
    found, _ = sweep_report(sweep_dir, tensorboard=False)
    assert sorted((j.name, j.status) for j in found) == [("0", "complete"), ("1", "complete")]
