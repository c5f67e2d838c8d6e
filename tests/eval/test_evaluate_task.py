"""`python evaluate.py` end to end on local tasks, suites offline, perplexity shards."""

import json
import logging
import math
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


def test_tasks_on_a_local_task_write_results_json_and_the_table_with_standard_errors(model_dirs, task_dir, tmp_path,
                                                                                       caplog):
    out = tmp_path / "res.json"
    cfg = config(f"model_dir={model_dirs[0]}", "tasks=[toy_mc]", f"include_path={task_dir}", "limit=8",
                 f"output_path={out}", "batch_size=4", "device=cpu")
    with caplog.at_level(logging.INFO, logger="danube.tasks.evaluate"):
        run(cfg)
    saved = json.loads(out.read_text())
    res = saved["results"]["toy_mc"]
    assert res["sample_len"] == 8
    assert 0 <= saved["scores"]["toy_mc"] <= 100
    # lm-eval's closed-form standard error of a mean: sqrt(p (1 - p) / (n - 1))
    p = res["acc,none"]
    assert res["acc_stderr,none"] == pytest.approx(math.sqrt(p * (1 - p) / 7))
    table = out.with_suffix(".md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]
    acc = next(r for r in rows if r[4] == "acc")  # Tasks, Version, Filter, n-shot, Metric, ↑, Value, ±, Stderr
    assert float(acc[6]) == pytest.approx(p, abs=1e-3) and acc[7] == "±"
    assert float(acc[8]) == pytest.approx(res["acc_stderr,none"], abs=1e-4) and "N/A" not in table
    assert table.strip() in caplog.text  # printed too


def test_existing_results_are_never_replaced_silently(model_dirs, task_dir, tmp_path):
    out = tmp_path / "res.json"
    out.write_text("{}")
    args = [f"model_dir={model_dirs[0]}", "tasks=[toy_mc]", f"include_path={task_dir}", "limit=2",
            f"output_path={out}", "device=cpu"]
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run(config(*args))
    assert out.read_text() == "{}" and not out.with_suffix(".md").exists()
    run(config(*args, "overwrite=true"))
    assert "toy_mc" in json.loads(out.read_text())["results"]


def test_the_run_ends_with_a_summary_and_leaves_its_log_beside_the_results(model_dirs, task_dir, tmp_path, caplog):
    out = tmp_path / "res.json"
    with caplog.at_level("INFO", logger="danube"):
        result = run(config(f"model_dir={model_dirs[0]}", "tasks=[toy_mc]", f"include_path={task_dir}", "limit=2",
                            f"output_path={out}", "device=cpu"))
    assert result["wall_s"] >= 0 and json.loads(out.read_text())["wall_s"] == result["wall_s"]
    assert f"wrote {out}\n  wrote {out.with_suffix('.md')}\n  log: {out.with_suffix('.log')}" in caplog.text
    assert "|toy_mc|" in out.with_suffix(".log").read_text()  # the table is in the log too


def test_default_output_is_named_after_the_model_path(tmp_path):
    from danube.tasks.evaluate import model_label

    runs = tmp_path / "runs"
    assert model_label(runs / "tiny" / "seq256" / "model", runs) == "tiny-seq256"
    assert model_label(runs / "tiny" / "seq128" / "model", runs) == "tiny-seq128"
    assert model_label(runs / "danube_chat_sft" / "model", runs) == "danube_chat_sft"
    assert model_label(runs / "danube_chat_sft" / "hf", runs) == "danube_chat_sft-hf"
    assert model_label(tmp_path / "models" / "danube-base", runs) == "danube-base"
    assert model_label(tmp_path / "elsewhere" / "chat" / "model", runs) == "chat"


def test_default_output_paths_of_two_models_differ(model_dirs, task_dir, tmp_path):
    """Two stages' model directories (both called `model`) evaluate into two result files."""
    import shutil

    runs = tmp_path / "runs"
    for stage in ("seq128", "seq256"):
        shutil.copytree(model_dirs[0], runs / "tiny" / stage / "model")
        run(config(f"model_dir={runs / 'tiny' / stage / 'model'}", "tasks=[toy_mc]", f"include_path={task_dir}",
                   "limit=2", "device=cpu", f"paths.runs_dir={runs}"))
    written = sorted(p.name for p in (runs / "eval").iterdir())
    assert written == [f"tiny-{stage}-tasks.{ext}" for stage in ("seq128", "seq256") for ext in ("json", "log", "md")]
    assert json.loads((runs / "eval" / "tiny-seq256-tasks.json").read_text())["model_name"] == "tiny-seq256"


@pytest.mark.parametrize("suite,datasets", [
    ("danube_table1", ["allenai/ai2_arc", "super_glue", "Rowan/hellaswag", "allenai/openbookqa", "baber/piqa",
                       "winogrande", "mandarjoshi/trivia_qa"]),
    ("open_llm_v1", ["allenai/ai2_arc", "Rowan/hellaswag", "cais/mmlu", "truthfulqa/truthful_qa", "winogrande",
                     "openai/gsm8k"]),
])
def test_suite_without_the_datasets_offline_names_every_one_before_loading_the_model(model_dirs, tmp_path, suite,
                                                                                     datasets, monkeypatch):
    import danube.eval.lm_eval_adapter as adapter

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the datasets were checked")

    monkeypatch.setattr(adapter, "load_for_eval", no_model)
    cfg = config(f"model_dir={model_dirs[0]}", f"suite={suite}", f"output_path={tmp_path / 'r.json'}", "device=cpu")
    with pytest.raises(DatasetUnavailableError) as err:
        run(cfg)
    message = str(err.value)
    n_tasks = len(cfg.suite.tasks)
    assert f"{n_tasks} of {n_tasks} task(s)" in message
    for entry in cfg.suite.tasks:
        assert f"  {entry.task}: " in message
    for dataset in datasets:
        assert dataset in message
    assert "include_path" in message and "HF_DATASETS_CACHE" in message
    assert not (tmp_path / "r.json").exists()


def test_suite_with_local_replacement_tasks_writes_the_table(model_dirs, task_dir, tmp_path):
    # Every Table 1 task replaced by the toy task: the pipeline, columns and table layout run offline.
    names = ["arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande"]
    remap = "{" + ",".join(f"{n}:toy_mc_{n}" for n in names) + "}"
    for n in names:
        (tmp_path / f"toy_mc_{n}.yaml").write_text((task_dir / "toy_mc.yaml").read_text().replace("task: toy_mc", f"task: toy_mc_{n}"))
    out = tmp_path / "t1.json"
    cfg = config(f"model_dir={model_dirs[1]}", "suite=danube_table1", f"include_path={tmp_path}",
                 f"task_map={remap}", "limit=4", f"output_path={out}", "device=cpu",
                 "model_name=toy", "model_tokens=0.01T")
    cfg.suite.tasks = [t for t in cfg.suite.tasks if t.task != "triviaqa"]
    run(cfg)
    table = out.with_suffix(".md").read_text()
    assert "| Stable LM 2* | 1.6B | 4.00T | 67.63 | 39.08 | 75.60 | 68.78 | 40.00 | 76.39 | 33.84 | 63.30 |" in table
    report_layout, per_task = table.split("Every task and metric (lm-eval):")
    ours = report_layout.strip().splitlines()[-1]
    assert ours.startswith("| toy | ") and "0.01T" in ours and ours.count("—") == 1  # TriviaQA not run
    assert "toy_mc_arc_easy" in per_task and "±" in per_task


def test_bad_config_fails_before_loading(model_dirs, tmp_path):
    with pytest.raises(ValueError, match="tasks="):
        run(config(f"model_dir={model_dirs[0]}"))
    with pytest.raises(FileNotFoundError, match="model_dir=.*nope: no such directory"):
        run(config(f"model_dir={tmp_path / 'nope'}", "tasks=[x]"))
    with pytest.raises(FileNotFoundError, match="model_dir=.* is not a model directory"):
        run(config(f"model_dir={tmp_path}", "tasks=[x]"))
    with pytest.raises(ValueError, match="questions"):
        run(config(f"model_dir={model_dirs[0]}", "suite=mt_bench"))
    with pytest.raises(ValueError, match="model_dir=PATH is required"):
        run(config("tasks=[x]"))


def test_the_old_name_of_model_dir_still_works_with_a_warning(model_dirs, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="danube.config.door"):
        with pytest.raises(FileNotFoundError, match="model_dir=.*nope: no such directory"):
            run(config(f"model_path={tmp_path / 'nope'}", "tasks=[x]"))
    assert "evaluate.py: model_path= is deprecated and goes in the next release; use model_dir=" in caplog.text
    with pytest.raises(ValueError, match="model_path=.* and model_dir=.*: model_path is the old name of model_dir"):
        run(config(f"model_path={tmp_path / 'nope'}", f"model_dir={model_dirs[0]}", "tasks=[x]"))


def test_perplexity_suite_on_litdata_shards(model_dirs, tmp_path):
    import math

    import torch

    from danube.model.loading import load_model
    from tests.eval.shards import write_shards

    tokens = torch.randint(3, 1000, (4 * 33 + 5,), generator=torch.Generator().manual_seed(0))
    write_shards(tokens, tmp_path / "val")
    out = tmp_path / "ppl.json"
    run(config(f"model_dir={model_dirs[0]}", "suite=perplexity", f"data_dir={tmp_path}", "seq_len=32",
               f"output_path={out}", "device=cpu", "batch_size=3"))
    p = json.loads(out.read_text())["perplexity"]
    assert p["blocks"] == 4 and p["tokens"] == 4 * 32
    model = load_model(model_dirs[0])
    blocks = tokens[: 4 * 33].view(4, 33)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(blocks[:, :-1]).flatten(0, 1), blocks[:, 1:].flatten())
    assert math.isclose(p["loss"], ref.item(), rel_tol=1e-5)
    assert math.isclose(p["perplexity"], math.exp(ref.item()), rel_tol=1e-5)


@pytest.mark.slow
def test_evaluate_py_command_line(model_dirs, task_dir, tmp_path):
    out = tmp_path / "cli.json"
    proc = subprocess.run(
        [sys.executable, "evaluate.py", f"model_dir={model_dirs[0]}", "tasks=[toy_mc,toy_gen]", f"include_path={task_dir}",
         "limit=4", f"output_path={out}", "device=cpu", f"paths.runs_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads(out.read_text())["results"]) == {"toy_mc", "toy_gen"}
