"""finetune.run on the tiny model: SFT lowers the answer loss, DPO separates clear pairs, the chain runs."""

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from danube.data.preference import collate_pairs, read_pairs, tokenize_pairs
from danube.data.sft import collate, read_conversations, tokenize_conversation
from danube.data.tokenizer import Tokenizer
from danube.losses import sequence_logps, token_loss_sum
from danube.model.loading import load_model
from danube.tasks.finetune import run
from tests.chat.conftest import compose_finetune
from tests.conftest import CONF, REPO

CPU = ["trainer=cpu", "precision=fp32", "export_hf=false", "train.max_seq_len=256", "train.log_every_n_steps=1"]


def answer_loss(model_dir, convs, tok) -> float:
    model = load_model(model_dir).eval()
    batch = collate([tokenize_conversation(tok, c) for c in convs], tok.pad_id)
    with torch.no_grad():
        total, count = token_loss_sum(model(batch["input_ids"]), batch["labels"])
    return (total / count).item()


def test_sft_lowers_the_answer_loss(tiny_model_dir, chat_files, tmp_path):
    cfg = compose_finetune(CPU + [
        f"model_dir={tiny_model_dir}", "chat_data=messages", f"chat_data.sources.messages.path={chat_files['messages']}",
        f"run_dir={tmp_path / 'sft'}", "train.batch_size=4", "train.micro_batch_size=2", "train.epochs=3",
        "optim.lr=3e-3", "train.packing=true",
    ])
    result = run(cfg)
    tok = Tokenizer(tiny_model_dir)
    convs = read_conversations(chat_files["messages"], "messages")
    before, after = answer_loss(tiny_model_dir, convs, tok), answer_loss(result.model_dir, convs, tok)
    assert after < before - 1.0, (before, after)
    assert result.data_counts["samples"] == 30
    assert (result.run_dir / "config.yaml").is_file() and "train/loss" in result.metrics


def test_progress_bar_counts_optimizer_steps(tiny_model_dir, chat_files, tmp_path, monkeypatch):
    """4 micro-batches per step, 3 steps: the bar ends at 3/3 (it showed micro-batches against steps)."""
    import danube.logs
    from danube.callbacks import StageProgressBar

    monkeypatch.setattr(danube.logs, "console_is_terminal", lambda: True)  # the bar is for terminals
    ends = []
    monkeypatch.setattr(StageProgressBar, "on_train_end", lambda self, trainer, module: ends.append(
        (self.train_progress_bar.n, self.train_progress_bar.total, trainer.global_step, self.description)))
    run(compose_finetune(CPU + [
        f"model_dir={tiny_model_dir}", "chat_data=messages", f"chat_data.sources.messages.path={chat_files['messages']}",
        f"run_dir={tmp_path / 'sft'}", "train.batch_size=4", "train.micro_batch_size=1", "train.max_steps=3",
    ]))
    assert ends == [(3, 3, 3, "sft steps")]


def pair_accuracy(policy_dir, reference_dir, pairs_file, tok) -> float:
    items, _ = tokenize_pairs(tok, read_pairs(pairs_file, "distilabel_math"), 256)
    batch = collate_pairs(items, tok.pad_id)
    with torch.no_grad():
        pol = sequence_logps(load_model(policy_dir)(batch["input_ids"]), batch["labels"])
        ref = sequence_logps(load_model(reference_dir)(batch["input_ids"]), batch["labels"])
    n = len(items)
    return ((pol[:n] - ref[:n]) > (pol[n:] - ref[n:])).float().mean().item()


