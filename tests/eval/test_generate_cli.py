"""`danube generate MODEL PROMPT`: what generate() gives, on danube and Hugging Face directories alike."""

import io

import pytest
import torch

from danube.cli import main
from danube.eval.console import generate_main
from danube.eval.inference import load_for_eval
from danube.model.generate import SamplingParams, generate

PROMPT = "The statement is used to"


def cli(*argv) -> str:
    out = io.StringIO()
    assert generate_main(list(argv), stdout=out) == 0
    return out.getvalue()


def expected(model_dir, params, seed=0, n=1) -> list[str]:
    model, tok = load_for_eval(model_dir, device="cpu")
    params = SamplingParams(**{**params.__dict__, "stop_token_ids": (tok.eos_id,)})
    gen = torch.Generator().manual_seed(seed)
    return [PROMPT + tok.decode(out) for out in generate(model, [tok.encode(PROMPT, bos=True)] * n, params, generator=gen)]


def test_greedy_continuation_is_generates_own_on_both_directory_kinds(model_dirs):
    danube_dir, hf_dir = model_dirs
    text = cli(str(danube_dir), PROMPT, "--max-new-tokens", "12", "--device", "cpu")
    assert text == expected(danube_dir, SamplingParams(max_new_tokens=12, repetition_penalty=1.1))[0] + "\n"  # the export's default
    assert len(text) > len(PROMPT) + 1
    assert cli(str(hf_dir), PROMPT, "--max-new-tokens", "12", "--device", "cpu") == text


def test_sampling_knobs_are_passed_through_and_seeded(model_dirs):
    danube_dir = model_dirs[0]
    args = [str(danube_dir), PROMPT, "--max-new-tokens", "10", "--temperature", "1.2", "--top-k", "50",
            "--top-p", "0.95", "--repetition-penalty", "1.3", "--num-samples", "3", "--device", "cpu"]
    out = cli(*args, "--seed", "7")
    samples = [s.strip("\n") for s in out.split("--- sample ")[1:]]
    assert [s.split(" ---\n")[0] for s in samples] == ["1", "2", "3"]
    texts = [s.split(" ---\n", 1)[1] for s in samples]
    params = SamplingParams(max_new_tokens=10, temperature=1.2, top_k=50, top_p=0.95, repetition_penalty=1.3)
    assert texts == expected(danube_dir, params, seed=7, n=3)
    assert len(set(texts)) > 1  # sampled, not greedy
    assert cli(*args, "--seed", "7") == out  # the seed fixes the draw
    assert cli(*args, "--seed", "8") != out


def test_bad_values_fail_before_the_model_loads(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    assert main(["generate", missing, "x", "--top-p", "0"]) == 1
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
    assert main(["generate", missing, "x", "--num-samples", "2"]) == 1
    assert "needs sampling" in capsys.readouterr().err
    assert main(["generate", missing, "x"]) == 1
    assert "no such directory" in capsys.readouterr().err
