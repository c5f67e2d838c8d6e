"""`danube chat-sample`: files the project's own readers accept, the same every time, never written over silently."""

import json
import math

import pytest

from danube.cli import main
from danube.data.chat_sample import FILES, topics
from danube.data.oasst2 import best_path_conversations, preference_pairs, read_messages
from danube.data.preference import read_pairs
from danube.data.sft import read_conversations


def test_sample_files_read_as_sft_preference_and_oasst2_data(tmp_path, capsys):
    assert main(["chat-sample", str(tmp_path / "chat")]) == 0
    d = tmp_path / "chat"
    printed = capsys.readouterr().out
    for name in FILES[:3]:
        assert f"wrote {d / name}" in printed
    n = len(topics())
    assert n >= 70  # pydoc's help topics with prose (CPython 3.11+: 76)

    convs = read_conversations(d / "messages.jsonl", "messages")
    assert len(convs) == 4 * n
    assert any(len(c) > 2 for c in convs) and any(m["role"] == "system" for c in convs for m in c)
    assert all(c[-1]["role"] == "assistant" and c[-1]["content"].endswith((".", "!", "?")) for c in convs)

    pairs = read_pairs(d / "pairs.jsonl", "pairs")
    assert len(pairs) == 2 * n and all(p.chosen != p.rejected for p in pairs)

    messages = read_messages(d / "oasst2_train.jsonl")
    sft, skipped = best_path_conversations(messages, lang="en")
    assert skipped["other language"] > 0 and len(sft) + skipped["other language"] == n
    en_pairs, stats = preference_pairs(messages, lang="en")
    assert stats.dropped_replies["deleted"] > 0 and stats.dropped_replies["unranked"] > 0
    assert stats.dropped_replies["other language"] > 0
    assert len(en_pairs) > n  # first turns and follow-ups
    assert all(p["chosen_rank"] == 0 and p["rejected_rank"] > 0 for p in en_pairs)

    docs = json.loads((d / "tasks" / "chat_sample_mc.json").read_text())
    assert len(docs) == n and {doc["label"] for doc in docs} == {0, 1, 2, 3}
    trained = {m["content"] for c in convs for m in c if m["role"] == "user"}
    assert not trained & {doc["question"] for doc in docs}  # held-out phrasing
    assert str((d / "tasks" / "chat_sample_mc.json").resolve()) in (d / "tasks" / "chat_sample_mc.yaml").read_text()


def test_sample_is_deterministic_and_refuses_to_overwrite(tmp_path, capsys):
    assert main(["chat-sample", str(tmp_path / "a")]) == 0
    assert main(["chat-sample", str(tmp_path / "b")]) == 0
    for name in FILES[:3]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    before = (tmp_path / "a" / "messages.jsonl").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["chat-sample", str(tmp_path / "a")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "a" / "messages.jsonl").stat().st_mtime_ns == before
    assert main(["chat-sample", str(tmp_path / "a"), "--overwrite"]) == 0


def readme_chain() -> list[str]:
    """The shell lines of the README's chat-chain block, continuation lines joined."""
    from tests.conftest import REPO

    text = (REPO / "README.md").read_text()
    block = text.split("<!-- chat-chain:", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def to_argv(command: str) -> tuple[list[str], str | None]:
    """A README line as the argv this interpreter runs (python X.py / danube ...) and the text piped into it."""
    import shlex
    import sys

    from tests.conftest import REPO

    stdin = None
    if " | " in command:
        echo, command = command.split(" | ")
        stdin = shlex.split(echo)[1] + "\n"
    words = shlex.split(command)
    if words[0] == "danube":
        return [sys.executable, "-m", "danube.cli", *words[1:]], stdin
    assert words[0] == "python" and words[1].endswith(".py"), command
    return [sys.executable, str(REPO / words[1]), *words[2:]], stdin


@pytest.mark.slow
def test_readme_chat_chain_runs_as_written(tmp_path, sp_model):
    """SFT -> DPO -> Oasst2 pairs -> DPO 2 -> evaluate -> chat, the README's lines, on a tiny model."""
    import os
    import subprocess

    import torch

    from danube.model import DanubeConfig, build_model
    from danube.model.io import save_model_dir

    torch.manual_seed(0)
    tiny = DanubeConfig(vocab_size=1000, n_embd=64, intermediate_size=128, n_layer=2, n_head=4, n_kv_head=2,
                        sliding_window=48, max_seq_len=512)
    save_model_dir(build_model(tiny), tmp_path / "runs" / "tiny" / "seq256" / "model", tokenizer=sp_model)
    env = {**os.environ, "DANUBE_HOME": str(tmp_path)}  # runs/ and data/ of the commands: here
    # The fine-tuning runs as written (their held-out metrics are checked below); fewer
    # documents for the evaluation, whose wiring is what is checked.
    extra = {"evaluate.py": ["limit=12"]}
    commands = readme_chain()
    assert len(commands) == 7 and commands[0] == "danube chat-sample data/chat"
    outputs = []
    for command in commands:
        argv, stdin = to_argv(command)
        argv += next((v for k, v in extra.items() if argv[1].endswith(k)), [])
        proc = subprocess.run(argv, cwd=tmp_path, env=env, input=stdin, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
        for noise in ("Traceback", "torchao", "Detected no triton", "register_constant", "Could not find a config file",
                      "base_model_name_or_path"):  # library chatter about optional kernels, not about the run
            assert noise not in proc.stderr, f"{command}: {noise}"
        outputs.append(proc.stdout)
    for run in ("chat_sft", "chat_dpo1", "chat_dpo2"):
        assert (tmp_path / "runs" / run / "model" / "model.safetensors").is_file(), run
    # Each stage does its job on held-out data, as the README says a user will see.
    record = {run: json.loads((tmp_path / "runs" / run / "metrics.json").read_text())
              for run in ("chat_sft", "chat_dpo1", "chat_dpo2")}
    sft = record["chat_sft"]  # README: 6.91 -> 5.63 on this model
    assert sft["metrics"]["val/loss"] < sft["start"]["val/loss"] - 0.5, sft
    for run in ("chat_dpo1", "chat_dpo2"):
        metrics = record[run]["metrics"]
        assert metrics["val/rewards/accuracies"] > 0.5 and metrics["val/loss"] < math.log(2), (run, metrics)
    assert (tmp_path / "runs" / "chat_dpo1" / "adapter" / "adapter_config.json").is_file()
    assert "pairs written:" in outputs[3]
    table = (tmp_path / "runs" / "eval" / "chat_dpo2-tasks.md").read_text()
    assert "chat_sample_mc" in table and "acc" in table and "±" in table
    answer = [line for line in outputs[-1].splitlines() if line.startswith("assistant> ")]
    assert len(answer) == 1 and len(answer[0]) > len("assistant> ")
