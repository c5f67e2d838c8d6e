"""Each script's --help lists its own groups; another script's experiment is named as such, not a Hydra error."""

import subprocess
import sys

import pytest

from danube.entry import SCRIPTS, check_experiment, experiment_owner, help_text, script_groups
from tests.conftest import CONF, REPO


def test_every_experiment_belongs_to_exactly_one_script():
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        assert experiment_owner(path.stem, CONF) in SCRIPTS, path.name
    assert experiment_owner("danube_chat_sft", CONF) == "finetune" and experiment_owner("danube_1p8b", CONF) == "train"
    assert experiment_owner("danube2_continue_tiny", CONF) == "train"


def test_help_lists_only_the_scripts_own_groups_and_experiments():
    train, finetune, evaluate = (help_text(s, CONF) for s in SCRIPTS)
    assert "model: " in train and "recipe: " in train and "hparams_search: " in train
    assert "experiment: danube2_continue, danube2_continue_tiny, danube_1p8b\n" in train
    for other in ("chat_data", "loss:", "danube_chat_sft", "suite:"):
        assert other not in train, other
    assert "chat_data: " in finetune and "loss: dpo, sft" in finetune
    assert "experiment: danube_chat_dpo1, danube_chat_dpo2, danube_chat_sft\n" in finetune
    for other in ("recipe", "model:", "danube_1p8b", "suite:"):
        assert other not in finetune, other
    assert "suite: danube_table1, mt_bench, open_llm_v1, perplexity" in evaluate and "model:" not in evaluate
    assert set(script_groups("evaluate", CONF)) == {"suite", "paths"}


def test_train_py_help_uses_the_scripts_own_list():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "== Configuration groups of train.py ==" in out.stdout and "chat_data" not in out.stdout
    assert "danube settings train" in out.stdout  # where every setting is documented


def test_a_finetune_experiment_given_to_train_py_says_which_script_runs_it():
    out = subprocess.run([sys.executable, "train.py", "experiment=danube_chat_sft"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1
    assert ("train.py: error: experiment=danube_chat_sft is a finetune.py experiment (it sets chat_data, loss, "
            "which train.py does not have); run: python finetune.py experiment=danube_chat_sft") in out.stderr
    assert "Could not override" not in out.stderr + out.stdout
    with pytest.raises(SystemExit, match="is a train.py experiment"):
        check_experiment("finetune", ["-m", "experiment=danube_1p8b,danube2_continue"], CONF)
    check_experiment("train", ["experiment=danube_1p8b", "model.n_layer=2"], CONF)  # its own: no complaint
