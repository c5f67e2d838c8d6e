"""`python evaluate.py` end to end on local tasks, suites offline, perplexity shards."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from danube.eval.suites import DatasetUnavailableError
from danube.tasks.evaluate import run

REPO = Path(__file__).resolve().parents[2]


def config(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


def test_tasks_on_a_local_task_write_results_json(model_dirs, task_dir, tmp_path):
    out = tmp_path / "res.json"
    cfg = config(f"model_path={model_dirs[0]}", "tasks=[toy_mc]", f"include_path={task_dir}", "limit=8",
                 f"output_path={out}", "batch_size=4", "device=cpu")
    run(cfg)
    saved = json.loads(out.read_text())
    assert saved["results"]["toy_mc"]["sample_len"] == 8
    assert 0 <= saved["scores"]["toy_mc"] <= 100


@pytest.mark.parametrize("suite,dataset", [("danube_table1", "allenai/ai2_arc"), ("open_llm_v1", "allenai/ai2_arc")])
def test_suite_without_the_dataset_offline_names_it_and_says_how_to_supply_it(model_dirs, tmp_path, suite, dataset):
    cfg = config(f"model_path={model_dirs[0]}", f"suite={suite}", f"output_path={tmp_path / 'r.json'}", "device=cpu")
    with pytest.raises(DatasetUnavailableError, match=dataset) as err:
        run(cfg)
    assert "include_path" in str(err.value) and "HF_DATASETS_CACHE" in str(err.value)
    assert not (tmp_path / "r.json").exists()


def test_suite_with_local_replacement_tasks_writes_the_table(model_dirs, task_dir, tmp_path):
    # Every Table 1 task replaced by the toy task: the pipeline, columns and table layout run offline.
    names = ["arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande"]
    remap = "{" + ",".join(f"{n}:toy_mc_{n}" for n in names) + "}"
    for n in names:
        (tmp_path / f"toy_mc_{n}.yaml").write_text((task_dir / "toy_mc.yaml").read_text().replace("task: toy_mc", f"task: toy_mc_{n}"))
    out = tmp_path / "t1.json"
    cfg = config(f"model_path={model_dirs[1]}", "suite=danube_table1", f"include_path={tmp_path}",
                 f"task_map={remap}", "limit=4", f"output_path={out}", "device=cpu",
                 "model_name=toy", "model_tokens=0.01T")
    cfg.suite.tasks = [t for t in cfg.suite.tasks if t.task != "triviaqa"]
    run(cfg)
    table = out.with_suffix(".md").read_text()
    assert "| Stable LM 2* | 1.6B | 4.00T | 67.63 | 39.08 | 75.60 | 68.78 | 40.00 | 76.39 | 33.84 | 63.30 |" in table
    ours = table.strip().splitlines()[-1]
    assert ours.startswith("| toy | ") and "0.01T" in ours and ours.count("—") == 1  # TriviaQA not run


def test_bad_config_fails_before_loading(tmp_path):
    with pytest.raises(ValueError, match="tasks="):
        run(config(f"model_path={tmp_path}"))
    with pytest.raises(FileNotFoundError, match="model_path"):
        run(config(f"model_path={tmp_path / 'nope'}", "tasks=[x]"))
    with pytest.raises(ValueError, match="questions"):
        run(config(f"model_path={tmp_path}", "suite=mt_bench"))


def test_perplexity_suite_on_litdata_shards(model_dirs, tmp_path):
    import math

    import torch

    from danube.model.io import load_model_dir
    from tests.eval.shards import write_shards

    tokens = torch.randint(3, 1000, (4 * 33 + 5,), generator=torch.Generator().manual_seed(0))
    write_shards(tokens, tmp_path / "val")
    out = tmp_path / "ppl.json"
    run(config(f"model_path={model_dirs[0]}", "suite=perplexity", f"data_dir={tmp_path}", "seq_len=32",
               f"output_path={out}", "device=cpu", "batch_size=3"))
    p = json.loads(out.read_text())["perplexity"]
    assert p["blocks"] == 4 and p["tokens"] == 4 * 32
    model = load_model_dir(model_dirs[0])
    blocks = tokens[: 4 * 33].view(4, 33)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(blocks[:, :-1]).flatten(0, 1), blocks[:, 1:].flatten())
    assert math.isclose(p["loss"], ref.item(), rel_tol=1e-5)
    assert math.isclose(p["perplexity"], math.exp(ref.item()), rel_tol=1e-5)


@pytest.mark.slow
def test_evaluate_py_command_line(model_dirs, task_dir, tmp_path):
    out = tmp_path / "cli.json"
    proc = subprocess.run(
        [sys.executable, "evaluate.py", f"model_path={model_dirs[0]}", "tasks=[toy_mc,toy_gen]", f"include_path={task_dir}",
         "limit=4", f"output_path={out}", "device=cpu", f"paths.runs_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads(out.read_text())["results"]) == {"toy_mc", "toy_gen"}