def test_dpo_separates_clear_pairs_within_a_few_steps(tiny_model_dir, chat_files, tmp_path):
    cfg = compose_finetune(CPU + [
        "loss=dpo", f"model_dir={tiny_model_dir}", "chat_data=pref_distilabel_math",
        f"chat_data.sources.distilabel_math.path={chat_files['distilabel_math']}", f"run_dir={tmp_path / 'dpo'}",
        "train.batch_size=2", "train.micro_batch_size=2", "train.max_steps=6", "optim.lr=2e-2",
    ])
    result = run(cfg)
    logged = json.loads((result.run_dir / "metrics.json").read_text())["metrics"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert key in logged
    tok = Tokenizer(tiny_model_dir)
    assert pair_accuracy(result.model_dir, tiny_model_dir, chat_files["distilabel_math"], tok) > 0.5
    assert (result.adapter_dir / "adapter_config.json").is_file()


def test_config_errors_come_before_any_work(tiny_model_dir, chat_files, tmp_path):
    base = CPU + [f"model_dir={tiny_model_dir}", f"run_dir={tmp_path / 'x'}"]
    with pytest.raises(ValueError, match="no chat_data chosen"):
        run(compose_finetune(base))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):  # as under @hydra.main: its config sources
        with pytest.raises(ValueError, match=r"pass chat_data=NAME \(danube_dpo, danube_sft, messages, .*ultrachat\)"):
            run(compose("finetune", overrides=base))
    with pytest.raises(ValueError, match="format='metamath' is not dpo data"):
        run(compose_finetune(base + ["loss=dpo", "chat_data=metamathqa",
                                     f"chat_data.sources.metamathqa.path={chat_files['metamath']}"]))
    with pytest.raises(FileNotFoundError, match="chat_data.sources.openorca.path=.*no such file or directory"):
        run(compose_finetune(base + ["chat_data=openorca", f"chat_data.sources.openorca.path={tmp_path / 'nope'}"]))
    with pytest.raises(ValueError, match="chat_data.sources.openorca: unknown key.s. splt; allowed: path, hub, split"):
        run(compose_finetune(base + ["chat_data=openorca", "+chat_data.sources.openorca.splt=train"]))
    for bad, message in (("train.threads=0", "train.threads=0 must be >= 1"),
                         ("train.deterministic=sometimes", "train.deterministic='sometimes'; allowed: auto, true, false")):
        with pytest.raises(ValueError, match=message):
            run(compose_finetune(base + ["chat_data=metamathqa", bad,
                                         f"chat_data.sources.metamathqa.path={chat_files['metamath']}"]))
    with pytest.raises(ValueError, match="train.val_fraction=1.5: must be in"):
        run(compose_finetune(base + ["chat_data=metamathqa", "train.val_fraction=1.5",
                                     f"chat_data.sources.metamathqa.path={chat_files['metamath']}"]))
    with pytest.raises(ValueError, match="truncation='cut'"):
        run(compose_finetune(base + ["chat_data=metamathqa", "train.truncation=cut",
                                     f"chat_data.sources.metamathqa.path={chat_files['metamath']}"]))
    assert not (tmp_path / "x").exists()


def test_experiments_compose_with_report_hyperparameters():
    sft = compose_finetune(["experiment=danube_chat_sft", "model_dir=/base"])
    assert (sft.loss.name, sft.optim.lr, sft.train.batch_size, sft.train.max_seq_len) == ("sft", 1e-5, 8, 16384)
    assert sft.trainer.devices == 8 and sft.precision.trainer_precision == "bf16-mixed"
    assert sorted(sft.chat_data.sources) == ["metamathqa", "oasst2", "openorca", "ultrachat"]
    dpo1 = compose_finetune(["experiment=danube_chat_dpo1"])
    assert (dpo1.loss.name, dpo1.loss.beta, dpo1.loss.lora.r, dpo1.loss.lora.alpha, dpo1.train.batch_size,
            dpo1.optim.lr) == ("dpo", 0.2, 4, 16, 2, 1e-5)
    assert dpo1.model_dir.endswith("danube_chat_sft/model")
    dpo2 = compose_finetune(["experiment=danube_chat_dpo2"])
    assert dpo2.optim.lr == 3e-6 and dpo2.model_dir.endswith("danube_chat_dpo1/model")
    assert list(dpo2.chat_data.sources) == ["oasst2_pairs"]
    assert compose_finetune(["experiment=danube_chat_sft", "trainer=cpu"]).trainer.accelerator == "cpu"


