"""Faults: kills at any moment, preemption, damaged files, planted pickles, reused directories, bad values.

The subprocess tests run ``python train.py`` exactly as a user would and kill it from
outside; the in-process ones call ``danube.tasks.train.run``. An uninterrupted run of the
same config is the reference: resumed runs must match it bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from danube import rundir
from danube.checkpoints import check_checkpoint, load_checkpoint, step_checkpoints
from danube.model.io import CorruptFileError
from danube.model.loading import load_model
from danube.plot import read_scalars
from danube.tasks.train import run
from tests.conftest import REPO
from tests.train.conftest import SMALL, compose_train

# debug=fast: seq64 has 10 steps (4 micro-batches each), seq128 6; a checkpoint every 3 steps.
FAST = [*SMALL, "train.checkpoint_every_n_steps=3"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
TOTAL = 40960 + 24576


def _cmd(data_root, run_dir, *extra):
    return [sys.executable, "train.py", *FAST, f"paths.data_dir={data_root}", f"run_dir={run_dir}", *extra]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "seq128" / "model" / "model.safetensors"))


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    sa, sb = read_scalars(a), read_scalars(b)
    for tag in ("train/loss", "val/loss", "train/lr"):
        assert sa[tag] == sb[tag], tag  # same steps, same values: no duplicates, nothing lost
    for stage in ("seq64", "seq128"):  # what every step read, and the position at the end: the same
        for record in ("steps.jsonl", "positions.jsonl"):
            rows_a = (a / stage / "data" / record).read_text().splitlines()
            rows_b = (b / stage / "data" / record).read_text().splitlines()
            if record == "positions.jsonl":  # checkpoints at other steps in a resumed run: compare the last
                rows_a, rows_b = rows_a[-1:], rows_b[-1:]
            assert rows_a == rows_b, (stage, record)


def _wait_for(predicate, proc, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_root):
    """The uninterrupted reference run, made the way the killed ones are (a subprocess)."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run(_cmd(data_root, run_dir), cwd=REPO, env=ENV, check=True, capture_output=True)
    return run_dir


# -- reproducibility -------------------------------------------------------------------------
def test_a_second_invocation_gives_the_same_bits_and_records_its_numerics(straight, data_root, tmp_path):
    """Same config, machine and seed: a fresh invocation equals the reference bit for bit (train.deterministic)."""
    again = tmp_path / "again"
    subprocess.run(_cmd(data_root, again), cwd=REPO, env=ENV, check=True, capture_output=True)
    _assert_same_run(straight, again)
    runtime = rundir.last_runtime(again)
    assert runtime["deterministic"] is True and runtime["mkl_cbwr"] == "AUTO"
    assert runtime["threads"] == torch.get_num_threads() and runtime["torch"] == torch.__version__


def test_a_resume_on_other_numerics_is_warned_about(tmp_path, caplog):
    config = {"seed": 0}
    rundir.record_invocation(tmp_path, config, [], {"torch": "2.13.0", "threads": 2, "mkl_cbwr": "AUTO"})
    assert rundir.runtime_changes(tmp_path, {"torch": "2.13.0", "threads": 2, "mkl_cbwr": "AUTO"}) == []
    assert rundir.runtime_changes(tmp_path, {"torch": "2.13.0", "threads": 4, "mkl_cbwr": "AUTO"}) == ["threads 2 -> 4"]
    assert "not bit for bit" in caplog.text
    rundir.record_invocation(tmp_path, config, [])  # an invocation that recorded no runtime: nothing to compare
    assert rundir.runtime_changes(tmp_path, {"threads": 1}) == []


