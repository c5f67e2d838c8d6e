"""Every tokenization path against transformers on the exported files: 0 mismatches.

Three real tokenizers: Mistral-7B's (the test asset; dummy prefix, H2O-Danube2's), one
trained here with Llama 2's settings (dummy prefix, H2O-Danube-1.8B's kind), and the
project's own (``danube train-tokenizer``, no dummy prefix). One fixed corpus of hard
strings and conversations goes through ``danube prepare``, SFT and DPO encoding (masks
included), generation prompts (``danube chat``, MT-Bench), the lm-eval adapter, and the
exported Hugging Face tokenizer, fast, ``use_fast=False`` and SentencePiece-backed. The
reference for masks is transformers' own ``return_assistant_tokens_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from danube.data.chat import encode_chat_prompt, hf_chat_template, render_chat, render_chat_prompt
from danube.data.preference import Pair, collate_pairs, tokenize_pairs
from danube.corpus.prepare import prepare
from danube.data.sft import tokenize_conversation
from danube.data.tokenizer import Tokenizer
from danube.hf import to_hf
from danube.losses import IGNORE
from danube.model import DanubeConfig, build_model
from danube.model.io import save_model_dir
from tests.data.conftest import read_stream, split_docs, write_jsonl

TEXTS = [
    "Hello world",
    " leading space",
    "   three leading spaces",
    "trailing  ",
    "   ",
    " ",
    "",
    "\t",
    "tab\tseparated\tvalues\t",
    "line one\nline two\n\n  indented\n",
    "\n\nstarts with newlines",
    "\r\nwindows line\r\n",
    "a  b   c    d     e",
    " " * 15 + "fifteen",
    "digits 1234567890 and 3.14159, 2024-01-31",
    "héllo wörld, naïve café, Ångström",
    "日本語のテキスト、中文，标点。",
    "emoji 🦩 and 🫠 through bytes, 🎉 too",
    "🦩",
    "text right after</s>here",
    "</s>starts with the EOS",
    "ends with the EOS</s>",
    "a</s> b</s>  c</s>\nd",
    "<s>BOS first<s> and inside",
    "<unk> unknown <unk>",
    "<|system|>markers<|prompt|>in<|answer|>text",
    "<|prompt|>Why?</s><|answer|>Because.</s>",
    "▁ a literal metaspace ▁▁",
    "non\u00a0breaking and zero\u200bwidth",
    '"quoted" (parens) [brackets] {braces} <angle>',
    "x",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " leading space question"},
     {"role": "assistant", "content": "  two-space answer"}, {"role": "user", "content": "and</s>inside"},
     {"role": "assistant", "content": "ok</s>then more"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "x"}, {"role": "assistant", "content": '"quoted" start'}],
    [{"role": "user", "content": "(paren"}, {"role": "assistant", "content": "(paren answer)"}],
    [{"role": "user", "content": "日本語?"}, {"role": "assistant", "content": "🦩 emoji first, then 日本語"}],
    [{"role": "user", "content": "digits 123"}, {"role": "assistant", "content": "456\n\n789  "}],
    [{"role": "user", "content": "tab\there"}, {"role": "assistant", "content": "\tindented\n"}],
    [{"role": "user", "content": "<|answer|>a fake marker"}, {"role": "assistant", "content": "<|prompt|>fake too"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": ">> quoted"},
     {"role": "user", "content": "again"}, {"role": "assistant", "content": ".dot first"}],
    [{"role": "user", "content": "ends with a space "}, {"role": "assistant", "content": " starts with a space"}],
    [{"role": "user", "content": "<s>bos"}, {"role": "assistant", "content": "<unk>"}],
    [{"role": "system", "content": "Sys\n"}, {"role": "user", "content": "   "}, {"role": "assistant", "content": "\n"}],
]

# The exported template's rendering, with transformers' {% generation %} marks around what is
# trained: apply_chat_template(..., return_assistant_tokens_mask=True) then gives the reference mask.
MASKED = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ '<|system|>' + m['content'] + eos_token }}"
    "{% elif m['role'] == 'user' %}{{ '<|prompt|>' + m['content'] + eos_token }}"
    "{% else %}{{ '<|answer|>' }}{% if loop.last or not last_only %}{% generation %}{{ m['content'] + eos_token }}"
    "{% endgeneration %}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endif %}{% endfor %}"
)
WHICH = {"mistral": "mistral_model", "llama2_style": "llama2_style_model", "own": "sp_model"}


@dataclass
class Case:
    tok: Tokenizer
    model_dir: Path  # a tiny danube model directory with this tokenizer
    hf_dir: Path  # its `danube export-hf`
    fast: Any
    slow: Any  # AutoTokenizer(use_fast=False)
    sp_backed: Any  # transformers' SentencePiece-backed tokenizer on the same files

    def all_hf(self):
        return {"fast": self.fast, "use_fast=False": self.slow, "sentencepiece": self.sp_backed}


@pytest.fixture(scope="module", params=list(WHICH))
def case(request, tmp_path_factory) -> Case:
    from transformers import AutoTokenizer

    try:  # transformers 5's SentencePiece-backed class; in 4.x the slow LlamaTokenizer is that
        from transformers import SentencePieceBackend
    except ImportError:
        from transformers import LlamaTokenizer as SentencePieceBackend

    tok = Tokenizer(request.getfixturevalue(WHICH[request.param]))
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model = build_model(DanubeConfig(vocab_size=tok.vocab_size, n_embd=16, intermediate_size=32, n_layer=1, n_head=2,
                                     n_kv_head=1, max_seq_len=512))
    save_model_dir(model, root / "model", tokenizer=tok.model_file)
    to_hf(model, root / "hf", tokenizer=tok.model_file)
    return Case(tok, root / "model", root / "hf", AutoTokenizer.from_pretrained(root / "hf"),
                AutoTokenizer.from_pretrained(root / "hf", use_fast=False), SentencePieceBackend.from_pretrained(root / "hf"))


def _ids(x) -> list[int]:
    return list(x["input_ids"] if hasattr(x, "keys") else x)


def test_the_corpus_is_hard_for_every_tokenizer(case):
    ids = [i for t in TEXTS for i in case.tok.encode(t)]
    assert any(case.tok.sp.is_byte(i) for i in ids), "no text goes through byte fallback"
    if case.tok.add_dummy_prefix:  # a text after </s> gets a ▁ of its own
        assert case.tok.encode_with_specials("</s>b") == [case.tok.eos_id] + case.tok.encode("b")
        assert case.tok.id_to_piece(case.tok.encode("b")[0]).startswith("▁")


def test_mistral_ids_are_sentencepiece_s(mistral_model):
    tok = Tokenizer(mistral_model)
    assert tok.add_dummy_prefix and (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    # The examples: what the earlier export got wrong.
    assert tok.encode(" leading space") == [28705, 5374, 2764] and tok.encode("   ") == [260]


def test_text_ids_match_hugging_face_fast_and_slow(case):
    bad = []
    for text in TEXTS:
        data, markup = case.tok.encode(text), case.tok.encode_with_specials(text)
        for name, hf in case.all_hf().items():
            if _ids(hf(text, add_special_tokens=False, split_special_tokens=True)) != data:
                bad.append((name, "as data", text))
            if _ids(hf(text, add_special_tokens=False)) != markup:
                bad.append((name, "as markup", text))
            # transformers' generic SentencePiece class knows no BOS rule (AutoTokenizer never returns it).
            if name != "sentencepiece" and _ids(hf(text)) != [case.tok.bos_id] + markup:
                bad.append((name, "with BOS", text))
    assert bad == []


def test_markup_is_each_stretch_read_alone(case):
    tok = case.tok
    assert tok.encode_with_specials("a</s> b<s><unk>c") == (
        tok.encode("a") + [tok.eos_id] + tok.encode(" b") + [tok.bos_id, tok.sp.unk_id()] + tok.encode("c"))
    for text in TEXTS:
        if not any(p in text for p in tok.special_pieces):
            assert tok.encode_with_specials(text) == tok.encode(text), repr(text)


def test_decoding_matches_hugging_face(case):
    from danube.eval.inference import TextTokenizer

    ours, theirs = TextTokenizer(case.model_dir), TextTokenizer(case.hf_dir)
    for text in TEXTS:
        ids = case.tok.encode(text)
        # A literal ▁ is SentencePiece's own space: it reads back as one, there as here.
        expected = text.replace("▁", " ")
        assert ours.decode(ids) == theirs.decode(ids) == case.fast.decode(ids, skip_special_tokens=True) == expected


def test_prepare_shards_hold_the_ids_of_the_text_as_data(case, tmp_path):
    docs = [t for t in TEXTS if t.strip()]  # prepare skips blank documents
    prepare([write_jsonl(tmp_path / "docs.jsonl", docs)], tmp_path / "shards", case.tok.model_file,
            val_fraction=0.0, num_workers=1)
    got = split_docs(read_stream(tmp_path / "shards" / "train"), case.tok.bos_id, case.tok.eos_id)
    expected = [_ids(case.fast(d, add_special_tokens=False, split_special_tokens=True)) for d in docs]
    assert sorted(got) == sorted(expected)


def _reference(case, messages, last_only=False, **kwargs):
    out = case.fast.apply_chat_template(messages, chat_template=MASKED, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True, last_only=last_only, **kwargs)
    return list(out["input_ids"]), list(out["assistant_masks"])


def test_sft_ids_and_labels_are_the_rendered_conversation_s(case):
    bad = []
    for conv in CONVERSATIONS:
        s = tokenize_conversation(case.tok, conv)
        ids, mask = _reference(case, conv)
        rendered = case.fast.apply_chat_template(conv, tokenize=False)  # the exported template
        assert rendered == case.fast.bos_token + render_chat(conv)
        for name, hf in case.all_hf().items():
            if _ids(hf.apply_chat_template(conv, tokenize=True)) != ids:
                bad.append((name, "template ids", conv))
        if s.input_ids != ids:
            bad.append(("ids", conv))
        if s.labels != [i if m else IGNORE for i, m in zip(ids, mask)]:
            bad.append(("labels", conv))
    assert bad == []


def test_a_reply_merging_with_its_marker_is_trained_from_the_merged_token(mistral_model):
    # Mistral has the piece '>"': the reply's first character shares a token with the marker.
    tok = Tokenizer(mistral_model)
    conv = [{"role": "user", "content": "x"}, {"role": "assistant", "content": '"quoted"'}]
    s = tokenize_conversation(tok, conv)
    first = next(i for i, label in enumerate(s.labels) if label != IGNORE)
    assert tok.id_to_piece(s.input_ids[first]) == '>"'
    prompt = encode_chat_prompt(tok, conv[:1])
    assert s.input_ids[: len(prompt)] != prompt and s.input_ids[: len(prompt) - 1] == prompt[:-1]


def test_dpo_rows_are_the_rendered_conversations_with_the_last_reply_trained(case):
    pairs = [Pair(conv[:-1], conv[-1]["content"], other) for conv in CONVERSATIONS
             for other in ("No idea.", '"nope"')]
    items, counts = tokenize_pairs(case.tok, pairs, max_seq_len=4096, min_completion_tokens=1)
    assert len(items) == len(pairs) and not counts
    batch = collate_pairs(items, case.tok.pad_id)
    n, bad = len(items), []
    for k, p in enumerate(pairs):
        for row, reply in ((k, p.chosen), (n + k, p.rejected)):
            ids, mask = _reference(case, [*p.prompt, {"role": "assistant", "content": reply}], last_only=True)
            if batch["input_ids"][row, : len(ids)].tolist() != ids:
                bad.append(("ids", row, reply))
            if batch["labels"][row].tolist() != [i if m else IGNORE for i, m in zip(ids, mask)] + [IGNORE] * (
                    batch["labels"].shape[1] - len(ids)):
                bad.append(("labels", row, reply))
    assert bad == []


def _prompts():
    for conv in CONVERSATIONS:
        for end, m in enumerate(conv, 1):
            if m["role"] == "user":
                yield conv[:end]


def test_generation_prompts_are_apply_chat_template_with_a_generation_prompt(case):
    from danube.eval.inference import TextTokenizer
    from danube.eval.mt_bench import encode_chat

    ours, theirs = TextTokenizer(case.model_dir), TextTokenizer(case.hf_dir)
    bad = []
    for prompt in _prompts():
        text = case.fast.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        assert text == case.fast.bos_token + render_chat_prompt(prompt)
        ref = _ids(case.fast.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
        for name, hf in case.all_hf().items():
            if _ids(hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)) != ref:
                bad.append((name, prompt))
        if not encode_chat_prompt(case.tok, prompt) == encode_chat(ours, prompt) == encode_chat(theirs, prompt) == ref:
            bad.append(("danube", prompt))
    assert bad == []


def test_exported_template_refuses_what_danube_refuses(case):
    from jinja2 import TemplateError

    assert hf_chat_template(bos=False) == hf_chat_template().removeprefix("{{ bos_token }}")
    for msgs in ([{"role": "user", "content": "a"}, {"role": "system", "content": "late"}],
                 [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                 [{"role": "assistant", "content": "first"}],
                 [{"role": "tool", "content": "?"}]):
        with pytest.raises(TemplateError):
            case.fast.apply_chat_template(msgs, tokenize=False)


def test_lm_eval_adapter_encodes_as_lm_eval_s_hf_model(case):
    from lm_eval.models.huggingface import HFLM

    from danube.eval.lm_eval_adapter import DanubeLM

    hf = HFLM(pretrained=str(case.hf_dir), device="cpu", dtype="float32", batch_size=1)
    ours = [DanubeLM(str(case.model_dir)), DanubeLM(str(case.hf_dir))]
    bad = []
    for text in TEXTS:
        for add in (None, False, True):
            ref = hf.tok_encode(text, add_special_tokens=add)
            if any(lm.tok_encode(text, add_special_tokens=add) != ref for lm in ours):
                bad.append((text, add))
    assert bad == []


def _split_by_brute_force(tok, text, at):
    ids, offsets = tok.encode_with_offsets(text)
    return ids, sum(1 for b, e in offsets if not (e > at or (b == e and b >= at)))


def test_offsets_spell_the_text_and_the_reply_split_matches_them(case):
    tok = case.tok
    for text in TEXTS + ["<|answer|>" + m["content"] for c in CONVERSATIONS for m in c]:
        ids, offsets = tok.encode_with_offsets(text)
        assert ids == tok.encode(text)
        # Spans are in order, cover the text once, and an empty span sits where its piece starts.
        covered = "".join(text[b:e] for b, e in offsets)
        assert covered == text and all(e0 <= b1 for (_, e0), (b1, _) in zip(offsets, offsets[1:])), repr(text)
        for at in range(len(text) + 1):
            assert tok.encode_split(text, at) == _split_by_brute_force(tok, text, at), (text, at)


def test_reply_split_falls_back_when_a_piece_crosses_a_space(tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    # A hand-made unigram model (not one danube exports) with a piece across a space: "ab cd"
    # reads ["a", "b▁c", "d"], but its head "ab" alone reads ["ab"], so the shortcut must notice.
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 0, 1, 2
    proto.normalizer_spec.name, proto.normalizer_spec.add_dummy_prefix = "identity", False
    proto.normalizer_spec.remove_extra_whitespaces = False
    for piece, score, kind in [("<unk>", 0, 2), ("<s>", 0, 3), ("</s>", 0, 3), ("a", -2, 1), ("b", -4, 1), ("c", -4, 1),
                               ("d", -2, 1), ("▁", -4, 1), ("ab", -5, 1), ("b▁c", 0, 1), ("▁c", -1, 1)]:
        proto.pieces.add(piece=piece, score=score, type=kind)
    (tmp_path / "x.model").write_bytes(proto.SerializeToString())
    tok = Tokenizer(tmp_path / "x.model")
    assert [tok.id_to_piece(i) for i in tok.encode("ab cd")] == ["a", "b▁c", "d"]
    assert [tok.id_to_piece(i) for i in tok.encode("ab")] == ["ab"]
    assert tok.encode_split("ab cd", 1) == (tok.encode("ab cd"), 1)
    for at in range(6):
        assert tok.encode_split("ab cd", at) == _split_by_brute_force(tok, "ab cd", at), at
