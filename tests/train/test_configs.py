"""Every YAML of every config group composes, and what it configures is built from it."""

import subprocess
import sys

import pytest

from danube.model import DanubeConfig
from danube.config import PretrainConfig, typed
from danube.tasks.train import validate
from tests.conftest import CONF, REPO
from tests.train.conftest import compose_train

GROUPS = ["model", "recipe", "data", "optim", "trainer", "precision", "paths"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "trainer":  # GPU trainers with the report's model and batch
        overrides += ["model=danube_1p8b"]
        if option == "multinode":  # 16 GPUs: ~1.18M does not divide by 16 x 16,384
            overrides += ["train.global_batch_tokens=1_048_576"]
    job = typed(compose_train(overrides), PretrainConfig, "train.py")  # the schema's checks, no hardware's
    assert isinstance(job.model, DanubeConfig)  # the one path from conf/model/*.yaml to the model
    assert job.plans()  # the recipe divides into steps on this trainer


# Which shipped recipe has each stage file's stage.
STAGE_RECIPES = {"seq64": ["debug=fast"], "seq128": [], "seq256": [],
                 **{f"data{i}": ["experiment=danube2_continue"] for i in (1, 2, 3)}}


@pytest.mark.parametrize("stage", options("stage"))
def test_every_stage_file_selects_a_stage_of_its_recipe(stage):
    recipe = STAGE_RECIPES.get(stage, ["model=danube_1p8b", "trainer=h100x8"])
    cfg = compose_train([*recipe, f"stage={stage}", "plan=true"])
    plans = validate(cfg)
    assert cfg.stage == stage and stage in [p.name for p in plans]


def test_experiments_compose():
    from danube.entry import experiment_owner

    # finetune.py's experiments are composed in tests/chat/test_finetune.py.
    for option in options("experiment"):
        if experiment_owner(option, CONF) == "train":
            compose_train([f"experiment={option}"])


def test_report_command_composes_from_the_shell():
    out = subprocess.run(
        [sys.executable, "train.py", "model=danube_1p8b", "stage=seq16k", "trainer=h100x8", "--cfg", "job"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "n_embd: 2560" in out.stdout and "stage: seq16k" in out.stdout and "devices: 8" in out.stdout


def test_plan_prints_the_schedule_without_a_gpu():
    out = subprocess.run(
        [sys.executable, "train.py", "model=danube_1p8b", "trainer=h100x8", "precision=fp8", "plan=true"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "| seq2k | 2,048 | 699,999,584,256 |" in out.stdout and "days" in out.stdout


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["stage=seq4k"], ValueError, "stage='seq4k' is not in this recipe"),
        (["train.global_batch_tokens=5000"], ValueError, "global_batch_tokens=5000 is not divisible"),
        (["resume=/nope/last.ckpt"], ValueError, "resume='/nope/last.ckpt'"),
        (["trainer=h100x1"], RuntimeError, "no CUDA device"),
        (["precision=fp8"], RuntimeError, "precision=fp8 needs a CUDA GPU"),
        (["model.n_kv_head=3"], ValueError, "not a multiple of n_kv_head"),
        (["data.kind=parquet"], ValueError, "data.kind='parquet'; allowed: sample, sample_sources, shards"),
    ],
)
def test_bad_config_fails_before_any_work(overrides, error, message):
    with pytest.raises(error, match=message):
        validate(compose_train(overrides))


def test_the_old_name_of_model_dir_still_works_with_a_warning(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="danube.config.door"):
        with pytest.raises(FileNotFoundError, match=f"model_dir={tmp_path / 'nope'}: no such directory"):
            validate(compose_train([f"init_from={tmp_path / 'nope'}"]))
    assert "train.py: init_from= is deprecated and goes in the next release; use model_dir=" in caplog.text
    with pytest.raises(ValueError, match="init_from=a and model_dir=b: init_from is the old name of model_dir"):
        validate(compose_train(["init_from=a", "model_dir=b"]))
