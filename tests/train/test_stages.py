"""Danube2 on CPU: data stages with their own mixtures, starting from a model directory (model_dir), the tiny chain.

The chain is the report's section 7 in miniature: a Danube-1-style model (sliding window,
a 1,000-piece tokenizer trained on pydoc prose) -> `danube swap-tokenizer` to the sample's
4,096-piece tokenizer -> conf/experiment/danube2_continue_tiny.yaml (no window) through
its three data stages over the sample's three sources, at test-sized shapes and budgets.
"""

from __future__ import annotations

import json

import pytest
import torch

from danube.cli import main
from danube.corpus.prepare import prepare
from danube.data.sample import SOURCES
from danube.lit.pretrain import PretrainModule
from danube.model import build_model
from danube.model.io import read_config, save_model_dir
from danube.model.loading import load_model
from danube.plot import read_scalars
from danube.schedule import lr_at
from danube.tasks.train import load, run, validate
from tests.conftest import corpus_lines
from tests.train.conftest import SMALL, compose_train

# The debug model's shapes (conf/debug/fast.yaml) without its window and recipe.
SHAPES = ["model.n_embd=64", "model.intermediate_size=128", "model.n_layer=2", "model.n_head=4", "model.n_kv_head=2"]
# The tiny Danube2 recipe's three stages (and their weights, from the YAML) at 64 tokens a
# sample: 512, 512 and 256 samples, so each stage's measured mixture is meaningful.
STAGE_TOKENS = (32_768, 32_768, 16_384)
BUDGET = [
    *[f"recipe.stages.{i}.seq_len=64" for i in range(3)],
    *[f"recipe.stages.{i}.tokens={t}" for i, t in enumerate(STAGE_TOKENS)],
    "train.global_batch_tokens=4096", "train.micro_batch_tokens=1024", "train.val_every_n_steps=4",
    "train.val_batches=2", "train.checkpoint_every_n_steps=4", "train.log_every_n_steps=1",
    "optim.warmup_tokens=8192", "optim.lr=1e-2", "optim.min_lr=1e-3", "data.num_workers=0",
]
WEIGHTS = {  # conf/recipe/tiny_danube2.yaml
    "data1": {"code": 0.845, "docstrings": 0.0775, "topics": 0.0775},
    "data2": {"code": 0.728, "docstrings": 0.136, "topics": 0.136},
    "data3": {"code": 0.555, "docstrings": 0.2225, "topics": 0.2225},
}


