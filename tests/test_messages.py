"""Messages that point at the fix: a run directory where a model directory is wanted, a missing path,
a GPU-only kernel on CPU."""

import os
import time

import pytest
import torch
import yaml

from danube.cli import main
from danube.model import build_model
from danube.model.io import check_model_dir, save_model_dir
from danube.model.loading import load_model


@pytest.fixture
def run_dir(tmp_path, micro_cfg):
    """What `python train.py` leaves: config.yaml of the run, TensorBoard logs, a model per stage."""
    run = tmp_path / "runs" / "tiny"
    (run / "tensorboard" / "seq128").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"n_embd": 64}, "train": {}, "data": {},
                                                     "model_dir": None}))
    model = build_model(micro_cfg)
    for i, stage in enumerate(("seq128", "seq256")):
        (run / stage / "checkpoints").mkdir(parents=True)
        save_model_dir(model, run / stage / "model")
        t = time.time() - 100 + i  # the later stage is written later
        os.utime(run / stage / "model", (t, t))
    return run


def test_a_run_directory_is_recognised_and_its_models_named(run_dir):
    with pytest.raises(FileNotFoundError) as err:
        check_model_dir(run_dir, "model_dir")
    message = str(err.value)
    assert message.startswith(f"model_dir={run_dir} is a run directory, not a model directory")
    assert message.index(str(run_dir / "seq128" / "model")) < message.index(str(run_dir / "seq256" / "model"))
    assert check_model_dir(run_dir / "seq256" / "model") == run_dir / "seq256" / "model"


def test_export_hf_of_a_run_directory_says_where_the_model_is(run_dir, tmp_path, capsys):
    assert main(["export-hf", str(run_dir), str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert "is a run directory" in err and str(run_dir / "seq256" / "model") in err
    assert "unknown DanubeConfig keys" not in err and not (tmp_path / "hf").exists()


def test_evaluate_of_a_run_directory_says_where_the_model_is(run_dir):
    from hydra import compose, initialize_config_dir

    from danube.tasks.evaluate import run
    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"model_dir={run_dir}", "tasks=[arc_easy]"])
    with pytest.raises(FileNotFoundError, match=f"{run_dir / 'seq256' / 'model'}") as err:
        run(cfg)
    assert "tokenizer" not in str(err.value)


def test_chat_with_a_missing_directory_says_no_such_directory(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "model"
    assert main(["chat", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"{missing}: no such directory" in err and "Repo id" not in err


def test_merge_lora_of_a_fine_tuning_run_directory_names_its_adapter(tmp_path, capsys):
    (tmp_path / "dpo" / "adapter").mkdir(parents=True)
    (tmp_path / "dpo" / "adapter" / "adapter_config.json").write_text("{}")
    assert main(["merge-lora", str(tmp_path / "dpo"), str(tmp_path / "out")]) == 1
    assert f"the adapter directories in it: {tmp_path / 'dpo' / 'adapter'}" in capsys.readouterr().err


def test_a_fine_tuning_run_directory_is_named_as_such(tmp_path, micro_cfg):
    run = tmp_path / "chat_sft"
    save_model_dir(build_model(micro_cfg), run / "model")
    (run / "metrics.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"is a fine-tuning run directory.*{run / 'model'}"):
        load_model(run)


def test_a_run_without_a_finished_stage_says_so(tmp_path):
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="without a model directory yet"):
        check_model_dir(run)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_flash_attention_on_cpu_fails_at_start_naming_what_to_install(tmp_path):
    from danube.tasks.train import run, validate
    from tests.train.conftest import SMALL, compose_train

    cfg = compose_train([*SMALL, "model.attn_backend=flash", f"run_dir={tmp_path}/run",
                         f"paths.data_dir={tmp_path}/data"])
    with pytest.raises(RuntimeError, match=r"model.attn_backend=flash needs a CUDA device .*flash-attn"):
        validate(cfg)
    with pytest.raises(RuntimeError, match="attn_backend=flash"):
        run(cfg)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()  # nothing half-made
