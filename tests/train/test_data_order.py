"""The run's walk through the data, end to end: stages, world sizes, resumes, mixture changes.

The in-process runs (``danube.tasks.train.run``) compare the run directory's record of what
every step read (``<stage>/data/steps.jsonl``) and the walk's position at every checkpoint;
the subprocess ones run ``python train.py`` on one and two CPU processes (gloo) and compare
the final weights, which must agree to float-summation noise.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from danube.checkpoints import load_checkpoint
from danube.data.data_report import data_report, format_report
from danube.data.pretrain import OldOrder, StepRecord, read_rows
from danube.tasks.train import run
from tests.conftest import REPO
from tests.train.conftest import SMALL, compose_train

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
DDP = ["trainer.devices=2", "trainer.strategy=ddp"]
FSDP = ["trainer.devices=2", "trainer.strategy=fsdp"]  # FSDP2 on gloo: weights and moments sharded over the ranks
# debug=fast over the sample's three sources, each stage with its own mixture (Danube2's data stages in small).
MIXED = ["data=sample_sources",
         "recipe.stages=[{name:seq64,seq_len:64,tokens:40960,weights:{code:0.8,docstrings:0.1,topics:0.1}},"
         "{name:seq128,seq_len:128,tokens:24576,weights:{code:0.2,docstrings:0.4,topics:0.4}}]"]


def _steps(run_dir: Path) -> list[dict]:
    return [row for stage in ("seq64", "seq128") for row in read_rows(run_dir / stage / "data" / StepRecord.STEPS)]


def _final_position(run_dir: Path) -> dict:
    return read_rows(run_dir / "seq128" / "data" / StepRecord.POSITIONS)[-1]["order"]


def _rel_l2(a: Path, b: Path) -> float:
    wa, wb = (load_file(str(d / "seq128" / "model" / "model.safetensors")) for d in (a, b))
    num = sum(((wa[k].double() - wb[k].double()) ** 2).sum() for k in wa)
    den = sum((wa[k].double() ** 2).sum() for k in wa)
    return float((num / den).sqrt())


def test_stage_two_goes_on_where_stage_one_stopped(small_run, tmp_path):
    """No token of the first stage is read again by the second (the sample holds far more than both read)."""
    run(compose_train(small_run))
    run_dir = tmp_path / "run"
    report = data_report(run_dir)
    (name, source), = report["sources"].items()
    read = 10 * 64 * 65 + 6 * 32 * 129  # seq64: 10 steps of 64 blocks of 65 tokens; seq128: 6 of 32 of 129
    assert source["read"] == read and source["steps_agree"]
    assert source["times_read"] == [source["tokens"] - read, read]  # each token once, none twice
    assert [s["tokens"][name] for s in report["stages"]] == [10 * 64 * 65, 6 * 32 * 129]
    start = load_checkpoint(run_dir / "seq64" / "final.ckpt", mmap=True)["PretrainDataModule"]["order"]
    assert read_rows(run_dir / "seq64" / "data" / StepRecord.POSITIONS)[-1]["order"] == start
    text = format_report(report)
    assert "record check: the per-step rows add up" in text and f"{read:,}" in text


def test_stops_and_resumes_with_mixture_changes_read_what_one_straight_run_reads(data_root, tmp_path):
    base = [*SMALL, *MIXED, f"paths.data_dir={data_root}", "train.checkpoint_every_n_steps=1"]
    straight = tmp_path / "straight"
    run(compose_train([*base, f"run_dir={straight}"]))
    stopped = tmp_path / "stopped"
    for extra in (["train.max_steps=3"], ["train.max_steps=7"], ["stage=seq64"], ["train.max_steps=4"], []):
        run(compose_train([*base, f"run_dir={stopped}", *extra]))
    assert _steps(stopped) == _steps(straight) and len(_steps(straight)) == 16
    assert _final_position(stopped) == _final_position(straight)
    for wa, wb in zip(*(load_file(str(d / "seq128" / "model" / "model.safetensors")).values()
                        for d in (straight, stopped))):
        assert torch.equal(wa, wb)
    report = data_report(stopped)
    assert all(len(s["times_read"]) == 2 for s in report["sources"].values())  # nothing read twice
    seq64 = report["stages"][0]["tokens"]
    assert seq64["code"] > 6 * seq64["topics"]  # stage 1's mixture; stage 2 reads mostly the other two
    assert report["stages"][1]["tokens"]["topics"] > report["stages"][1]["tokens"]["code"]


def test_a_new_mixture_on_a_resume_is_recorded_and_keeps_every_source_where_it_was(data_root, tmp_path):
    base = [*SMALL, *MIXED, f"paths.data_dir={data_root}", f"run_dir={tmp_path / 'run'}", "stage=seq64"]
    run(compose_train([*base, "train.max_steps=5"]))
    before = read_rows(tmp_path / "run" / "seq64" / "data" / StepRecord.POSITIONS)[-1]["order"]["sources"]
    new = "recipe.stages.0.weights={code:0.0,docstrings:0.0,topics:1.0}"
    run(compose_train([*base, new]))
    history = sorted((tmp_path / "run" / "history").glob("*.yaml"))
    assert "mixture.seq64.topics: 0.1 -> 1.0" in history[-1].read_text()  # recorded as a change
    rows = read_rows(tmp_path / "run" / "seq64" / "data" / StepRecord.STEPS)
    assert all(set(r["sources"]) == {"topics"} for r in rows[5:])  # from the resumed step on: topics only
    after = read_rows(tmp_path / "run" / "seq64" / "data" / StepRecord.POSITIONS)[-1]["order"]["sources"]
    for name in ("code", "docstrings"):
        assert after[name]["cursors"] == before[name]["cursors"]  # untouched, kept for later
    report = data_report(tmp_path / "run")
    assert all(len(s["times_read"]) == 2 for s in report["sources"].values())


def _old_order(ckpt: Path) -> None:
    """Rewrite a checkpoint's data position the way danube 0.1 saved it."""
    state = torch.load(ckpt, weights_only=True)
    state["PretrainDataModule"] = {"train_loader": {"epoch": 1, "samples": 48, "loaders": []}}
    torch.save(state, ckpt)


