"""End-to-end pretraining on the tiny model: stages, resume, checkpoints, logs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from danube.model.loading import load_model
from danube.plot import plot_run, read_scalars
from danube.schedule import lr_at
from danube.checkpoints import AtomicCheckpointIO
from danube.tasks.train import run
from tests.conftest import REPO
from tests.train.conftest import SMALL, compose_train


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory, data_root):
    """One two-stage run shared by the assertions below (it is the slow part)."""
    tmp = tmp_path_factory.mktemp("two_stage")
    cfg = compose_train([*SMALL, f"paths.data_dir={data_root}", f"run_dir={tmp}/run"])
    return run(cfg)


def test_two_stages_run_back_to_back(two_stage_run):
    run_dir = two_stage_run.run_dir
    assert two_stage_run.tokens_seen == 40960 + 24576
    for stage in ("seq64", "seq128"):
        assert (run_dir / stage / "final.ckpt").is_file()
    stage2 = torch.load(run_dir / "seq128" / "final.ckpt", map_location="cpu", weights_only=False)
    assert stage2["danube"]["tokens_seen"] == 65536 and stage2["danube"]["seq_len"] == 128
    scalars = read_scalars(run_dir)
    seq = scalars["train/seq_len"]
    assert {v for t, v in seq if t < 40960} == {64.0} and {v for t, v in seq if t > 40960} == {128.0}
    # the step is at the boundary: the first stage's last step, then the second stage's first token
    assert [v for t, v in seq if t == 40960] == [64.0, 128.0]
    # the second stage continued the schedule where the first left it
    for tokens, value in scalars["train/lr"]:
        assert value == pytest.approx(lr_at(tokens, lr=1e-2, min_lr=1e-3, warmup=8192, total=65536))


def test_training_lowers_validation_loss(two_stage_run):
    val = [v for _, v in read_scalars(two_stage_run.run_dir)["val/loss"]]
    assert len(val) >= 3
    assert val[-1] < val[0], val
    assert val[-1] < math.log(4096) - 1.0, val  # a uniform guess over the vocabulary is ln(4096) = 8.3


def test_final_model_directory_has_weights_and_tokenizer(two_stage_run):
    model = load_model(two_stage_run.model_dir)
    assert (two_stage_run.model_dir / "tokenizer.model").is_file()
    assert model.cfg.n_layer == 2 and model.cfg.sliding_window == 48


def test_logs_have_the_report_curves_and_throughput(two_stage_run, tmp_path):
    tags = read_scalars(two_stage_run.run_dir)
    for tag in ("train/loss", "val/loss", "train/lr", "train/seq_len", "train/tokens_seen",
                "perf/tokens_per_sec", "perf/mfu", "data/tokens/sample"):
        assert tag in tags, tag
    assert all(0 < v < 1.5 for _, v in tags["perf/mfu"])
    png = plot_run(two_stage_run.run_dir, tmp_path / "fig.png")
    assert png.stat().st_size > 10_000
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        plot_run(tmp_path)


def test_rerunning_a_finished_run_changes_nothing(two_stage_run, data_root):
    final = two_stage_run.run_dir / "seq128" / "final.ckpt"
    before = final.stat().st_mtime_ns
    cfg = compose_train([*SMALL, f"paths.data_dir={data_root}", f"run_dir={two_stage_run.run_dir}"])
    again = run(cfg)
    assert again.tokens_seen == 65536
    assert final.stat().st_mtime_ns == before
    # what a sweeper minimises is the same whether the run trained now or earlier
    assert again.final_val_loss == pytest.approx(two_stage_run.final_val_loss, rel=1e-6)
    assert again.final_train_loss == pytest.approx(two_stage_run.final_train_loss, rel=1e-6)


def test_result_is_the_last_stage_last_losses(two_stage_run):
    scalars = read_scalars(two_stage_run.run_dir)
    tokens, val = scalars["val/loss"][-1]
    assert tokens > 40960  # logged in the second stage, not carried over from the first
    assert two_stage_run.final_val_loss == pytest.approx(val, rel=1e-6)
    assert two_stage_run.final_train_loss == pytest.approx(scalars["train/loss"][-1][1], rel=1e-6)


def test_resume_never_refuses_a_run_with_checkpoints(two_stage_run, data_root):
    cfg = compose_train([*SMALL, f"paths.data_dir={data_root}", f"run_dir={two_stage_run.run_dir}", "resume=never"])
    with pytest.raises(FileExistsError, match="nothing was overwritten"):
        run(cfg)


def test_later_stage_needs_the_earlier_one(small_run):
    cfg = compose_train([*small_run, "stage=seq128"])
    with pytest.raises(FileNotFoundError, match="run stage=seq64 first"):
        run(cfg)


def test_atomic_checkpoint_survives_a_failed_save(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.slow
def test_the_console_says_each_thing_once_and_ends_with_a_summary(tmp_path, data_root):
    """Output to a file: plain lines (no progress-bar frames), no library chatter, a summary, the log in the run dir.

    Run under umask 027: every directory and file the run writes has exactly the permissions it allows.
    """
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "train.py", *SMALL, f"paths.data_dir={data_root}", f"run_dir={run_dir}",
         "recipe.stages=[{name: seq64, seq_len: 64, tokens: 12288}]"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=lambda: os.umask(0o027), timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "\r" not in text and "\x1b[" not in text
    for noise in ("litlogger", "max_cache_size", "GPU available", "Seed set to", "weights_only", "LeafSpec",
                  "IterableDataset", "Traceback"):
        assert noise not in text, noise
    lines = [line.split(" ", 1)[1] for line in out.stdout.splitlines() if line[:2].isdigit()]  # without the time
    assert len(lines) == len(set(lines)), "a line appeared twice"
    assert "seq64 (seq 64): step 3/3" in out.stdout
    assert "train.py done in" in out.stdout and f"model:       {run_dir / 'seq64' / 'model'}" in out.stdout
    (log_file,) = (run_dir / "logs").glob("0001-*.log")
    assert "train.py done in" in log_file.read_text() and (run_dir / "history" / f"{log_file.stem}.yaml").is_file()
    home = Path(os.environ.get("DANUBE_HOME", REPO))
    assert not list(home.glob("runs/.hydra/*")) and not list(REPO.glob("*.log"))  # nothing outside the run dir
    for path in [run_dir, *run_dir.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o777
        assert mode == (0o750 if path.is_dir() else 0o640), (path, oct(mode))


# -- downstream evaluation in the training loop ---------------------------------------------------
EVAL_TASKS = ["chat_sample_mc", "sample_text"]  # the sample's multiple-choice task; a rolling log-likelihood


def eval_overrides(tasks_dir: Path, every: int = 5) -> list[str]:
    return [f"train.eval_every_n_steps={every}", f"train.eval_tasks=[{','.join(EVAL_TASKS)}]",
            f"train.eval_include_path={tasks_dir}", "train.eval_limit=40"]


@pytest.fixture(scope="module")
def eval_tasks_dir(tmp_path_factory) -> Path:
    """The task `danube chat-sample` ships, and a rolling log-likelihood task on its answers (a metric that moves)."""
    import json

    from danube.data.chat_sample import write_chat_sample

    root = tmp_path_factory.mktemp("chat")
    write_chat_sample(root)
    tasks = root / "tasks"
    docs = json.loads((tasks / "chat_sample_mc.json").read_text())
    (tasks / "sample_text.json").write_text(json.dumps([{"text": d["choices"][d["label"]]} for d in docs]))
    (tasks / "sample_text.yaml").write_text(
        f"task: sample_text\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'sample_text.json'}\n"
        'test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
        "  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}\n")
    return tasks


def evaluate_py(model_dir: Path, tasks_dir: Path, out: Path) -> dict:
    """What `python evaluate.py` gives for the in-loop tasks on a model directory: lm-eval's results."""
    from hydra import compose, initialize_config_dir

    from danube.tasks.evaluate import run as evaluate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"model_dir={model_dir}", f"tasks=[{','.join(EVAL_TASKS)}]",
                                             f"include_path={tasks_dir}", "limit=40", f"output_path={out}",
                                             "bootstrap_iters=0", "device=cpu"])
    return evaluate(cfg)["results"]