# -- kills ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_three_sigkills_resume_bit_exactly(straight, data_root, tmp_path):
    """Killed before any checkpoint, right after one, then right after the resumed run's first new one."""
    run_dir = tmp_path / "killed"
    ckpts = run_dir / "seq64" / "checkpoints"
    proc = subprocess.Popen(_cmd(data_root, run_dir), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    tb = run_dir / "tensorboard" / "seq64"
    _wait_for(lambda: any(f.stat().st_size > 1000 for f in tb.glob("events.*")), proc, "the first points on disk")
    proc.kill()  # before any checkpoint: the stage starts over, and what it logged must not show twice
    proc.wait()
    assert not step_checkpoints(ckpts)
    proc = subprocess.Popen(_cmd(data_root, run_dir), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for(lambda: (ckpts / "step00000003.ckpt").is_file(), proc, "the first checkpoint")
    proc.kill()
    proc.wait()
    # The resumed run starts one micro-batch into step 4: a checkpoint written now would be mid-accumulation.
    proc = subprocess.Popen(_cmd(data_root, run_dir), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for(lambda: any(s > 3 for s, _ in step_checkpoints(ckpts)) or any(ckpts.glob("*-v*")), proc,
              "the resumed run's next checkpoint")
    proc.kill()
    proc.wait()
    assert not any(ckpts.glob("*-v*.ckpt"))
    assert all(s % 3 == 0 or s == 10 for s, _ in step_checkpoints(ckpts))  # step boundaries only
    subprocess.run(_cmd(data_root, run_dir), cwd=REPO, env=ENV, check=True, capture_output=True)
    _assert_same_run(straight, run_dir)
    assert not list(run_dir.rglob(".*.tmp-*"))  # no temporary files left behind


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, group, workers", [
    (signal.SIGTERM, 143, True, 1),   # SLURM: the whole process group, data loader workers included
    (signal.SIGINT, 130, False, 0),   # Ctrl-C on the training process
    # SIGUSR1/SIGUSR2, SLURM's and submitit's warnings, to the whole job: tests/train/test_slurm.py, for real
])
def test_preemption_saves_at_a_step_boundary_and_exits_non_zero(straight, data_root, tmp_path, sig, code, group,
                                                               workers):
    run_dir = tmp_path / "preempted"
    proc = subprocess.Popen(_cmd(data_root, run_dir, f"data.num_workers={workers}"), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    tb = run_dir / "tensorboard" / "seq64"
    _wait_for(lambda: any(tb.glob("events.out.tfevents.*")), proc, "training to start")
    time.sleep(1.0)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == code, out[-2000:]
    assert f"stopped by {signal.Signals(sig).name}" in out and "Run the same command again to resume" in out
    assert "Traceback" not in out
    saved = step_checkpoints(run_dir / "seq64" / "checkpoints")
    assert saved, "no checkpoint was written on the way out"
    assert not (run_dir / "seq64" / "complete.json").exists()
    subprocess.run(_cmd(data_root, run_dir, f"data.num_workers={workers}"), cwd=REPO, env=ENV, check=True,
                   capture_output=True)
    _assert_same_run(straight, run_dir)


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_in_one_line_and_the_run_resumes(data_root, tmp_path):
    """Exit 130 and one line naming the checkpoint the next run resumes from; no process of the run is left.

    Two DDP ranks: Lightning's launcher started the second, which must go too. (That a resume from
    a checkpoint ends bit-exact whatever stopped the run before: the kills and preemptions above.)
    """
    run_dir = tmp_path / "run"
    extra = ["trainer.devices=2", "trainer.strategy=ddp"]
    proc = subprocess.Popen(_cmd(data_root, run_dir, *extra), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    first = run_dir / "seq64" / "checkpoints" / "step00000003.ckpt"
    _wait_for(first.is_file, proc, "the first checkpoint")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    line = next(x for x in out.splitlines() if "stopped at once" in x)
    assert line.startswith("train.py: stopped at once by a second SIGINT; the next run resumes from ")
    assert "Traceback" not in out
    time.sleep(1.0)
    left = subprocess.run(["pgrep", "-f", f"run_dir={run_dir}"], capture_output=True, text=True).stdout.split()
    assert not left, "a process of the stopped run is still alive"
    subprocess.run(_cmd(data_root, run_dir, *extra), cwd=REPO, env=ENV, check=True, capture_output=True)
    assert (run_dir / "seq128" / "complete.json").is_file()


def test_lightning_s_own_slurm_requeue_is_never_in_charge(monkeypatch):
    """Under srun, Lightning would write hpc_ckpt_N.ckpt on SIGUSR1 and restore from it by itself: turned off."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from danube import cluster

    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert cluster.lightning_plugins() == []
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "danube")
    (plugin,) = cluster.lightning_plugins()
    assert isinstance(plugin, SLURMEnvironment) and plugin.auto_requeue is False


def test_a_requeue_says_what_happened(tmp_path, monkeypatch):
    """`scontrol` as SLURM answers: the job requeued, a job that does not allow it, scontrol missing."""
    from danube import cluster

    calls = tmp_path / "calls"
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f"""#!/bin/sh
echo "$@" >> {calls}
if [ "$1" = show ]; then echo "JobId=$4 JobName=x Requeue=$REQUEUE Restarts=0"; fi
""")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scontrol.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("REQUEUE", "1")
    assert cluster.requeue("77") == "SLURM job 77 requeued: it resumes from this checkpoint when it starts again"
    assert calls.read_text().splitlines()[-1] == "requeue 77"
    monkeypatch.setenv("REQUEUE", "0")
    assert "does not allow a requeue (submit with sbatch --requeue)" in cluster.requeue("78")
    assert "requeue 78" not in calls.read_text()
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert "scontrol is not on PATH" in cluster.requeue("79")


def test_a_kill_during_the_model_write_is_finished_on_the_next_run(small_run, monkeypatch, tmp_path):
    import danube.tasks.train as train

    cfg = compose_train(small_run)
    real = train.save_model_dir

    def killed_mid_write(model, path, tokenizer=None):
        if Path(path).parent.name == "seq128":
            (Path(path).parent / ".model.tmp-999999-abc").mkdir()  # what a SIGKILL mid-write leaves
            raise KeyboardInterrupt("killed")
        return real(model, path, tokenizer)

    monkeypatch.setattr(train, "save_model_dir", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    assert (run_dir / "seq128" / "final.ckpt").is_file() and not (run_dir / "seq128" / "model").exists()
    result = run(cfg)
    assert result.model_dir.is_dir() and result.tokens_seen == TOTAL
    final = load_checkpoint(run_dir / "seq128" / "final.ckpt")
    for name, value in load_model(result.model_dir).state_dict().items():
        assert torch.equal(value, final["state_dict"][f"model.{name}"]), name
    assert not (run_dir / "seq128" / ".model.tmp-999999-abc").exists()
    # deleted by hand: written again from final.ckpt, not reported complete without it
    import shutil

    shutil.rmtree(result.model_dir)
    (run_dir / "seq128" / "complete.json").unlink()
    assert run(cfg).model_dir.is_dir()


# -- damaged and planted files -------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_pickle_planted_in_the_run_dir_never_runs(small_run, tmp_path):
    cfg = compose_train([*small_run, "stage=seq64", "train.max_steps=1"])
    run(cfg)  # a run dir with a config, stopped early
    marker = tmp_path / "pwned"
    torch.save({"danube": {"tokens_seen": 40960}, "evil": _Payload(marker)}, tmp_path / "run" / "seq64" / "final.ckpt")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        run(compose_train(small_run))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        run(compose_train([*small_run, "stage=seq128"]))
    assert not marker.exists()


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(small_run, tmp_path, caplog):
    cfg = compose_train([*small_run, "train.checkpoint_every_n_steps=3", "train.keep_checkpoints=2",
                         "stage=seq64", "train.max_steps=7"])
    run(cfg)  # checkpoints at 3 and 6 kept (and 7, the stop); keep=2 leaves 6 and 7
    ckpts = tmp_path / "run" / "seq64" / "checkpoints"
    assert [s for s, _ in step_checkpoints(ckpts)] == [7, 6]
    newest = ckpts / "step00000007.ckpt"
    with open(newest, "r+b") as f:  # a few KB of garbage in the middle of the file
        f.seek(newest.stat().st_size // 2)
        f.write(os.urandom(4096))
    assert check_checkpoint(newest) is not None
    with caplog.at_level("INFO"):
        result = run(compose_train([*small_run, "train.checkpoint_every_n_steps=3", "stage=seq64"]))
    assert "step00000007.ckpt is damaged" in caplog.text and "resuming " in caplog.text
    assert "step00000006.ckpt (step 6)" in caplog.text
    assert result.tokens_seen == 40960 and (ckpts / "step00000007.ckpt.corrupt").is_file()


def test_a_finished_run_needs_no_intact_earlier_checkpoint(small_run, tmp_path):
    cfg = compose_train(small_run)
    first = run(cfg)
    (tmp_path / "run" / "seq64" / "final.ckpt").write_bytes(b"not a checkpoint")
    again = run(cfg)
    assert again.tokens_seen == TOTAL and again.final_val_loss == first.final_val_loss


def test_damaged_weights_are_refused_naming_the_file(small_run, tmp_path, capsys):
    from danube.cli import main as cli_main

    model_dir = run(compose_train(small_run)).model_dir
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = os.urandom(4096)
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"corrupt file .*model.safetensors: its sha256"):
        load_model(model_dir)
    assert cli_main(["export-hf", str(model_dir), str(tmp_path / "hf")]) == 1
    assert "corrupt file" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    weights.write_bytes(b"\x00" * 64)  # a broken header, checksum file gone too
    (model_dir / "checksums.sha256").unlink()
    with pytest.raises(CorruptFileError, match=r"model.safetensors: not a readable safetensors file"):
        load_model(model_dir)


def test_non_finite_weights_are_refused(tmp_path):
    from danube.model import DanubeConfig, build_model
    from danube.model.io import save_model_dir

    model = build_model(DanubeConfig(vocab_size=64, n_embd=32, intermediate_size=64, n_layer=1, n_head=2, n_kv_head=1))
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    save_model_dir(model, tmp_path / "m")  # written with a valid checksum: the NaN is what was saved
    with pytest.raises(CorruptFileError, match="lm_head.weight.*NaN"):
        load_model(tmp_path / "m")


# -- one run per directory, and what it was run with ------------------------------------------
def test_changing_what_makes_the_run_is_refused_and_nothing_is_rewritten(small_run, tmp_path):
    run(compose_train(small_run))
    config = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(rundir.ConfigChanged, match=r"model.n_layer: 2 -> 3"):
        run(compose_train([*small_run, "model.n_layer=3"]))
    with pytest.raises(rundir.ConfigChanged, match=r"finished run made with optim.lr: 0.01 -> 0.05"):
        run(compose_train([*small_run, "optim.lr=0.05"]))
    assert (tmp_path / "run" / "config.yaml").read_text() == config
    assert len(list((tmp_path / "run" / "history").glob("*.yaml"))) == 1
    run(compose_train([*small_run, "train.log_every_n_steps=2"]))  # cosmetic: fine on a finished run
    # What the previous release recorded: init_from (now model_dir) and model._target_. The same run still.
    old = yaml.safe_load(config)
    old["init_from"] = old.pop("model_dir")
    old["model"]["_target_"] = "danube.model.DanubeConfig"
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(old))
    assert run(compose_train(small_run)).complete


def test_an_unfinished_run_takes_a_new_lr_and_records_it(small_run, tmp_path):
    run(compose_train([*small_run, "stage=seq64", "train.max_steps=2"]))
    with pytest.raises(rundir.ConfigChanged, match="train.global_batch_tokens"):
        run(compose_train([*small_run, "stage=seq64", "train.global_batch_tokens=8192"]))
    run(compose_train([*small_run, "stage=seq64", "train.max_steps=3", "optim.lr=0.02"]))
    history = sorted((tmp_path / "run" / "history").glob("*.yaml"))
    assert len(history) == 2 and "# changed: optim.lr: 0.01 -> 0.02" in history[1].read_text()
    assert "lr: 0.02" in (tmp_path / "run" / "config.yaml").read_text()


def test_one_process_at_a_time_per_run_dir(small_run, tmp_path):
    with rundir.lock(tmp_path / "run"):
        with pytest.raises(rundir.RunDirBusy, match=f"in use by another run \\(pid {os.getpid()}"):
            run(compose_train(small_run))
    # a killed holder does not leave it stuck
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from danube import rundir\n"
                               f"with rundir.lock({str(tmp_path / 'other')!r}):\n print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(rundir.RunDirBusy):
        with rundir.lock(tmp_path / "other"):
            pass
    holder.kill()
    holder.wait()
    with rundir.lock(tmp_path / "other"):
        pass


def test_resume_path_applies_to_its_own_stage_only(small_run, tmp_path):
    first = run(compose_train([*small_run, "train.checkpoint_every_n_steps=3"]))
    ckpt = first.run_dir / "seq64" / "checkpoints" / "step00000010.ckpt"
    assert ckpt.is_file()
    other = [*small_run[:-1], f"run_dir={tmp_path}/other"]
    with pytest.raises(ValueError, match="checkpoint of stage seq64, but stage=seq128"):
        run(compose_train([*other, f"resume={ckpt}", "stage=seq128"]))
    result = run(compose_train([*other, f"resume={ckpt}"]))
    assert result.tokens_seen == TOTAL  # seq128 started from seq64's end, not from the seq64 checkpoint


def test_a_sweep_job_dir_reused_with_new_values_is_refused(small_run, tmp_path):
    run(compose_train(small_run))
    with pytest.raises(rundir.ConfigChanged, match="optim.lr"):
        run(compose_train([*small_run, "optim.lr=0.07"]))


# -- too little data, bad values --------------------------------------------------------------
def test_too_little_data_fails_before_training(tmp_path, data_root):
    from danube.corpus.prepare import prepare

    docs = tmp_path / "tiny.jsonl"
    docs.write_text("".join(json.dumps({"text": f"word {i} " * 5}) + "\n" for i in range(3)))
    shards = tmp_path / "shards"
    prepare([docs], shards, data_root / "sample" / "tokenizer.model", val_fraction=0.0, num_workers=1)
    cfg = compose_train([*SMALL, "data=pretrain", f"data.sources={shards}",
                         f"data.tokenizer={data_root / 'sample' / 'tokenizer.model'}", "data.num_workers=0",
                         f"run_dir={tmp_path}/run"])
    with pytest.raises(ValueError, match=r"training tokens, fewer than one 129-token sample of the recipe's longest"):
        run(cfg)
    assert not list((tmp_path / "run").glob("*/complete.json"))


@pytest.mark.parametrize("override, message", [
    ("train.micro_batch_tokens=0", "train.micro_batch_tokens=0 must be >= 1"),
    ("train.global_batch_tokens=-4096", "train.global_batch_tokens=-4096 must be >= 1"),
    ("optim.lr=-1", "optim.lr=-1 must be > 0"),
    ("optim.min_lr=0.5", "optim.min_lr=0.5 is above optim.lr"),
    ("+train.lrr=1", "unknown config key\\(s\\) train.lrr"),
    ("trainer=h100x8", "no CUDA device is visible"),
    ("train.deterministic=sometimes", "train.deterministic='sometimes'; allowed: auto, true, false"),
    ("train.threads=0", "train.threads=0 must be >= 1"),
])
def test_bad_values_fail_at_once_naming_the_key(small_run, override, message):
    with pytest.raises(Exception, match=message):
        run(compose_train([*small_run, override]))


def test_train_py_reports_a_config_error_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "train.py", "optim.lr=-1", f"run_dir={tmp_path}/run"], cwd=REPO,
                         capture_output=True, text=True, env=ENV)
    assert out.returncode == 1
    assert out.stderr.splitlines() == ["train.py: error: optim.lr=-1 must be > 0 (DANUBE_TRACEBACK=1 shows the traceback)"]
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


def test_outputs_never_clobber_inputs_or_existing_directories(tmp_path, capsys):
    from danube.cli import main as cli_main
    from danube.model import DanubeConfig, build_model
    from danube.model.io import save_model_dir

    model_dir = save_model_dir(build_model(DanubeConfig(vocab_size=64, n_embd=32, intermediate_size=64, n_layer=1,
                                                        n_head=2, n_kv_head=1)), tmp_path / "m")
    before = (model_dir / "model.safetensors").read_bytes()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    for argv in (["export-hf", str(model_dir), str(tmp_path / "busy")],
                 ["export-hf", str(model_dir), str(model_dir), "--overwrite"],
                 ["import-hf", str(model_dir), str(tmp_path / "busy")]):
        assert cli_main(argv) == 1, argv
    err = capsys.readouterr().err
    assert "pass --overwrite" in err and "is the input" in err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    assert (model_dir / "model.safetensors").read_bytes() == before
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.jsonl").write_text('{"text": "hello"}\n')
    assert cli_main(["prepare", str(docs), "-o", str(docs), "--tokenizer", "x.model", "--overwrite"]) == 1
    assert "is the input" in capsys.readouterr().err and (docs / "a.jsonl").is_file()


def test_a_corrupt_gzip_is_named(tmp_path, sp_model):
    from danube.corpus.prepare import prepare

    bad = tmp_path / "bad.jsonl.gz"
    import gzip

    bad.write_bytes(gzip.compress(b'{"text": "hello"}\n' * 100)[:-30] + os.urandom(30))
    with pytest.raises(ValueError, match=r"bad.jsonl.gz: corrupt gzip file"):
        prepare([bad], tmp_path / "out", sp_model, num_workers=1)


@pytest.mark.slow
def test_two_sharded_ranks_stop_together_on_sigterm_and_resume_bit_exactly(data_root, tmp_path):
    """FSDP2 (gloo, 2 processes): SIGTERM to rank 0 only; both stop at the same step boundary, the
    checkpoint is gathered from both shards, and the resumed run ends as the straight one, bit for bit.

    Rank 1 is started by Lightning re-running the command: it takes no lock, writes no history, logs no steps.
    (Two DDP ranks stopping together: the SLURM tests, tests/train/test_slurm.py, and the second Ctrl-C below.)
    """
    fsdp = ["trainer.devices=2", "trainer.strategy=fsdp"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    out = subprocess.run(_cmd(data_root, straight, *fsdp), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
    assert out.stdout.count("seq64 (seq 64): step 10/10") == 1 and out.stdout.count("train.py done in") == 1
    assert len(list((straight / "history").glob("*.yaml"))) == 1
    proc = subprocess.Popen(_cmd(data_root, stopped, *fsdp), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    tb = stopped / "tensorboard" / "seq64"
    _wait_for(lambda: any(f.stat().st_size > 1000 for f in tb.glob("events.*")), proc, "training to start")
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, text[-3000:]
    assert "stopped by SIGTERM" in text and "Traceback" not in text
    assert step_checkpoints(stopped / "seq64" / "checkpoints")
    again = subprocess.run(_cmd(data_root, stopped, *fsdp), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:]
    _assert_same_run(straight, stopped)