def test_a_run_of_the_old_order_is_refused_in_one_line_unless_asked_for(small_run, tmp_path):
    run(compose_train([*small_run, "train.max_steps=4"]))
    ckpt = tmp_path / "run" / "seq64" / "checkpoints" / "step00000004.ckpt"
    _old_order(ckpt)
    with pytest.raises(OldOrder, match=r"danube 0.1's per-rank data order.*data.resume_old_order=true"):
        run(compose_train(small_run))
    assert run(compose_train([*small_run, "data.resume_old_order=true"])).complete


def _train_py(run_dir: Path, data_root: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", *SMALL, f"paths.data_dir={data_root}", f"run_dir={run_dir}", *extra]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_root):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    _train_py(run_dir, data_root)
    return run_dir


@pytest.mark.slow
def test_one_and_two_processes_train_the_same_model(one_process, data_root, tmp_path):
    two = tmp_path / "two"
    _train_py(two, data_root, *DDP)
    assert _steps(two) == _steps(one_process)
    assert _rel_l2(one_process, two) < 1e-3  # float summation order only (1.2 before the walk was global)


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(FSDP, []), ([], FSDP)], ids=["fsdp2->1", "1->fsdp2"])
def test_a_run_resumes_on_another_number_of_processes_and_strategy(one_process, data_root, tmp_path, first, then):
    """A checkpoint moves between world sizes and between DDP's layout and FSDP's shards.

    FSDP writes its checkpoints whole, as DDP does; a one-process run resumes an FSDP one and
    the other way round, and the second stage under FSDP starts from the first's moments.
    Misplaced moments (the parameter groups numbered in another order) would not end here.
    """
    run_dir = tmp_path / "run"
    _train_py(run_dir, data_root, "train.max_steps=5", *first)
    out = _train_py(run_dir, data_root, *then)
    assert "micro-batches per step (the checkpoint:" in out.stdout + out.stderr
    if then:  # sharded: each of the two ranks holds half of every block and of the rest
        held = re.search(r"FSDP2: 3 units over 2 ranks; this rank holds ([\d,]+) of ([\d,]+) parameters",
                         out.stdout + out.stderr)
        here, whole = (int(n.replace(",", "")) for n in held.groups())
        assert here == whole // 2
    history = sorted((run_dir / "history").glob("*.yaml"))
    assert "trainer.devices" in history[-1].read_text()  # the change is on record
    assert _steps(run_dir) == _steps(one_process)
    assert _rel_l2(one_process, run_dir) < 1e-3
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["trainer"]["devices"] == (2 if then else 1)
    assert config["trainer"]["strategy"] == ("fsdp" if then else "auto")
    positions = read_rows(run_dir / "seq128" / "data" / StepRecord.POSITIONS)
    assert json.dumps(positions[-1]["order"]) == json.dumps(_final_position(one_process))


def test_data_report_of_a_directory_without_a_record_is_one_line(tmp_path, capsys):
    from danube.cli import main

    assert main(["data-report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "records no data position" in err
