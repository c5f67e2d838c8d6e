"""Held-out data for fine-tuning: train.val_fraction or a dataset's own split, validated at an interval and at the end."""

import json
import logging
import math
import re

import pytest
import torch

from danube.data.finetune import hold_out
from danube.data.sft import read_conversations, tokenize_conversations
from danube.data.tokenizer import Tokenizer
from danube.losses import token_loss_sum
from danube.model.loading import load_model
from danube.plot import read_scalars
from danube.tasks.finetune import run
from tests.chat.conftest import compose_finetune
from tests.chat.hub_layouts import local_copy

CPU = ["trainer=cpu", "precision=fp32", "export_hf=false", "train.max_seq_len=256", "train.log_every_n_steps=1"]


def test_sft_val_fraction_is_held_out_and_its_loss_logged_at_the_interval_and_the_end(tiny_model_dir, chat_files,
                                                                                      tmp_path, caplog):
    cfg = compose_finetune(CPU + [
        f"model_dir={tiny_model_dir}", "chat_data=messages", f"chat_data.sources.messages.path={chat_files['messages']}",
        f"run_dir={tmp_path / 'sft'}", "train.batch_size=4", "train.micro_batch_size=2", "optim.lr=3e-3",
        "train.val_fraction=0.2", "train.val_every_n_steps=4", "train.log_every_n_steps=4",
    ])
    with caplog.at_level(logging.INFO, logger="danube.callbacks"):
        result = run(cfg)
    assert result.data_counts["validation_items"] == 6  # 20% of 30 conversations
    # 24 training samples, 4 per step (2 micro-batches): 6 steps. TensorBoard's steps are the
    # console's: train/* at the first step, every 4th and the last; val/* before the first
    # step (the starting model), after step 4 and after the last.
    console = [int(m) for m in re.findall(r"sft steps: step (\d+)/6", caplog.text)]
    scalars = read_scalars(result.run_dir)
    assert console == [1, 4, 6] and [step for step, _ in scalars["train/loss"]] == console
    assert [step for step, _ in scalars["train/lr"]] == console
    val = scalars["val/loss"]
    assert [step for step, _ in val] == [0, 4, 6]
    assert val[0][1] == pytest.approx(result.start_metrics["val/loss"], rel=1e-6)
    assert val[-1][1] < val[1][1] < val[0][1]  # training on the same topics lowers the held-out loss
    # Every final metric (metrics.json) is in TensorBoard at the last step, with its value.
    record = json.loads((result.run_dir / "metrics.json").read_text())
    assert record["start"] == result.start_metrics and set(record["metrics"]) >= {"train/loss", "train/lr", "val/loss"}
    for key, value in record["metrics"].items():
        assert scalars[key][-1] == (6, pytest.approx(value, rel=1e-6)), key
    # The last value is the token-mean loss of exactly the held-out conversations under the result.
    tok = Tokenizer(tiny_model_dir)
    samples, _ = tokenize_conversations(tok, read_conversations(chat_files["messages"], "messages"), 256)
    _, held = hold_out(samples, 0.2, int(cfg.seed), "messages")
    model = load_model(result.model_dir).eval()
    total = count = 0
    with torch.no_grad():
        for s in held:
            loss_sum, n = token_loss_sum(model(torch.tensor([s.input_ids])), torch.tensor([s.labels]))
            total, count = total + loss_sum.item(), count + n.item()
    assert result.metrics["val/loss"] == pytest.approx(total / count, rel=1e-5)
    assert result.metrics["val/answer_tokens"] == count


def test_hold_out_is_seeded_and_disjoint():
    items = list(range(100))
    train, val = hold_out(items, 0.1, 42, "a")
    assert len(val) == 10 and sorted(train + val) == items
    assert hold_out(items, 0.1, 42, "a") == (train, val)
    assert hold_out(items, 0.1, 43, "a")[1] != val and hold_out(items, 0.0, 42, "a") == (items, [])


