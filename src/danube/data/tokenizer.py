"""SentencePiece tokenizers: load (Llama 2, Mistral or our own), train, export to Hugging Face.

The token ids of a text, one definition for every path
------------------------------------------------------

A text is read one of two ways, and both are what the exported Hugging Face tokenizer
(:func:`save_hf_tokenizer`) gives, fast or slow, in ``transformers`` or vLLM:

* **As data** (:meth:`Tokenizer.encode`, ``danube prepare``): SentencePiece's ids of the
  whole text. With a dummy prefix (Llama 2, Mistral: ``add_dummy_prefix: true``) that is
  the ids of ``" " + text`` (``""`` has none); without one (``danube train-tokenizer``), of
  the text as is.
  A literal ``</s>`` in a web page stays four characters. Hugging Face:
  ``tok(text, add_special_tokens=False, split_special_tokens=True)``.
* **As markup** (:meth:`Tokenizer.encode_with_specials`: chat turns, generation prompts,
  lm-eval requests): the text is cut at the strings of the special pieces (``<unk>``,
  ``<s>``, ``</s>``); each of those is its id, and each stretch between is read as data,
  on its own, so with a dummy prefix every stretch starts with its own ``▁``, the one after
  ``</s>`` included. Hugging Face: ``tok(text, add_special_tokens=False)``, which is also
  how ``apply_chat_template`` reads the rendered conversation.

A text without those strings gets the same ids both ways. The per-stretch prefix is what
``transformers`` calls ``legacy: true`` for Llama tokenizers, and what the Hugging Face
conversions of the Llama 2 and Mistral tokenizers have always done: models fine-tuned
from their Hub files saw ``▁<|answer|>`` after ``</s>``, and danube's chat ids match them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import shutil
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator

log = logging.getLogger(__name__)

# SentencePiece piece types (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4


class Tokenizer:
    """A SentencePiece model with its special ids (Llama 2 / Mistral: UNK 0, BOS 1, EOS 2)."""

    def __init__(self, model_file: str | Path) -> None:
        import sentencepiece as spm

        self.model_file = Path(model_file)
        if self.model_file.is_dir():
            self.model_file = self.model_file / "tokenizer.model"
        if not self.model_file.is_file():
            raise FileNotFoundError(
                f"tokenizer not found: {self.model_file} (a SentencePiece .model file, or a directory holding "
                "tokenizer.model; `danube train-tokenizer` makes one)"
            )
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        except (RuntimeError, OSError) as err:
            raise ValueError(f"{self.model_file} is not a SentencePiece model: {err}") from err
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()
        if self.eos_id < 0:
            raise ValueError(f"{self.model_file}: the tokenizer defines no EOS token")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @cached_property
    def checksum(self) -> str:
        """sha256 of the model file: shards and checkpoints record it to refuse a mismatch."""
        return hashlib.sha256(self.model_file.read_bytes()).hexdigest()

    @cached_property
    def proto(self):
        """The model as SentencePiece's ``ModelProto`` (pieces, trainer and normalizer settings)."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        return proto

    @property
    def add_dummy_prefix(self) -> bool:
        """Whether a text is read as ``" " + text`` (Llama 2, Mistral) or as is (``danube train-tokenizer``)."""
        return self.proto.normalizer_spec.add_dummy_prefix

    @cached_property
    def special_pieces(self) -> dict[str, int]:
        """The pieces markup can name (``<unk>``, ``<s>``, ``</s>``): unknown and control pieces, by id."""
        return {p.piece: i for i, p in enumerate(self.proto.pieces) if p.type in (_UNKNOWN, _CONTROL) and p.piece}

    @cached_property
    def _special_re(self) -> re.Pattern:
        # Longest first, so that of two pieces starting at one place the longer wins (as in `tokenizers`).
        return re.compile("|".join(re.escape(p) for p in sorted(self.special_pieces, key=len, reverse=True)))

    @property
    def eos_text(self) -> str:
        """The EOS piece as markup writes it (``</s>``)."""
        return self.sp.id_to_piece(self.eos_id)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """``text`` read as data: SentencePiece's ids of the whole text (see the module docstring)."""
        ids = self.sp.encode(text)
        if bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Each text read as data, as :meth:`encode` reads it."""
        return self.sp.encode(texts)

    def split_specials(self, text: str) -> Iterator[tuple[int, int, int | None]]:
        """``(start, end, id)`` of each special piece's string in ``text``, ``(start, end, None)`` of each stretch between.

        Empty stretches are left out.
        """
        pos = 0
        if self.special_pieces:
            for m in self._special_re.finditer(text):
                if m.start() > pos:
                    yield pos, m.start(), None
                yield m.start(), m.end(), self.special_pieces[m.group()]
                pos = m.end()
        if pos < len(text):
            yield pos, len(text), None

    def encode_with_specials(self, text: str) -> list[int]:
        """``text`` read as markup: special pieces' strings are their ids, the stretches between read as data."""
        ids: list[int] = []
        for start, end, special in self.split_specials(text):
            if special is None:
                ids += self.sp.encode(text[start:end])
            else:
                ids.append(special)
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """:meth:`encode` with each id's ``(start, end)`` character span in ``text``.

        The dummy prefix ``▁`` has the empty span ``(0, 0)``; a character spelled by several
        byte-fallback pieces gives its span to the last of them and an empty span at its
        start to the others (SentencePiece's own offsets, in characters instead of bytes).
        """
        import numpy as np

        pieces = self.sp.encode(text, return_type="proto").pieces
        ids = [p.id for p in pieces]
        begins, ends = [p.begin for p in pieces], [p.end for p in pieces]
        if not text.isascii():  # byte offsets -> character offsets (pieces start and end on characters)
            points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            width = 1 + (points >= 0x80).astype(np.int64) + (points >= 0x800) + (points >= 0x10000)
            char_starts = np.concatenate([[0], np.cumsum(width)])  # byte offset where each character starts
            begins = np.searchsorted(char_starts, begins).tolist()
            ends = np.searchsorted(char_starts, ends).tolist()
        return ids, list(zip(begins, ends))

    def encode_split(self, text: str, at: int) -> tuple[list[int], int]:
        """:meth:`encode`, and how many of the ids come before character ``at``.

        The count is that of the leading ids whose span (:meth:`encode_with_offsets`) ends at
        or before ``at``, an empty span counting where it stands: the rest spell
        ``text[at:]``, the first of them perhaps with characters before ``at`` merged in.
        Offsets are read only up to the first word start after ``at`` (SentencePiece never
        merges across a space that follows a non-space), and the shortcut is checked.
        """
        ids = self.sp.encode(text)
        cut = next((j for j in range(at + 1, len(text)) if text[j] in " ▁" and text[j - 1] not in " ▁"), len(text))
        head, offsets = self.encode_with_offsets(text[:cut])
        if ids[: len(head)] != head:  # a merge across the cut after all: read the whole text
            head, offsets = self.encode_with_offsets(text)
        before = next((i for i, (b, e) in enumerate(offsets) if e > at or (b == e and b >= at)), len(offsets))
        return ids, before

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def pieces(self) -> list[str]:
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size)]

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_file}, vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


