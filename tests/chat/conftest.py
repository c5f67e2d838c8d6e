"""Chat fixtures: a tiny pretrained model directory and a few dozen records in every shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from danube.model import DanubeConfig, build_model
from danube.model.io import save_model_dir
from tests.conftest import CONF

TOPICS = ["the file", "a module", "the loop", "an object", "the class", "a string", "the list", "a function"]


def tiny_cfg() -> DanubeConfig:
    return DanubeConfig(vocab_size=1000, n_embd=64, intermediate_size=128, n_layer=2, n_head=4, n_kv_head=2,
                        sliding_window=48, max_seq_len=512)


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path_factory, monkeypatch):
    """No network in tests, and a datasets cache of the session's own (never ~/.cache)."""
    import datasets
    import huggingface_hub

    cache = tmp_path_factory.getbasetemp() / "hf_datasets_cache"
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, sp_model) -> Path:
    """A random tiny model with the sp_model tokenizer, saved as a danube model directory."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    return save_model_dir(model, tmp_path_factory.mktemp("base") / "model", tokenizer=sp_model)


def qa(i: int) -> tuple[str, str]:
    t = TOPICS[i % len(TOPICS)]
    return f"What is {t} number {i}?", f"It is {t} that holds value {i % 10}."


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sft_records(fmt: str, n: int = 30) -> list[dict]:
    out = []
    for i in range(n):
        q, a = qa(i)
        if fmt in ("messages", "ultrachat"):
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            if i % 3 == 0:  # multi-turn
                msgs += [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because of the type."}]
            out.append({"messages": msgs, "prompt": q} if fmt == "ultrachat" else {"messages": msgs})
        elif fmt == "sharegpt":
            turns = ([{"from": "system", "value": "Be brief."}] if i % 2 else []) + [
                {"from": "human", "value": q}, {"from": "gpt", "value": a}]
            out.append({"conversations": turns})
        elif fmt == "openorca":
            out.append({"id": f"o{i}", "system_prompt": "Be brief." if i % 2 else "", "question": q, "response": a})
        elif fmt == "metamath":
            out.append({"query": q, "response": a, "type": "GSM_Rephrased"})
    return out


def oasst2_rows(n_trees: int = 30) -> list[dict]:
    rows = []
    for i in range(n_trees):
        q, a = qa(i)
        root = f"t{i}"
        rows.append({"message_id": root, "parent_id": None, "role": "prompter", "text": q, "rank": None,
                     "lang": "en", "deleted": False, "message_tree_id": root})
        for r, text in enumerate([a, f"Maybe {TOPICS[(i + 1) % 8]}.", "I do not know."]):
            rows.append({"message_id": f"{root}a{r}", "parent_id": root, "role": "assistant", "text": text,
                         "rank": r, "lang": "en", "deleted": False, "message_tree_id": root})
    return rows


def pref_records(fmt: str, n: int = 30) -> list[dict]:
    """Clearly separable pairs: the chosen reply always answers, the rejected one never does."""
    out = []
    for i in range(n):
        q, a = qa(i)
        chosen, rejected = a, "No idea, sorry."
        if fmt == "ultrafeedback":
            out.append({"prompt": q, "prompt_id": str(i),
                        "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": rejected}],
                        "score_chosen": 8.0, "score_rejected": 2.0})
        elif fmt == "orca_dpo":
            out.append({"system": "Be brief." if i % 2 else "", "question": q, "chosen": chosen, "rejected": rejected})
        elif fmt == "distilabel_math":
            out.append({"instruction": q, "chosen_response": chosen, "rejected_response": rejected})
        elif fmt == "pairs":
            out.append({"prompt": [{"role": "user", "content": q}], "chosen": chosen, "rejected": rejected})
    return out


@pytest.fixture
def chat_files(tmp_path) -> dict[str, Path]:
    files = {fmt: write_jsonl(tmp_path / f"{fmt}.jsonl", sft_records(fmt))
             for fmt in ("messages", "ultrachat", "sharegpt", "openorca", "metamath")}
    files["oasst2"] = write_jsonl(tmp_path / "oasst2.jsonl", oasst2_rows())
    for fmt in ("ultrafeedback", "orca_dpo", "distilabel_math", "pairs"):
        files[fmt] = write_jsonl(tmp_path / f"pref_{fmt}.jsonl", pref_records(fmt))
    return files


def compose_finetune(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("finetune", overrides=overrides)
