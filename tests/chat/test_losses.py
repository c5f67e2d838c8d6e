"""Packing isolation, loss normalisation across micro-batches, the DPO loss, LoRA and merging."""

import math

import pytest
import torch

from danube.data.chat import encode_chat_prompt
from danube.data.finetune import StepBatches, step_plan
from danube.data.preference import Pair, collate_pairs, tokenize_pairs
from danube.data.sft import collate, pack_samples, tokenize_conversation
from danube.data.tokenizer import Tokenizer
from danube.lit.dpo import DPOModule
from danube.lit.sft import SFTModule
from danube.lora import add_lora, merge_lora
from danube.losses import IGNORE, dpo_loss, sequence_logps
from danube.model import build_model
from tests.chat.conftest import qa, tiny_cfg

OPTIM = {"lr": 1e-3}


def samples(tok, n=6):
    out = []
    for i in range(n):
        q, a = qa(i)
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a * (1 + i % 3)}]
        out.append(tokenize_conversation(tok, msgs))
    return out


def test_packed_samples_score_as_if_alone(sp_model):
    tok = Tokenizer(sp_model)
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    ss = samples(tok, 4)
    rows = pack_samples(ss, seq_len=200)
    assert len(rows) < len(ss)  # several samples share a row
    batch = collate(rows, tok.pad_id)
    with torch.no_grad():
        packed = model(batch["input_ids"], batch["position_ids"], batch["segment_ids"])
        r, start = 0, 0
        for s in ss:
            n = len(s.input_ids)
            if start + n > len(rows[r].input_ids):
                r, start = r + 1, 0
            alone = model(torch.tensor([s.input_ids]))[0]
            torch.testing.assert_close(packed[r, start: start + n], alone, atol=1e-5, rtol=1e-5)
            assert batch["position_ids"][r, start] == 0 and batch["labels"][r, start] == IGNORE
            assert batch["labels"][r, start: start + n].tolist()[1:] == s.labels[1:]
            start += n


def test_accumulated_gradient_equals_one_big_batch(sp_model):
    """Micro-batches of very different answer lengths: summed shares == the big batch's token mean."""
    tok = Tokenizer(sp_model)
    torch.manual_seed(0)
    items = samples(tok, 6)
    module = SFTModule(build_model(tiny_cfg()), OPTIM, total_steps=1)
    plan = step_plan(len(items), micro_batch_size=2, accumulate=3, world_size=1, epochs=1, seed=0)
    assert len(plan) == 1
    for batch in StepBatches(items, plan, 0, lambda xs: collate(xs, tok.pad_id)):
        module.micro_batch_loss(batch)[0].backward()
    accumulated = [p.grad.clone() for p in module.model.parameters()]
    module.model.zero_grad()
    big = collate(items, tok.pad_id)
    big["step_loss_tokens"] = torch.tensor(sum(s.loss_tokens for s in items))
    module.micro_batch_loss(big)[0].backward()
    for a, b in zip(accumulated, (p.grad for p in module.model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_step_plan_splits_steps_over_ranks_and_counts_every_rank():
    plan = step_plan(10, micro_batch_size=1, accumulate=2, world_size=2, epochs=1, seed=0, shuffle=False)
    assert plan[0] == [[[0], [2]], [[1], [3]]]  # step 0: rank 0 gets 0 and 2, rank 1 gets 1 and 3
    assert len(plan) == 3 and plan[-1] == [[[8]], [[9]]]

    class Item:
        def __init__(self, n):
            self.loss_tokens = n
    items = [Item(i) for i in range(10)]
    rank1 = StepBatches(items, plan, 1, lambda xs: {})
    assert [b[1] for b in rank1.batches] == [0 + 1 + 2 + 3] * 2 + [4 + 5 + 6 + 7] * 2 + [17]


def test_dpo_loss_matches_a_hand_computation():
    pc, pr = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0])
    rc, rr = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.2)
    # example 0: chosen ratio +1, rejected -1 -> margin 2 -> 0.4; example 1: 0 and +1 -> -0.2
    expected = [-math.log(1 / (1 + math.exp(-0.4))), -math.log(1 / (1 + math.exp(0.2)))]
    torch.testing.assert_close(losses, torch.tensor(expected))
    torch.testing.assert_close(cr, torch.tensor([0.2, 0.0]))
    torch.testing.assert_close(rj, torch.tensor([-0.2, 0.2]))


def pair_batch(tok, n=4):
    pairs = [Pair([{"role": "user", "content": qa(i)[0]}], qa(i)[1], "No idea, sorry.") for i in range(n)]
    items, _ = tokenize_pairs(tok, pairs, max_seq_len=256)
    return items, collate_pairs(items, tok.pad_id)


def test_dpo_step_zero_loss_is_ln2_and_logps_cover_completions_only(sp_model):
    tok = Tokenizer(sp_model)
    torch.manual_seed(0)
    base = build_model(tiny_cfg())
    module = DPOModule(add_lora(base), OPTIM, total_steps=1, beta=0.2)
    module.train()  # LoRA dropout active: still policy == reference while lora_B is zero
    items, batch = pair_batch(tok)
    loss, metrics = module.pair_losses(batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/chosen"].item() == 0 and metrics["rewards/accuracies"].item() == 0
    # Chosen rows first, then rejected; the prompt is labelled -100.
    prompt = encode_chat_prompt(tok, [{"role": "user", "content": qa(0)[0]}])
    first = items[0]
    assert first.chosen_start == first.rejected_start == len(prompt)  # no piece spans marker and reply here
    assert batch["input_ids"][0, : len(prompt)].tolist() == prompt == first.chosen[: len(prompt)]
    assert (batch["labels"][0, : len(prompt)] == IGNORE).all()
    completion = first.rejected[len(prompt):]
    assert completion[-1] == tok.eos_id
    assert batch["labels"][4, len(prompt): len(first.rejected)].tolist() == completion
    with torch.no_grad():
        logits = base(batch["input_ids"][:1, : len(first.chosen)])
        logp = torch.log_softmax(logits[0, :-1], -1)
        by_hand = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(first.chosen[len(prompt):]))
    assert metrics["logps/chosen"].item() == pytest.approx(
        sequence_logps(module.model(batch["input_ids"]), batch["labels"])[:4].mean().item(), abs=1e-4)
    assert sequence_logps(logits, batch["labels"][:1, : logits.shape[1]]).item() == pytest.approx(by_hand.item(), abs=1e-4)


def test_lora_targets_the_block_projections_only_and_merges_exactly(sp_model):
    torch.manual_seed(0)
    wrapped = add_lora(build_model(tiny_cfg()))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    wrapped.eval()
    ids = torch.randint(0, 1000, (2, 20))
    with torch.no_grad():
        adapted = wrapped(ids)
        with wrapped.disable_adapter():
            reference = wrapped(ids)
        assert (adapted - reference).abs().max() > 1e-3  # the adapters do change the output
        merged = merge_lora(wrapped)
        torch.testing.assert_close(merged(ids), adapted, atol=1e-5, rtol=1e-5)
    assert set(merged.state_dict()) == set(build_model(tiny_cfg(), device="meta").state_dict())
    with pytest.raises(ValueError, match="lm_head is never adapted"):
        add_lora(build_model(tiny_cfg()), target_modules=["q_proj", "lm_head"])
