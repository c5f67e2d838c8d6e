"""One typed schema per script: every YAML composes against it, errors are one line, the README's table is its own."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from danube.config import SCHEMAS, one_line, typed
from danube.config.reference import block
from danube.entry import options, script_groups
from danube.settings import rows
from tests.conftest import CONF, REPO

# What each script needs besides its defaults to be a complete config.
REQUIRED = {"train": [], "finetune": ["model_dir=/m", "chat_data=messages"], "evaluate": ["model_dir=/m", "tasks=[x]"]}

# Options that compose but do not go together with the script: refused by the schema, naming why.
REFUSED = {("finetune", "precision", "fp8"): "precision=fp8 is for pretraining",
           ("finetune", "trainer", "h100x8_fsdp"): "trainer.strategy=fsdp is for pretraining"}


def compose_script(script: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(script, overrides=overrides)


CASES = [(script, group, option) for script in SCHEMAS for group in script_groups(script, CONF)
         if group not in ("paths",) for option in options(group, script, CONF)]


@pytest.mark.parametrize("script, group, option", CASES, ids=[f"{s}-{g}={o}" for s, g, o in CASES])
def test_every_option_of_every_group_composes_against_its_schema(script, group, option):
    overrides = [*REQUIRED[script], f"{group}={option}"]
    if script == "finetune" and group == "loss" and option == "dpo" or group == "experiment" and "dpo" in option:
        overrides = [o for o in overrides if not o.startswith("chat_data=")] + ["chat_data=pref_pairs"]
    if group == "chat_data":
        overrides = [o for o in overrides if not o.startswith("chat_data=")] + [f"chat_data={option}"]
        if option.startswith("pref_") or option == "danube_dpo":
            overrides.append("loss=dpo")
    if group == "suite":
        overrides = ["model_dir=/m", f"suite={option}", "data_dir=/d", "questions=/q"]
    if group == "experiment" and script == "train":
        overrides += ["model_dir=/m", "data.sources.web=/w", "data.sources.instruct=/i", "data.sources.wiki=/k",
                      "data.sources.academic=/a", "data.sources.other=/o"] if "danube2_continue" == option else \
            (["model_dir=/m"] if option.endswith("_tiny") else [])
    cfg = compose_script(script, overrides)
    if (script, group, option) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[script, group, option]):
            typed(cfg, SCHEMAS[script], f"{script}.py")
        return
    job = typed(cfg, SCHEMAS[script], f"{script}.py")
    assert isinstance(job, SCHEMAS[script])
    if script == "train" and group in ("model", "recipe", "stage", "debug", "data", "optim"):
        assert job.plans()


@pytest.mark.parametrize("script", sorted(SCHEMAS))
def test_the_primary_yaml_repeats_the_schema_defaults(script):
    """conf/SCRIPT.yaml shows the defaults with comments; they must be the schema's (or fill a ??? / ${...})."""
    mine = OmegaConf.to_container(OmegaConf.load(CONF / f"{script}.yaml"))  # ??? and ${...} stay as written
    defaults = {key: default for key, _, default, _, _ in rows(SCHEMAS[script])}
    flat = {}
    for key, value in mine.items():
        if key not in ("defaults", "hydra"):
            flat.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    for name, value in flat.items():
        if isinstance(value, str) and (value == "???" or "${" in value) or isinstance(value, dict):
            continue
        assert name in defaults, f"conf/{script}.yaml sets {name}, which its schema lacks"
        assert value == defaults[name], f"conf/{script}.yaml: {name}={value!r}, the schema's default {defaults[name]!r}"


def test_every_setting_says_what_it_does():
    for script, schema in SCHEMAS.items():
        undocumented = [key for key, _, _, _, doc in rows(schema) if not doc]
        assert not undocumented, f"{script}: {undocumented}"


def test_the_readme_table_is_the_schemas():
    readme = (REPO / "README.md").read_text()
    assert block() in readme, "README.md's table of settings is stale: run `danube settings --readme README.md`"


@pytest.mark.parametrize("overrides, message", [
    (["+train.lrr=1"], r"^unknown config key\(s\) train.lrr \(did you mean optim.lr\?\); train has "),
    (["+recipe.stages.0.weight=1"], r"^recipe.stages\[0\] \(seq128\): unknown keys \['weight'\]; allowed: name, "),
    (["model_dir=???"], r"^model_dir=\?\?\? must be given: pass model_dir=VALUE \(a danube model directory "),
    (["optim.lr=-1"], r"^optim.lr=-1 must be > 0$"),
    (["optim.betas=[0.9,1.5]"], r"^optim.betas=\[0.9, 1.5\] must be two numbers in \[0, 1\)$"),
    (["trainer.accelerator=tpu"], r"^trainer.accelerator='tpu'; allowed: cpu, gpu, cuda, auto$"),
    (["optim.fused=maybe"], r"^optim.fused='maybe'; allowed: auto, true, false$"),
])
def test_the_door_names_the_key_the_value_and_what_is_allowed(overrides, message):
    with pytest.raises(ValueError, match=message):
        typed(compose_script("train", overrides), SCHEMAS["train"], "train.py")


@pytest.mark.parametrize("script, overrides, message", [
    ("train", ["train.lrr=1"], r"^unknown config key\(s\) train.lrr \(did you mean optim.lr\?\); train has .*"),
    ("train", ["model=tiny2"], r"^model=tiny2: no such option \(did you mean model=tiny\?\); model has danube2_1p8b, "),
    ("finetune", ["chat_data=mesages"], r"^chat_data=mesages: no such option \(did you mean chat_data=messages\?\)"),
    ("train", ["train.global_batch_tokens=lots"], r"^train.global_batch_tokens='lots' is not an integer$"),
    ("evaluate", ["batch_size=1.5"], r"^batch_size='1.5' is not an integer$"),
    ("train", ["model.sliding_window=wide"], r"^model.sliding_window='wide' is not an integer$"),
    ("train", ["optim.lr=["], r"^an override does not parse: "),
])
def test_hydra_composition_errors_become_one_line(script, overrides, message):
    with pytest.raises(Exception) as err:
        compose_script(script, overrides)
    text = one_line(err.value, SCHEMAS[script])
    assert "\n" not in text
    assert re.search(message, text), text


@pytest.mark.slow
@pytest.mark.parametrize("command, message", [
    (["train.py", "train.lrr=1"], "train.py: error: unknown config key(s) train.lrr (did you mean optim.lr?)"),
    (["train.py", "model=tiny2"], "train.py: error: model=tiny2: no such option (did you mean model=tiny?)"),
    (["finetune.py", "chat_data=mesages", "model_dir=/m"],
     "finetune.py: error: chat_data=mesages: no such option (did you mean chat_data=messages?)"),
    (["evaluate.py", "tasks=[x]"], "evaluate.py: error: model_dir=PATH is required"),
])
def test_the_scripts_print_one_line_and_exit_1(command, message):
    out = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), out.stderr
