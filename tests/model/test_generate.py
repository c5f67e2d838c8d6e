"""KV-cached generation against transformers' ``generate`` on the exported model."""

import pytest
import torch

from danube.hf import to_hf
from danube.model import build_model
from danube.model.generate import SamplingParams, filter_top_k_top_p, generate


@pytest.fixture
def model(micro_cfg):
    torch.manual_seed(0)
    return build_model(micro_cfg).eval()


@pytest.fixture
def hf_model(model, tmp_path):
    from transformers import AutoModelForCausalLM

    to_hf(model, tmp_path / "hf")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()


def hf_greedy(hf_model, prompt, max_new_tokens, **kwargs):
    out = hf_model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0, **kwargs,
    )
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_batched_greedy_equals_transformers_past_the_window(model, hf_model, micro_cfg, penalty):
    g = torch.Generator().manual_seed(1)
    # window 7: every prompt is longer, and of a different length (left padding in our batch)
    prompts = [torch.randint(3, micro_cfg.vocab_size, (n,), generator=g).tolist() for n in (19, 11, 26)]
    ours = generate(model, prompts, SamplingParams(max_new_tokens=12, repetition_penalty=penalty))
    for prompt, got in zip(prompts, ours):
        assert got == hf_greedy(hf_model, prompt, 12, repetition_penalty=penalty)


def test_stop_tokens_and_strings_end_rows_independently(model, micro_cfg):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, micro_cfg.vocab_size, (n,), generator=g).tolist() for n in (9, 14)]
    free = generate(model, prompts, SamplingParams(max_new_tokens=10))
    stop = free[0][3]
    stopped = generate(model, prompts, SamplingParams(max_new_tokens=10, stop_token_ids=(stop,)))
    assert stopped[0] == free[0][: free[0].index(stop)]
    assert stopped[1] == free[1][: free[1].index(stop)] if stop in free[1] else stopped[1] == free[1]
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    marker = f" {free[1][2]} {free[1][3]}"
    by_text = generate(model, prompts[1:], SamplingParams(max_new_tokens=10, stop_strings=(marker,)), decode=decode)
    assert by_text[0] == free[1][:4]  # stops as soon as the text contains the marker
    # The ids are not cut at the stop string: the caller cuts the text (DanubeLM through lm-eval's own postprocessing).
    assert decode(by_text[0]).endswith(marker)


def test_sampling_is_seeded_and_filters_like_transformers(model, micro_cfg):
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13]] * 2
    p = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9)
    a = generate(model, prompts, p, generator=torch.Generator().manual_seed(0))
    b = generate(model, prompts, p, generator=torch.Generator().manual_seed(0))
    assert a == b and all(0 <= t < micro_cfg.vocab_size for t in a[0])
    # top-k 1 samples the argmax whatever the temperature
    assert generate(model, prompts, SamplingParams(max_new_tokens=8, temperature=5.0, top_k=1)) == generate(
        model, prompts, SamplingParams(max_new_tokens=8)
    )
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    ref = TopPLogitsWarper(0.7)(None, TopKLogitsWarper(12)(None, logits.clone()))
    assert torch.equal(filter_top_k_top_p(logits, 12, 0.7), ref)


def test_bad_sampling_values_fail_early():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
