"""SentencePiece tokenizers: load (Llama 2, Mistral or our own), train, export to Hugging Face."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator

log = logging.getLogger(__name__)


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

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        if bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

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
) -> Path:
    """Train a byte-fallback BPE SentencePiece model; writes ``output`` (a ``.model`` path).

    The settings are those under which Hugging Face's conversion of the model (see
    :func:`save_hf_tokenizer`) gives the same ids as SentencePiece: identity
    normalisation, no dummy prefix, whitespace kept as is; digits are split and
    ids 0/1/2 are UNK/BOS/EOS as in Llama 2 and Mistral.
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
        add_dummy_prefix=False,
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


def save_hf_tokenizer(tokenizer: "str | Path | Tokenizer", out_dir: str | Path) -> None:
    """Write Hugging Face tokenizer files (tokenizer.model, tokenizer.json, tokenizer_config.json)."""
    from transformers import AutoTokenizer

    src = tokenizer.model_file if isinstance(tokenizer, Tokenizer) else Path(tokenizer)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(src)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out_dir / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": tok.id_to_piece(tok.bos_id) if tok.bos_id >= 0 else None,
        "eos_token": tok.id_to_piece(tok.eos_id),
        "unk_token": tok.id_to_piece(tok.sp.unk_id()),
        # The conversion must not add a prefix space: our tokenizers are trained without one.
        "legacy": False,
        "add_prefix_space": False,
        "model_max_length": 1 << 20,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    # Let transformers convert once and save its fast tokenizer.json next to the model.
    AutoTokenizer.from_pretrained(out_dir).save_pretrained(out_dir)
    shutil.copyfile(src, out_dir / "tokenizer.model")


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
    args = parser.parse_args(argv)
    out = train_tokenizer(args.files, args.output, args.vocab_size, args.text_field, args.max_sentences)
    print(f"wrote {out} ({Tokenizer(out).vocab_size} pieces)")
    return 0
