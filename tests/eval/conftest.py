"""Tiny evaluation fixtures: a random model with a trained tokenizer, in both directory kinds,
and small local lm-eval tasks written as YAML + JSON."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from danube.data.tokenizer import Tokenizer
from danube.hf import to_hf
from danube.model import DanubeConfig, build_model
from danube.model.io import save_model_dir
from tests.conftest import corpus_lines


@pytest.fixture(scope="session")
def model_dirs(sp_model, tmp_path_factory) -> tuple[Path, Path]:
    """(danube model directory, exported Hugging Face directory) of one random model.

    The window (16) is shorter than the task prompts, so it matters.
    """
    cfg = DanubeConfig(
        vocab_size=1000, n_embd=64, intermediate_size=128, n_layer=2, n_head=4, n_kv_head=2,
        sliding_window=16, max_seq_len=256,
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # larger weights than Llama's init: sharper, less tie-prone logits
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4)
        # Greedy text then never holds byte-fallback pieces (which SentencePiece and
        # `tokenizers` render differently when they are not valid UTF-8).
        sp = Tokenizer(sp_model)
        byte_ids = [i for i in range(sp.vocab_size) if sp.id_to_piece(i).startswith("<0x")]
        model.lm_head.weight[byte_ids] = 0
    root = tmp_path_factory.mktemp("models")
    save_model_dir(model, root / "danube", tokenizer=sp_model)
    to_hf(model, root / "hf", tokenizer=sp_model)
    return root / "danube", root / "hf"


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = [" ".join(line.split()[:12]) for line in corpus_lines(60)]
    return rng.sample(lines, n)


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    """Three local tasks: multiple choice, generation, rolling log-likelihood."""
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    questions = _sentences(32, 1)
    words = [w.strip(".,:;()") for w in " ".join(_sentences(40, 2)).split() if w.isalpha()]
    mc = []
    for q in questions:
        choices = [" ".join(rng.sample(words, rng.randint(1, 4))) for _ in range(4)]
        mc.append({"question": q, "choices": choices, "label": rng.randrange(4)})
    (root / "toy_mc.json").write_text(json.dumps(mc))
    (root / "toy_gen.json").write_text(json.dumps([{"question": q, "answer": "yes"} for q in questions[:6]]))
    (root / "toy_text.json").write_text(json.dumps([{"text": t} for t in _sentences(5, 3)]))
    data = lambda name: f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / name}\ntest_split: test\n"  # noqa: E731
    (root / "toy_mc.yaml").write_text(
        "task: toy_mc\n" + data("toy_mc.json") + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (root / "toy_gen.yaml").write_text(
        "task: toy_gen\n" + data("toy_gen.json") + "output_type: generate_until\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: answer\n'
        "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  do_sample: false\n  max_gen_toks: 12\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    (root / "toy_text.yaml").write_text(
        "task: toy_text\n" + data("toy_text.json") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    return root
