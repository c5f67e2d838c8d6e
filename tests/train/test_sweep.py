"""Sweeps: the objective train.py returns, the hparams_search configs, `danube sweep-report`."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from danube.cli import main as cli_main
from danube.sweep import find_jobs, objective, sweep_report
from danube.tasks.train import TrainResult, validate
from tests.conftest import CONF, REPO
from tests.train.conftest import compose_train


# -- the objective ----------------------------------------------------------------------
def _result(val):
    return TrainResult(Path("run"), Path("run/model"), 100, 1.0, val)


def test_objective_is_the_final_val_loss_and_inf_when_missing_or_diverged(caplog):
    assert objective(_result(2.5)) == 2.5
    assert objective(None) is None  # plan=true trains nothing
    with caplog.at_level("WARNING", logger="danube.sweep"):
        assert objective(_result(None)) == math.inf
        assert objective(_result(float("nan"))) == math.inf
    assert "returned no validation loss" in caplog.text and "diverged" in caplog.text


def test_multirun_refuses_a_shared_run_dir_and_several_devices(monkeypatch):
    import danube.tasks.train as train

    monkeypatch.setattr(train.hydra_runtime, "is_multirun", lambda: True)
    with pytest.raises(ValueError, match="every job would write"):
        train.load(compose_train(["run_dir=/tmp/one_dir"]))
    gpus = compose_train(["trainer=h100x8", "model=danube_1p8b"])
    with pytest.raises(ValueError, match="8 devices in a multirun"):
        train.load(gpus)
    train.load(compose_train([]))  # one device, run_dir per job: fine


def _hydra_config(job_dir: Path, mode: str = "MULTIRUN"):
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    return OmegaConf.create({"hydra": {"mode": RunMode[mode], "runtime": {"output_dir": str(job_dir)},
                                       "overrides": {"task": ["optim.lr=0.01", "name=a b"]}}})


def _job_return(value, status="COMPLETED"):
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    ret = JobReturn()
    ret.cfg = OmegaConf.create({"stage": "all", "recipe": {"stages": [{"name": "seq64"}, {"name": "seq128"}]}})
    ret.return_value, ret.status = value, JobStatus[status]
    return ret


def test_a_multirun_job_records_its_overrides_then_its_outcome(tmp_path):
    """The Hydra callback of conf/train.yaml: what sweep-report reads of each job."""
    from danube.sweep import RecordJob

    root, record = tmp_path / "multirun", RecordJob()
    job = root / "0"
    record.on_job_start(_hydra_config(job))
    (started,) = find_jobs(root)
    assert started.overrides == {"optim.lr": "0.01", "name": "a b"} and started.status == "incomplete"
    (job / "seq128").mkdir(parents=True)
    (job / "seq128" / "complete.json").write_text(json.dumps({"tokens_seen": 1024, "final_val_loss": 4.5,
                                                              "final_train_loss": 4.0}))
    record.on_job_end(_hydra_config(job), _job_return(4.5))
    assert json.loads((job / "result.json").read_text()) == {
        "status": "complete", "objective": 4.5, "final_val_loss": 4.5, "final_train_loss": 4.0, "tokens_seen": 1024}
    record.on_job_end(_hydra_config(job), _job_return(math.inf))
    assert json.loads((job / "result.json").read_text())["status"] == "diverged"
    (job / "seq128" / "complete.json").unlink()  # stopped at train.max_steps
    record.on_job_end(_hydra_config(job), _job_return(4.75))
    assert json.loads((job / "result.json").read_text()) == {"status": "incomplete", "objective": 4.75}
    record.on_job_end(_hydra_config(job), _job_return(ValueError("optim.lr=-1 must be > 0"), "FAILED"))
    assert json.loads((job / "result.json").read_text()) == {"status": "failed",
                                                            "error": "ValueError: optim.lr=-1 must be > 0"}
    single = tmp_path / "single"
    record.on_job_start(_hydra_config(single, "RUN"))
    record.on_job_end(_hydra_config(single, "RUN"), _job_return(4.5))
    assert not single.exists()  # a single run is no sweep's job


def test_train_yaml_configures_the_callback():
    from hydra.utils import instantiate

    from danube.sweep import RecordJob

    callbacks = compose_sweep([]).hydra.callbacks
    assert [type(instantiate(c)) for c in callbacks.values()] == [RecordJob]


# -- the configs ------------------------------------------------------------------------
def compose_sweep(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("option, model", [("tiny_optuna", 256), ("proxy_500m_optuna", 1536)])
def test_optuna_configs_compose_with_their_search_space(option, model):
    import optuna
    from hydra.utils import instantiate

    cfg = compose_sweep([f"hparams_search={option}"])
    sweeper = cfg.hydra.sweeper
    # the study lives beside its jobs, in one folder per study: the same command again continues it
    assert sweeper.direction == "minimize" and sweeper.storage == f"sqlite:///{cfg.hydra.sweep.dir}/optuna.db"
    assert cfg.hydra.sweep.dir.endswith(f"/sweeps/{sweeper.study_name}")
    assert set(sweeper.params) == {"optim.lr", "optim.min_lr", "optim.warmup_tokens", "optim.weight_decay"}
    assert cfg.model.n_embd == model
    # what Hydra builds at `-m`: the plugin's sweeper with a seeded TPE sampler
    built = instantiate(sweeper)
    assert type(built).__name__ == "ResumableOptunaSweeper"
    assert isinstance(built.sweeper.sampler, optuna.samplers.TPESampler) and built.sweeper.n_trials == sweeper.n_trials
    # every warm-up choice ends before the recipe does, every LR range stays above min_lr's
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = {o.key_or_group: o for o in OverridesParser.create().parse_overrides(
        [f"{k}={v}" for k, v in sweeper.params.items()])}
    total = sum(s.tokens for s in validate(compose_train([f"hparams_search={option}", "plan=true"])))
    assert max(parsed["optim.warmup_tokens"].sweep_iterator()) < total
    assert parsed["optim.lr"].value().start >= parsed["optim.min_lr"].value().end


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml")))
def test_every_hparams_search_composes_and_plans(option):
    cfg = compose_sweep([f"hparams_search={option}"])
    assert cfg.hydra.sweeper.params  # a sweep with nothing to sweep would run one job
    assert validate(compose_train([f"hparams_search={option}", "plan=true"]))


def test_grid_config_is_a_basic_sweeper_grid():
    cfg = compose_sweep(["hparams_search=tiny_grid"])
    assert cfg.hydra.sweeper._target_.endswith("BasicSweeper")
    assert dict(cfg.hydra.sweeper.params) == {"optim.lr": "3e-3,1e-2", "train.global_batch_tokens": "8192,16384"}
    assert cfg.model.n_embd == 256


# -- the report -------------------------------------------------------------------------
def _scalars(run_dir: Path, points: dict[str, list[tuple[int, float]]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir / "tensorboard" / "seq64")) as w:
        for tag, values in points.items():
            for step, value in values:
                w.add_scalar(tag, value, step)


def _job(root: Path, num: int, overrides: list[str], *, result=None, scalars=None, config=None, final=False):
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if result is not None:
        (job / "result.json").write_text(json.dumps(result))
    if scalars:
        _scalars(job, scalars)
    if config is not None:
        (job / "config.yaml").write_text(yaml.safe_dump(config))
    if final:
        (job / "seq64" / "model").mkdir(parents=True)
        (job / "seq64" / "final.ckpt").write_bytes(b"x")
        (job / "seq64" / "model" / "model.safetensors").write_bytes(b"x")


@pytest.fixture
def fake_multirun(tmp_path):
    """Five jobs as train.py leaves them: done, better and done, diverged, killed, failed at start."""
    root = tmp_path / "multirun" / "2026-11-23_09-00-00"
    config = {"stage": "all", "recipe": {"stages": [{"name": "seq64", "seq_len": 64, "tokens": 1024}]}}
    curve = {"train/loss": [(512, 5.0), (1024, 4.0)], "val/loss": [(512, 5.5), (1024, 4.5)]}
    _job(root, 0, ["optim.lr=0.003", "debug=fast"], scalars=curve, config=config, final=True,
         result={"status": "complete", "objective": 4.5, "final_val_loss": 4.5, "final_train_loss": 4.0,
                 "tokens_seen": 1024})
    _job(root, 1, ["optim.lr=0.03", "debug=fast"], config=config, scalars={"val/loss": [(512, float("nan"))]},
         result={"status": "diverged", "objective": "inf", "final_val_loss": "nan", "tokens_seen": 1024})
    _job(root, 2, ["optim.lr=0.001", "debug=fast"], config=config, scalars={"val/loss": [(512, 6.0)]})  # killed
    _job(root, 3, ["optim.lr=0.1", "debug=fast"], result={"status": "failed", "error": "ValueError: lr | bad"})
    # no result.json (written by an older danube), but the last stage's final checkpoint is there
    _job(root, 10, ["optim.lr=0.01", "debug=fast"], config=config, final=True,
         scalars={"train/loss": [(1024, 3.0)], "val/loss": [(1024, 3.25)]})
    return root


def test_report_sorts_by_val_loss_and_flags_failed_jobs(fake_multirun):
    jobs, written = sweep_report(fake_multirun)
    assert [j.name for j in jobs] == ["10", "0", "1", "2", "3"]
    assert [j.status for j in jobs] == ["complete", "complete", "diverged", "incomplete", "failed"]
    assert jobs[0].val_loss == 3.25 and jobs[0].tokens == 1024 and math.isnan(jobs[2].val_loss)
    md = written["markdown"].read_text()
    assert "5 jobs: 2 complete, 1 diverged, 1 incomplete, 1 failed." in md
    assert "Same for every job: `debug=fast`" in md
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0] == "| rank | job | optim.lr | val loss | train loss | tokens | status |"
    assert rows[1] == "| 1 | 10 | 0.01 | 3.2500 | 3.0000 | 1,024 | complete |"
    assert rows[2] == "| 2 | 0 | 0.003 | 4.5000 | 4.0000 | 1,024 | complete |"
    assert rows[5] == "| 5 | 3 | 0.1 | - | - | - | failed: ValueError: lr \\| bad |"
    table = list(csv.DictReader(written["csv"].open()))
    assert [r["job"] for r in table] == ["10", "0", "1", "2", "3"]
    assert table[0]["optim.lr"] == "0.01" and float(table[0]["val_loss"]) == 3.25 and table[4]["error"]


def test_report_flags_a_job_folder_reused_with_other_values(tmp_path):
    """`-m optim.lr=0.05` into a sweep dir whose job 0 ran with 0.01: its results are not 0.05's."""
    root = tmp_path / "multirun"
    config = {"optim": {"lr": 0.01}, "stage": "all", "recipe": {"stages": [{"name": "seq64"}]}}
    _job(root, 0, ["optim.lr=5e-2"], config=config, final=True, scalars={"val/loss": [(1024, 3.0)]},
         result={"status": "failed", "error": "ConfigChanged: ..."})
    _job(root, 1, ["optim.lr=1e-2"], config=config, final=True, scalars={"val/loss": [(1024, 3.5)]},
         result={"status": "complete", "objective": 3.5, "final_val_loss": 3.5, "tokens_seen": 1024})
    jobs, _ = sweep_report(root, tensorboard=False)
    by_name = {j.name: j for j in jobs}
    assert by_name["0"].status == "mismatch" and by_name["0"].val_loss is None
    assert "optim.lr=0.01 (overrides.yaml: 5e-2)" in by_name["0"].error
    assert by_name["1"].status == "complete" and by_name["1"].val_loss == 3.5