def hf_logits_match(hf_dir, model_dir, tok):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    text = "<|prompt|>What is the file number 3?</s><|answer|>"
    ids = hf_tok(text)["input_ids"]
    from danube.data.chat import encode_chat_prompt

    assert ids == encode_chat_prompt(tok, [{"role": "user", "content": "What is the file number 3?"}])
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits, load_model(model_dir)(torch.tensor([ids])),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_report_chain_sft_dpo1_merge_dpo2_export(tiny_model_dir, tmp_path):
    """The three experiments end to end on local copies of the Hub datasets; every output exports to Hugging Face."""
    from danube.cli import main
    from danube.data.preference import read_pairs
    from tests.chat.hub_layouts import local_copy

    hub = {name: local_copy(tmp_path / "hub", hub_id) for name, hub_id in [
        ("openorca", "Open-Orca/OpenOrca"), ("metamathqa", "meta-math/MetaMathQA"),
        ("ultrachat", "HuggingFaceH4/ultrachat_200k"), ("oasst2", "OpenAssistant/oasst2"),
        ("ultrafeedback", "HuggingFaceH4/ultrafeedback_binarized"), ("orca_dpo", "Intel/orca_dpo_pairs"),
        ("distilabel_math", "argilla/distilabel-math-preference-dpo")]}
    runs = tmp_path / "runs"
    common = CPU + [f"paths.runs_dir={runs}", "train.max_steps=3"]
    sft = run(compose_finetune(common + [
        "experiment=danube_chat_sft", "trainer=cpu", "precision=fp32", f"model_dir={tiny_model_dir}",
        "train.activation_checkpointing=false", "train.max_seq_len=256",
        *(f"chat_data.sources.{name}.path={hub[name]}" for name in ("openorca", "metamathqa", "ultrachat", "oasst2")),
    ]))
    assert sft.model_dir == runs / "danube_chat_sft" / "model" and sft.data_counts["samples"] == 46
    dpo1 = run(compose_finetune(common + [
        "experiment=danube_chat_dpo1", "trainer=cpu", "precision=fp32", "train.max_seq_len=256",
        *(f"chat_data.sources.{name}.path={hub[name]}" for name in ("ultrafeedback", "orca_dpo", "distilabel_math")),
    ]))
    assert dpo1.data_counts["pairs"] == 36
    assert json.loads((dpo1.adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        sft.model_dir.resolve())
    # `danube merge-lora` gives the same model the run merged at its end.
    assert main(["merge-lora", str(dpo1.adapter_dir), str(tmp_path / "merged")]) == 0
    a, b = load_model(dpo1.model_dir).state_dict(), load_model(tmp_path / "merged").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in load_model(sft.model_dir).state_dict().items())
    dpo2 = run(compose_finetune(common + [
        "experiment=danube_chat_dpo2", "trainer=cpu", "precision=fp32", "train.max_seq_len=256",
        f"chat_data.sources.oasst2_pairs.path={hub['oasst2']}",
    ]))
    # DPO 2 reads the pairs `danube oasst2-pairs` writes from the same rows.
    pairs = tmp_path / "oasst2_pairs_en.jsonl"
    assert main(["oasst2-pairs", str(hub["oasst2"]), str(pairs), "--lang", "en"]) == 0
    assert dpo2.data_counts["pairs"] == len(read_pairs(pairs, "pairs")) == 8
    # DPO 2's reference (the base its adapter sits on) is the merged DPO 1 model.
    assert json.loads((dpo2.adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        dpo1.model_dir.resolve())
    tok = Tokenizer(tiny_model_dir)
    for i, result in enumerate((sft, dpo1, dpo2)):  # in-process: the README's chain test runs `danube` as a command
        out = tmp_path / f"hf{i}"
        assert main(["export-hf", str(result.model_dir), str(out)]) == 0
        hf_logits_match(out, result.model_dir, tok)


def test_a_second_run_never_replaces_its_input_or_a_finished_run(tiny_model_dir, chat_files, tmp_path):
    """The default name=finetune_dpo made DPO 2 (model_dir=runs/finetune_dpo/model) overwrite DPO 1, its own input."""
    base = CPU + ["loss=dpo", "chat_data=pref_pairs", f"chat_data.sources.pairs.path={chat_files['pairs']}",
                  "train.max_steps=1", f"paths.runs_dir={tmp_path}"]
    first = run(compose_finetune(base + [f"model_dir={tiny_model_dir}"]))
    assert first.run_dir == tmp_path / "finetune_dpo"
    weights = (first.model_dir / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="lies inside this run's directory .*name=NAME"):
        run(compose_finetune(base + [f"model_dir={first.model_dir}"]))
    with pytest.raises(FileExistsError, match="already holds a fine-tuned model .*overwrite=true"):
        run(compose_finetune(base + [f"model_dir={tiny_model_dir}"]))
    assert (first.model_dir / "model.safetensors").read_bytes() == weights
    second = run(compose_finetune(base + [f"model_dir={first.model_dir}", "name=dpo2"]))
    assert second.run_dir == tmp_path / "dpo2" and len(list((tmp_path / "finetune_dpo" / "history").glob("*"))) == 1


@pytest.mark.slow
def test_slurm_s_warning_stops_fine_tuning_at_a_step_and_requeues_it_to_start_over(tiny_model_dir, chat_files,
                                                                                     tmp_path):
    """SIGUSR1 to the process group (scancel --signal=USR1, sbatch --signal=USR1@N), loader workers included.

    Fine-tuning keeps no checkpoint: it stops at the next optimizer step with exit 138, writes no
    model, and rank zero asks SLURM to requeue the job (here a stand-in scontrol), which starts it over.
    """
    import os
    import signal
    import time

    calls = tmp_path / "calls"
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n'
                        'if [ "$1" = show ]; then echo "JobId=$4 JobName=x Requeue=1 Restarts=0"; fi\n')
    scontrol.chmod(0o755)
    env = {**os.environ, "PATH": f"{scontrol.parent}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "PYTHONUNBUFFERED": "1"}
    run_dir = tmp_path / "sft"
    cmd = [sys.executable, "finetune.py", *CPU, f"model_dir={tiny_model_dir}", "chat_data=messages",
           f"chat_data.sources.messages.path={chat_files['messages']}", f"run_dir={run_dir}", "train.batch_size=2",
           "train.micro_batch_size=1", "train.epochs=50", "train.num_workers=1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while not any((run_dir / "tensorboard").rglob("events.out.tfevents.*")):
        assert proc.poll() is None and time.monotonic() < deadline, "fine-tuning did not start"
        time.sleep(0.2)
    time.sleep(2.0)
    os.killpg(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 138, out[-2000:]
    assert "stopped by SIGUSR1 at optimizer step" in out and "fine-tuning keeps no checkpoint" in out
    assert "SLURM job 4242 requeued: it starts over when it starts again" in out
    assert "Traceback" not in out and "exited unexpectedly" not in out
    assert calls.read_text().splitlines()[-1] == "requeue 4242"
    assert not (run_dir / "model").exists() and not (run_dir / "metrics.json").exists()