def iter_training_text(files: Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """Lines of .txt files and the ``text_field`` of .jsonl records, for tokenizer training."""
    for file in map(Path, files):
        if file.suffix == ".jsonl":
            with open(file, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)[text_field]
                        except (json.JSONDecodeError, KeyError, TypeError) as err:
                            raise ValueError(f"{file}:{lineno}: not a JSON object with a {text_field!r} field: {err}")
        elif file.suffix == ".txt":
            with open(file, encoding="utf-8") as f:
                yield from (line.rstrip("\n") for line in f if line.strip())
        else:
            raise ValueError(f"{file}: tokenizer training reads .txt or .jsonl files")


def train_tokenizer(
    files: Iterable[str | Path],
    output: str | Path,
    vocab_size: int = 32_000,
    text_field: str = "text",
    max_sentences: int = 2_000_000,
    threads: int = 2,
    add_dummy_prefix: bool = False,
) -> Path:
    """Train a byte-fallback BPE SentencePiece model; writes ``output`` (a ``.model`` path).

    Llama 2's settings: identity normalisation, whitespace kept as is, digits split,
    byte fallback, ids 0/1/2 UNK/BOS/EOS; but no dummy prefix unless asked for
    (``add_dummy_prefix=True`` makes a Llama-2-style model), so that a word's ids do
    not depend on whether it starts the text. The exported Hugging Face files give
    SentencePiece's ids either way (see :func:`save_hf_tokenizer`).
    """
    import sentencepiece as spm

    output = Path(output)
    if output.suffix != ".model":
        raise ValueError(f"tokenizer output must end in .model, got {output}")
    output.parent.mkdir(parents=True, exist_ok=True)
    files = [Path(f) for f in files]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"tokenizer training file not found: {f}")
    # Read (and validate) before training: SentencePiece would swallow a bad line's error.
    sentences = list(itertools.islice(iter_training_text(files, text_field), max_sentences))
    if not sentences:
        raise ValueError(f"no text found in {[str(f) for f in files]}")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(output.with_suffix("")),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=add_dummy_prefix,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        max_sentence_length=1 << 16,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=threads,
        minloglevel=2,
    )
    output.with_suffix(".vocab").unlink(missing_ok=True)
    log.info("trained tokenizer %s (vocab %d)", output, vocab_size)
    return output