def continuation(data_root, run_dir, model_dir, *extra):
    return compose_train(["experiment=danube2_continue_tiny", *SHAPES, *BUDGET, f"model_dir={model_dir}",
                          f"paths.data_dir={data_root}", f"run_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def danube1(tmp_path_factory, sp_model, data_root):
    """A Danube-1-style model directory: window 48, trained a few steps on shards of sp_model's tokens."""
    root = tmp_path_factory.mktemp("danube1")
    docs = corpus_lines(600)
    (root / "prose.jsonl").write_text("".join(json.dumps({"text": "\n".join(docs[i:i + 4])}) + "\n"
                                              for i in range(0, len(docs), 4)))
    prepare([root / "prose.jsonl"], root / "shards", sp_model, val_fraction=0.05, num_workers=1, chunk_bytes="1MB")
    cfg = compose_train([*SMALL, "data=pretrain", f"data.sources={root / 'shards'}", f"data.tokenizer={sp_model}",
                         "model.vocab_size=1000", "recipe.stages=[{name: seq64, seq_len: 64, tokens: 12288}]",
                         f"run_dir={root / 'run'}"])
    return run(cfg).model_dir


@pytest.fixture(scope="module")
def chain(tmp_path_factory, danube1, data_root):
    """swap-tokenizer to the sample's tokenizer, then the three data stages with no window."""
    root = tmp_path_factory.mktemp("danube2")
    assert main(["swap-tokenizer", str(danube1), str(data_root / "sample" / "tokenizer.model"),
                 str(root / "swapped")]) == 0
    result = run(continuation(data_root, root / "run", root / "swapped", "train.keep_checkpoints=2"))
    return root, result


def source_tokens(run_dir, stage):
    return torch.load(run_dir / stage / "final.ckpt", map_location="cpu", weights_only=True)["danube"]["source_tokens"]


@pytest.mark.slow  # shares the ~35 s chain fixture (three runs)
def test_each_stage_reads_its_own_mixture(chain):
    root, result = chain
    run_dir = result.run_dir
    assert result.tokens_seen == sum(STAGE_TOKENS)
    before = dict.fromkeys(SOURCES, 0)
    for stage, tokens in zip(WEIGHTS, STAGE_TOKENS):
        after = source_tokens(run_dir, stage)
        stage_counts = {s: after[s] - before[s] for s in SOURCES}
        assert sum(stage_counts.values()) == tokens  # counts carry over: each checkpoint holds the running totals
        for s, w in WEIGHTS[stage].items():
            assert stage_counts[s] / tokens == pytest.approx(w, abs=0.02), (stage, s, stage_counts)
        before = after


@pytest.mark.slow  # shares the ~35 s chain fixture (three runs)
def test_tensorboard_token_counts_end_each_stage_at_the_checkpoint_counts(chain):
    _, result = chain
    scalars = read_scalars(result.run_dir)
    end = 0
    for stage, tokens in zip(WEIGHTS, STAGE_TOKENS):
        end += tokens
        counts = source_tokens(result.run_dir, stage)
        for s in SOURCES:
            points = dict(scalars[f"data/tokens/{s}"])
            assert points[end] == counts[s], (stage, s)
    # the stages continued one schedule from 0 tokens: a fresh start, not Danube-1's 12,288 tokens
    lr = scalars["train/lr"]
    assert [t for t, _ in lr[:2]] == [0, 4096]  # the first stage's first token, then its first step
    for tokens, value in lr:
        assert value == pytest.approx(lr_at(tokens, lr=1e-2, min_lr=1e-3, warmup=8192, total=sum(STAGE_TOKENS)))
    seq = {v for _, v in scalars["train/seq_len"]}
    assert seq == {64.0}


@pytest.mark.slow  # shares the ~35 s chain fixture (three runs)
def test_continued_model_has_no_window_and_the_new_tokenizer(chain, danube1, data_root):
    root, result = chain
    assert read_config(danube1).sliding_window == 48 and read_config(danube1).vocab_size == 1000
    cfg = read_config(result.model_dir)
    assert cfg.sliding_window is None and cfg.vocab_size == 4096 and cfg.max_seq_len == 256
    tok = data_root / "sample" / "tokenizer.model"
    assert (result.model_dir / "tokenizer.model").read_bytes() == tok.read_bytes()
    val = [v for _, v in read_scalars(result.run_dir)["val/loss"]]
    assert val[-1] < val[0], val


@pytest.mark.slow  # shares the ~35 s chain fixture (three runs)
def test_resuming_inside_a_stage_keeps_the_per_source_counts(chain, data_root, tmp_path):
    root, first = chain
    step4 = first.run_dir / "data1" / "checkpoints" / "step00000004.ckpt"
    assert step4.is_file()
    cfg = continuation(data_root, tmp_path / "run", root / "swapped", "stage=data1", f"resume={step4}")
    run(cfg)
    assert source_tokens(tmp_path / "run", "data1") == source_tokens(first.run_dir, "data1")
    points = dict(read_scalars(tmp_path / "run")["data/tokens/code"])
    assert points[STAGE_TOKENS[0]] == source_tokens(first.run_dir, "data1")["code"]


def test_module_starts_from_a_model_directory_exactly(tmp_path):
    cfg = compose_train(["debug=fast", "model.sliding_window=null"])
    saved = save_model_dir(build_model(load(cfg).model), tmp_path / "m")
    module = PretrainModule(model=load(cfg).model.to_dict(), optim={}, total_tokens=1,
                            seq_len=64, init_from=str(saved))
    module.configure_model()
    module._start_from_model_dir(str(saved))
    want = load_model(saved).state_dict()
    for name, value in module.model.state_dict().items():
        assert torch.equal(value, want[name]), name
    assert module.tokens_seen == 0 and module.source_tokens_total == []  # a fresh start: no tokens carried


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+recipe.stages.1.weights.wiki=0.1"],
         r"recipe stage 'data2' weights name \['code', 'docstrings', 'topics', 'wiki'\] .* unknown: \['wiki'\]"),
        (["recipe.stages.0.weights.code=-1"], r"recipe.stages\[0\] \(data1\): weights must map"),
        (["+recipe.stages.2.weight=1"], r"recipe.stages\[2\] \(data3\): unknown keys \['weight'\]"),
        (["data.weights={web: 1.0}"], r"data.weights name \['web'\] .* missing: \['code', 'docstrings', 'topics'\]"),
    ],
)
def test_bad_mixtures_fail_before_any_work(overrides, message, tmp_path):
    cfg = compose_train(["experiment=danube2_continue_tiny", f"model_dir={tmp_path}", "plan=true", *overrides])
    with pytest.raises(ValueError, match=message):
        validate(cfg)


def test_plan_shows_each_stage_mixture(capsys):
    run(compose_train(["experiment=danube2_continue", "plan=true"]))
    out = capsys.readouterr().out
    assert "| data1 | 8,192 | 999,999,406,080 |" in out
    assert "web 84.5%, instruct 2.5%, wiki 5.0%, academic 4.0%, other 4.0% |" in out
    assert "| data3 | 8,192 | 49,999,380,480 |" in out and "web 55.5%, instruct 13.0%" in out


def test_the_start_model_must_fit_the_model_and_the_data(tmp_path, data_root, sp_model):
    base = [*SHAPES, *BUDGET, f"paths.data_dir={data_root}", f"run_dir={tmp_path}/run"]
    with pytest.raises(FileNotFoundError, match="model_dir=.*not a model directory"):
        validate(compose_train(["experiment=danube2_continue_tiny", f"model_dir={tmp_path}", *base]))
    other = compose_train(["experiment=danube2_continue_tiny", f"model_dir={tmp_path}", *base,
                           "model.intermediate_size=96"])
    save_model_dir(build_model(load(other).model), tmp_path / "narrow", tokenizer=sp_model)
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \[96, 64\]"):
        validate(compose_train(["experiment=danube2_continue_tiny", f"model_dir={tmp_path / 'narrow'}", *base]))
    cfg = compose_train(["experiment=danube2_continue_tiny", f"model_dir={tmp_path / 'oldtok'}", *base])
    save_model_dir(build_model(load(cfg).model), tmp_path / "oldtok", tokenizer=sp_model)
    with pytest.raises(ValueError, match="danube swap-tokenizer"):
        run(cfg)  # the sample's tokenizer is not the directory's: refused before any step
    assert not (tmp_path / "run").exists()
