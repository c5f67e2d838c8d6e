"""The H2O-Danube chat template as text and ids: pinned string, prefix property, masks."""

import pytest

from danube.data.chat import encode_chat_prompt, encode_conversation, render_chat, render_chat_prompt
from danube.data.sft import tokenize_conversation
from danube.data.tokenizer import Tokenizer
from danube.losses import IGNORE

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a list?"},
    {"role": "assistant", "content": "A mutable sequence."},
    {"role": "user", "content": "And a tuple?"},
    {"role": "assistant", "content": "An immutable one."},
]


def test_rendered_text_is_the_released_format():
    assert render_chat(CONV) == (
        "<|system|>Be brief.</s><|prompt|>What is a list?</s><|answer|>A mutable sequence.</s>"
        "<|prompt|>And a tuple?</s><|answer|>An immutable one.</s>"
    )
    assert render_chat_prompt(CONV[1:2]) == "<|prompt|>What is a list?</s><|answer|>"
    with pytest.raises(ValueError, match="must end with a message of role .user."):
        render_chat_prompt(CONV)
    with pytest.raises(ValueError, match="system message may only come first"):
        render_chat(CONV[1:2] + CONV[:1])


def test_prompt_ids_are_a_prefix_of_prompt_plus_answer(sp_model):
    tok = Tokenizer(sp_model)
    for end in (2, 4):  # single turn and the second turn of a conversation with a system turn
        prompt = encode_chat_prompt(tok, CONV[:end])
        full, _ = encode_conversation(tok, CONV[: end + 1])
        assert full[: len(prompt)] == prompt
        assert full[len(prompt):] == tok.encode(CONV[end]["content"]) + [tok.eos_id]
    ids, _ = encode_conversation(tok, CONV)
    assert ids[0] == tok.bos_id
    # "</s>" is the EOS id, never the characters: one EOS per closed turn.
    assert ids.count(tok.eos_id) == len(CONV)
    assert tok.decode(ids).replace(" ", "") == render_chat(CONV).replace("</s>", "").replace(" ", "")


def test_single_turn_prompt_ids_match_the_evaluation_encoder(sp_model):
    from danube.eval.mt_bench import encode_chat

    tok = Tokenizer(sp_model)
    assert encode_chat_prompt(tok, CONV[:2]) == encode_chat(tok, CONV[:2])


def test_labels_cover_assistant_tokens_and_their_eos_only(sp_model):
    tok = Tokenizer(sp_model)
    s = tokenize_conversation(tok, CONV)
    trained = [i for i in s.labels if i != IGNORE]
    expected = []
    for m in CONV:
        if m["role"] == "assistant":
            expected += tok.encode(m["content"]) + [tok.eos_id]
    assert trained == expected
    assert all(lab in (IGNORE, i) for lab, i in zip(s.labels, s.input_ids))
    assert s.labels[0] == IGNORE and s.loss_tokens == len(expected)