def test_report_writes_tensorboard_hparams_once(fake_multirun):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sweep_report(fake_multirun)
    sweep_report(fake_multirun)  # again: replaces, does not add runs
    hp = fake_multirun / "hparams"
    assert sorted(p.name for p in hp.iterdir() if p.is_dir()) == ["0", "1", "10", "2", "3"]
    events = list((hp / "10").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(hp / "10"))
    acc.Reload()
    assert acc.Scalars("hparam/val_loss")[0].value == pytest.approx(3.25)
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    failed = EventAccumulator(str(hp / "3"))
    failed.Reload()
    assert "hparam/val_loss" not in failed.Tags()["scalars"]  # no metric invented for a failed job


def test_report_cli_refuses_what_is_not_a_multirun(fake_multirun, tmp_path, capsys):
    assert cli_main(["sweep-report", str(fake_multirun / "0")]) == 1
    assert "not a Hydra multirun directory" in capsys.readouterr().err
    assert cli_main(["sweep-report", str(tmp_path / "nope")]) == 1
    with pytest.raises(FileNotFoundError, match="give its parent"):
        find_jobs(fake_multirun / "0")
    assert not (fake_multirun / "0" / "sweep.md").exists()


def test_report_names_a_broken_overrides_file(fake_multirun):
    (fake_multirun / "2" / ".hydra" / "overrides.yaml").write_text("lr: 1\n")
    with pytest.raises(ValueError, match=r"2/\.hydra/overrides\.yaml: expected a list"):
        sweep_report(fake_multirun)
    (fake_multirun / "2" / ".hydra" / "overrides.yaml").write_text("- a=1\n- [b\n")
    with pytest.raises(ValueError, match=r"2/\.hydra/overrides\.yaml: not readable as YAML"):
        sweep_report(fake_multirun)
    assert not (fake_multirun / "sweep.md").exists()