def test_dpo_validates_on_the_datasets_own_test_split(tiny_model_dir, tmp_path):
    local = local_copy(tmp_path / "hub", "HuggingFaceH4/ultrafeedback_binarized")
    cfg = compose_finetune(CPU + [
        "loss=dpo", f"model_dir={tiny_model_dir}", "chat_data=pref_ultrafeedback",
        f"chat_data.sources.ultrafeedback.path={local}", "chat_data.sources.ultrafeedback.val_split=test_prefs",
        f"run_dir={tmp_path / 'dpo'}", "train.batch_size=2", "train.micro_batch_size=2", "train.max_steps=3",
        "optim.lr=2e-2", "train.val_every_n_steps=2",
    ])
    result = run(cfg)
    assert result.data_counts["validation_items"] == 3  # test_prefs holds 3 pairs
    scalars = read_scalars(result.run_dir)
    for key in ("val/loss", "val/rewards/chosen", "val/rewards/rejected", "val/rewards/accuracies",
                "val/rewards/margins", "val/logps/chosen", "val/logps/rejected"):
        assert [step for step, _ in scalars[key]] == [0, 2, 3], key  # 0: the model before training
        assert result.metrics[key] == pytest.approx(scalars[key][-1][1])
    assert result.metrics["val/pairs"] == 3
    margins = dict(scalars["val/rewards/margins"])
    chosen, rejected = dict(scalars["val/rewards/chosen"]), dict(scalars["val/rewards/rejected"])
    assert margins[2] == pytest.approx(chosen[2] - rejected[2], abs=1e-5)
    # peft starts lora_B at zero: before training the policy is its reference.
    assert result.start_metrics["val/loss"] == pytest.approx(math.log(2), abs=1e-6) and margins[0] == 0


def test_no_held_out_data_by_default(tiny_model_dir, chat_files, tmp_path):
    cfg = compose_finetune(CPU + [
        f"model_dir={tiny_model_dir}", "chat_data=messages", f"chat_data.sources.messages.path={chat_files['messages']}",
        f"run_dir={tmp_path / 'sft'}", "train.batch_size=2", "train.micro_batch_size=2", "train.max_steps=1",
    ])
    assert cfg.train.val_fraction == 0.0
    result = run(cfg)
    assert result.data_counts["validation_items"] == 0 and result.data_counts["samples"] == 30
    assert not any(k.startswith("val/") for k in result.metrics)


def test_val_split_needs_a_dataset_with_splits(tiny_model_dir, chat_files, tmp_path):
    base = CPU + [f"model_dir={tiny_model_dir}", f"run_dir={tmp_path / 'x'}", "chat_data=metamathqa",
                  f"chat_data.sources.metamathqa.path={chat_files['metamath']}"]
    with pytest.raises(ValueError, match="val_split=test: .* is a single file, with no splits; hold out a part of it "
                                         "with train.val_fraction"):
        run(compose_finetune(base + ["+chat_data.sources.metamathqa.val_split=test"]))
    local = local_copy(tmp_path / "hub", "HuggingFaceH4/ultrachat_200k")
    with pytest.raises(ValueError, match="has no split 'test'; splits found: test_gen, test_sft"):
        run(compose_finetune(CPU + [f"model_dir={tiny_model_dir}", f"run_dir={tmp_path / 'x'}", "chat_data=ultrachat",
                                    f"chat_data.sources.ultrachat.path={local}",
                                    "chat_data.sources.ultrachat.val_split=test"]))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_every_rank_validates_and_the_ranks_together_count_each_item_once(tiny_model_dir, chat_files, world_size):
    """A rank short of validation data still runs the pass (the reduce needs every rank), counting nothing."""
    from functools import partial

    from danube.data.sft import collate
    from danube.lit.sft import SFTModule
    from danube.data.finetune import MicroBatches

    tok = Tokenizer(tiny_model_dir)
    samples, _ = tokenize_conversations(tok, read_conversations(chat_files["messages"], "messages")[:7], 256)
    module = SFTModule(load_model(tiny_model_dir).eval(), {"lr": 1e-3}, total_steps=1)
    ranks = [MicroBatches(samples, 2, r, world_size, partial(collate, pad_id=tok.pad_id)) for r in range(world_size)]
    assert len({len(r) for r in ranks}) == 1  # 4 micro-batches of 7 items: the same count on every rank
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for rank in ranks:
            module.on_validation_epoch_start()
            for i in range(len(rank)):
                module.validation_step(rank[i], i)
            total += module.val_sums
    one = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for s in samples:
            loss_sum, n = token_loss_sum(module.model(torch.tensor([s.input_ids])), torch.tensor([s.labels]))
            one += torch.tensor([loss_sum.item(), n.item()], dtype=torch.float64)
    assert total[1] == one[1] and total[0].item() == pytest.approx(one[0].item(), rel=1e-5)