def check_exportable(tok: Tokenizer) -> None:
    """Raise ``ValueError`` unless the Hugging Face files can give exactly SentencePiece's ids.

    They can for BPE models with identity normalisation and whitespace kept as is, with or
    without a dummy prefix: Llama 2, Mistral and every ``danube train-tokenizer`` model.
    """
    spec, norm = tok.proto.trainer_spec, tok.proto.normalizer_spec
    problems = []
    if spec.model_type != spec.BPE:
        problems.append(f"model_type {spec.ModelType.Name(spec.model_type)} (only BPE is exported)")
    if norm.name != "identity" or norm.precompiled_charsmap:
        problems.append(f"normalization {norm.name!r} (only 'identity' is exported)")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces=true")
    if spec.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix=true")
    user = [p.piece for p in tok.proto.pieces if p.type == _USER_DEFINED]
    if user:
        problems.append(f"user-defined pieces {user[:5]}")
    if problems:
        raise ValueError(f"{tok.model_file}: cannot be exported as a Hugging Face tokenizer with the same ids: "
                         + "; ".join(problems))


def hf_backend(tok: Tokenizer):
    """The ``tokenizers`` pipeline (``tokenizer.json``) giving SentencePiece's ids for ``tok``.

    The BPE merges are ranked by the score of the piece they make, as SentencePiece picks
    them; a dummy prefix is a ``Prepend("▁")`` normaliser, which ``tokenizers`` runs on each
    stretch between special pieces (the module docstring's reading as markup). Byte
    fallback pieces and the special pieces are carried over as they are.
    """
    from tokenizers import AddedToken, decoders, normalizers, processors
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    check_exportable(tok)
    pieces = tok.proto.pieces
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    ranked = []
    for i, p in enumerate(pieces):
        if p.type != _NORMAL:
            continue
        for k in range(1, len(p.piece)):
            left, right = p.piece[:k], p.piece[k:]
            if left in vocab and right in vocab:
                ranked.append((-p.score, i, k, left, right))
    ranked.sort()
    unk = pieces[tok.sp.unk_id()].piece
    backend = Backend(BPE(vocab=vocab, merges=[(a, b) for *_, a, b in ranked], unk_token=unk, fuse_unk=True,
                          byte_fallback=tok.proto.trainer_spec.byte_fallback))
    prefix = [normalizers.Prepend("▁")] if tok.add_dummy_prefix else []
    backend.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "▁")])
    # Decoding drops the dummy prefix's space once, at the start, as SentencePiece does.
    strip = [decoders.Strip(" ", 1, 0)] if tok.add_dummy_prefix else []
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in tok.special_pieces])
    if tok.bos_id >= 0:
        bos = tok.sp.id_to_piece(tok.bos_id)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.bos_id)])
    return backend


def save_hf_tokenizer(tokenizer: "str | Path | Tokenizer", out_dir: str | Path, chat_template: str | None = None) -> None:
    """Write Hugging Face tokenizer files: ``tokenizer.model``, ``tokenizer.json``, ``tokenizer_config.json``.

    ``tokenizer.json`` is :func:`hf_backend`; ``tokenizer_config.json`` names the generic
    ``PreTrainedTokenizerFast`` so that every ``transformers`` version (4.x and 5.x) and vLLM
    load that file as written: ``LlamaTokenizer`` would make ``transformers`` 5 rebuild its
    own pipeline, whose prefix space is skipped before a text that starts with a space.
    ``legacy: true`` keeps the dummy prefix for the SentencePiece-backed tokenizer
    ``transformers`` builds from ``tokenizer.model``. ``chat_template`` defaults to the
    H2O-Danube format (:func:`danube.data.chat.hf_chat_template`).
    """
    from danube.data.chat import hf_chat_template

    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    backend = hf_backend(tok)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tok.model_file, out_dir / "tokenizer.model")
    backend.save(str(out_dir / "tokenizer.json"))
    piece = tok.sp.id_to_piece
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": piece(tok.bos_id) if tok.bos_id >= 0 else None,
        "eos_token": piece(tok.eos_id),
        "unk_token": piece(tok.sp.unk_id()),
        "pad_token": piece(tok.pad_id),
        "add_bos_token": tok.bos_id >= 0,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": chat_template if chat_template is not None else hf_chat_template(tok.bos_id >= 0),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def train_tokenizer_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="danube train-tokenizer", description="Train a byte-fallback BPE SentencePiece tokenizer."
    )
    parser.add_argument("files", nargs="+", help=".txt or .jsonl files")
    parser.add_argument("-o", "--output", required=True, help="output .model file")
    parser.add_argument("--vocab-size", type=int, default=32_000)
    parser.add_argument("--text-field", default="text", help="field of .jsonl records (default: text)")
    parser.add_argument("--max-sentences", type=int, default=2_000_000, help="read at most this many lines")
    parser.add_argument("--dummy-prefix", action="store_true",
                        help="read every text as ' ' + text, as the Llama 2 and Mistral tokenizers do")
    args = parser.parse_args(argv)
    out = train_tokenizer(args.files, args.output, args.vocab_size, args.text_field, args.max_sentences,
                          add_dummy_prefix=args.dummy_prefix)
    print(f"wrote {out} ({Tokenizer(out).vocab_size} pieces)")
    return 0