# -- end to end, from the shell ----------------------------------------------------------
# The debug model, one 64-token stage of 16,384 tokens (4 micro-batches of 4,096): seconds a job.
QUICK = ["debug=fast", "data.num_workers=0", "recipe.stages=[{name:seq64,seq_len:64,tokens:16384}]",
         "train.micro_batch_tokens=4096", "train.val_batches=2", "train.checkpoint_every_n_steps=0"]


def _multirun(args: list[str], tmp_path: Path, data_root: Path) -> Path:
    sweep_dir = tmp_path / "multirun"
    cmd = [sys.executable, "train.py", "-m", *args, *QUICK, f"paths.data_dir={data_root}",
           f"paths.runs_dir={tmp_path}/runs", f"hydra.sweep.dir={sweep_dir}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return sweep_dir


@pytest.mark.slow
def test_grid_multirun_of_the_tiny_model_is_reported_sorted(tmp_path, data_root):
    # The grid on the command line, as conf/hparams_search/tiny_grid.yaml has it, at batches that give
    # these 16,384 tokens 4 and 2 steps (one step would end at min_lr whatever the peak LR).
    sweep_dir = _multirun(["optim.lr=3e-3,1e-2", "train.global_batch_tokens=4096,8192"], tmp_path, data_root)
    out = subprocess.run([sys.executable, "-m", "danube.cli", "sweep-report", str(sweep_dir)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    jobs = find_jobs(sweep_dir)
    assert len(jobs) == 4 and {j.status for j in jobs} == {"complete"}
    grid = {(j.overrides["optim.lr"], j.overrides["train.global_batch_tokens"]) for j in jobs}
    assert grid == {(lr, b) for lr in ("0.003", "0.01") for b in ("4096", "8192")}  # Hydra writes 3e-3 as 0.003
    rows = [line for line in (sweep_dir / "sweep.md").read_text().splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| rank | job | optim.lr | train.global_batch_tokens | val loss")
    losses = [float(r.split(" | ")[4]) for r in rows[1:]]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses) and losses == sorted(losses)
    # each job's objective is its own run's last logged validation loss
    for job in jobs:
        recorded = json.loads((job.path / "result.json").read_text())
        assert recorded["objective"] == pytest.approx(job.val_loss) and recorded["tokens_seen"] == 16384
    assert len({j.val_loss for j in jobs}) == 4  # four different runs, not one resumed four times
    assert "wrote markdown" in out.stdout


@pytest.mark.slow
def test_an_optuna_sweep_killed_mid_trial_goes_on_where_it_stopped(tmp_path, data_root):
    """The study lives in sqlite beside the jobs: the same command again runs only what is missing.

    The sweep is killed (SIGKILL, its whole process group) while trial 1 runs. The relaunch keeps
    trial 0, runs trial 1's parameters again as job 2, then job 3, and no job reuses a folder; a
    third launch of the finished study runs nothing.
    """
    import optuna

    sweep_dir = tmp_path / "multirun"
    cmd = [sys.executable, "train.py", "-m", "hparams_search=tiny_optuna", "hydra.sweeper.n_trials=3", *QUICK,
           f"paths.data_dir={data_root}", f"paths.runs_dir={tmp_path}/runs", f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not (sweep_dir / "1" / "result.json").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "the sweep did not reach its second trial"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    storage = f"sqlite:///{sweep_dir}/optuna.db"
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]
    interrupted = study.trials[1].params

    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 of 3 trials finished, 1 interrupted trial(s) run again; 2 to go, from job 2" in out.stdout + out.stderr
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[2].params == interrupted
    jobs, written = sweep_report(sweep_dir, tensorboard=False)
    status = {j.name: j.status for j in jobs}
    assert status == {"0": "complete", "1": "incomplete", "2": "complete", "3": "complete"}
    for job in jobs:  # every folder holds the trial of its number
        if job.status == "complete":
            trial = study.trials[int(job.name)]
            assert float(job.overrides["optim.lr"]) == pytest.approx(trial.params["optim.lr"])
            assert trial.value == pytest.approx(job.val_loss)
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(j.val_loss for j in jobs if j.status == "complete"))
    assert "Optuna's best value" in written["markdown"].read_text()

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "3 of 3 trials finished" in again.stdout + again.stderr
    assert len(optuna.load_study(study_name="tiny", storage=storage).trials) == 4
    assert not (sweep_dir / "4").exists()