def logged_equals_evaluate_py(scalars: dict, tokens: int, results: dict) -> None:
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if filt == "none" and "stderr" not in metric:
                at = dict(scalars[f"eval/{task}/{metric}"])[tokens]
                assert at == pytest.approx(value, rel=1e-6), (task, metric, tokens)  # TensorBoard keeps float32


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, data_root, eval_tasks_dir):
    """two_stage_run's config with an evaluation every 5 steps, stopped at step 7 and resumed."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    base = [*SMALL, f"paths.data_dir={data_root}", f"run_dir={run_dir}", *eval_overrides(eval_tasks_dir)]
    run(compose_train([*base, "train.max_steps=7"]))
    return run(compose_train(base))


def test_evaluation_in_the_loop_is_logged_against_tokens_and_equals_evaluate_py(eval_run, eval_tasks_dir, tmp_path):
    scalars = read_scalars(eval_run.run_dir)
    # steps 5, 7 (where the first invocation stopped: its last step), 10 of seq64; 5 and 6 of seq128; each once
    expected = [20480, 28672, 40960, 61440, 65536]
    for tag in ("eval/chat_sample_mc/acc", "eval/chat_sample_mc/acc_norm", "eval/sample_text/word_perplexity",
                "eval/sample_text/bits_per_byte", "perf/eval_seconds"):
        assert [t for t, _ in scalars[tag]] == expected, tag
    assert not [tag for tag in scalars if "stderr" in tag]
    assert all(v > 0 for _, v in scalars["perf/eval_seconds"])
    bpb = [v for _, v in scalars["eval/sample_text/bits_per_byte"]]
    assert bpb[-1] < bpb[0]  # the model being trained is the one scored
    for stage, tokens in (("seq64", 40960), ("seq128", 65536)):  # each stage's last step, its model directory
        results = evaluate_py(eval_run.run_dir / stage / "model", eval_tasks_dir, tmp_path / f"{stage}.json")
        logged_equals_evaluate_py(scalars, tokens, results)


def test_evaluation_in_the_loop_changes_nothing_in_the_training(eval_run, two_stage_run):
    """Same weights, losses and LR as the run without it (which was not stopped and resumed either)."""
    from safetensors.torch import load_file

    for stage in ("seq64", "seq128"):
        ours, theirs = (load_file(str(r.run_dir / stage / "model" / "model.safetensors"))
                        for r in (eval_run, two_stage_run))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), stage
    ours, theirs = read_scalars(eval_run.run_dir), read_scalars(two_stage_run.run_dir)
    stop = 28672  # where the first invocation stopped validated too (its last step)
    for tag in ("train/loss", "val/loss", "train/lr", "train/grad_norm"):
        assert [p for p in ours[tag] if tag != "val/loss" or p[0] != stop] == theirs[tag], tag
    assert ours["perf/tokens_per_sec"][-1][1] > 0


def test_an_eval_task_that_does_not_exist_stops_the_run_before_it_trains(small_run, eval_tasks_dir, tmp_path):
    cfg = compose_train([*small_run, *eval_overrides(eval_tasks_dir), "train.eval_tasks=[chat_sample_mc,no_such_task]"])
    with pytest.raises(ValueError) as err:
        run(cfg)
    message = str(err.value)
    assert "\n" not in message and "train.eval_tasks" in message and "'no_such_task'" in message
    assert f"train.eval_include_path ({eval_tasks_dir})" in message
    assert not (tmp_path / "run").exists()
    cfg = compose_train([*small_run, *eval_overrides(tmp_path / "nowhere")])
    with pytest.raises(FileNotFoundError, match=r"^train.eval_include_path=.*nowhere: not a directory$"):
        run(cfg)
    with pytest.raises(ValueError, match=r"train.eval_every_n_steps=5 needs train.eval_tasks=\[TASK,...\]"):
        run(compose_train([*small_run, "train.eval_every_n_steps=5"]))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_evaluation_in_the_loop_on_two_processes_equals_evaluate_py(strategy, data_root, eval_tasks_dir, tmp_path):
    """DDP shares the documents over the ranks, FSDP runs them all on every rank together: no rank hangs."""
    from danube.checkpoints import load_checkpoint
    from danube.model.io import save_model_dir
    from danube.tasks.train import model_from_checkpoint

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", *SMALL, f"paths.data_dir={data_root}", f"run_dir={run_dir}", "stage=seq64",
           "train.max_steps=5", "train.checkpoint_every_n_steps=5", "trainer.devices=2",
           f"trainer.strategy={strategy}", *eval_overrides(eval_tasks_dir)]
    out = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    model_dir = tmp_path / "step5"
    ckpt = load_checkpoint(run_dir / "seq64" / "checkpoints" / "step00000005.ckpt", mmap=True)
    save_model_dir(model_from_checkpoint(ckpt), model_dir, tokenizer=data_root / "sample" / "tokenizer.model")
    scalars = read_scalars(run_dir)
    assert [t for t, _ in scalars["eval/chat_sample_mc/acc"]] == [20480]
    logged_equals_evaluate_py(scalars, 20480, evaluate_py(model_dir, eval_tasks_dir, tmp_path / "step5.json"))
