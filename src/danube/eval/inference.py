"""A model and its tokenizer, ready for inference: what evaluation, ``danube chat`` and ``danube generate`` read.

The model is loaded by :func:`danube.model.loading.load_model` (the checks every command makes);
:class:`TextTokenizer` reads the directory's tokenizer, SentencePiece or Hugging Face.
"""

from __future__ import annotations

import logging
from pathlib import Path


from danube.model import Danube
from danube.model.io import CONFIG_FILE, TOKENIZER_FILE, check_model_dir
from danube.model.loading import load_model, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

class TextTokenizer:
    """The few calls evaluation needs, over SentencePiece (danube dirs) or transformers (HF dirs).

    Text is read as markup (see :mod:`danube.data.tokenizer`): ``encode(text, bos=True)``
    is what lm-eval's ``hf`` model gets from the exported Hugging Face tokenizer, BOS
    first (only when asked for), then the text with ``</s>`` and the other special
    pieces' strings as their ids. ``decode`` drops special tokens, as lm-eval does.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.source = path
        sp_file = path if path.is_file() else path / TOKENIZER_FILE
        if (path / CONFIG_FILE).is_file() or path.is_file():
            if not sp_file.is_file():
                raise FileNotFoundError(
                    f"{path}: no {TOKENIZER_FILE} in the model directory; pass tokenizer=PATH "
                    "(a SentencePiece .model file or a Hugging Face tokenizer directory)"
                )
            from danube.data.tokenizer import Tokenizer

            self.sp = Tokenizer(sp_file)
            self.hf = None
            self.bos_id, self.eos_id = self.sp.bos_id, self.sp.eos_id
            self.vocab_size = self.sp.vocab_size
        else:
            from transformers import AutoTokenizer

            try:
                self.hf = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError) as err:
                raise FileNotFoundError(f"{path}: no usable Hugging Face tokenizer files: {err}") from err
            self.sp = None
            self.bos_id = self.hf.bos_token_id if self.hf.bos_token_id is not None else -1
            self.eos_id = self.hf.eos_token_id
            self.vocab_size = len(self.hf)
        self.eos_text = self.decode_special([self.eos_id])
        self.bos_text = self.decode_special([self.bos_id]) if self.bos_id >= 0 else ""

    def encode(self, text: str, bos: bool = False) -> list[int]:
        if self.sp is not None:
            return ([self.bos_id] if bos and self.bos_id >= 0 else []) + self.sp.encode_with_specials(text)
        return self.hf.encode(text, add_special_tokens=bos)

    def encode_with_specials(self, text: str) -> list[int]:
        """``text`` read as markup, no BOS: what the chat prompts are made of."""
        return self.encode(text, bos=False)

    def decode(self, ids: list[int]) -> str:
        if self.sp is not None:
            return self.sp.decode([i for i in ids if i not in (self.bos_id, self.eos_id)])
        return self.hf.decode(ids, skip_special_tokens=True)

    def decode_special(self, ids: list[int]) -> str:
        if self.sp is not None:
            return "".join(self.sp.id_to_piece(i) for i in ids)
        return self.hf.decode(ids, skip_special_tokens=False)


def default_repetition_penalty(path: str | Path) -> float:
    """The repetition penalty ``transformers`` ``generate`` applies to this model when none is given.

    A directory's ``generation_config.json`` says it; without one, a danube model directory
    gets what ``danube export-hf`` writes (the report's 1.1), a Hugging Face one
    transformers' default (1.0).
    """
    import json

    from danube.hf import REPORT_GENERATION
    from danube.model.io import GENERATION_FILE

    path = Path(path)
    file = path / GENERATION_FILE
    if file.is_file():
        try:
            return float(json.loads(file.read_text(encoding="utf-8")).get("repetition_penalty", 1.0))
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as err:
            raise ValueError(f"{file}: not a generation config with a numeric repetition_penalty: {err}") from err
    return REPORT_GENERATION["repetition_penalty"] if (path / CONFIG_FILE).is_file() else 1.0


def load_for_eval(
    model_dir: str | Path,
    tokenizer: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> tuple[Danube, TextTokenizer]:
    """Model (eval mode) and tokenizer; ``tokenizer`` defaults to the model directory's own."""
    target, dtype_ = resolve_device(device), resolve_dtype(dtype)  # bad values fail before any file is read
    check_model_dir(model_dir)  # a run directory or a typo: say so, not "no tokenizer" / "repo id"
    tok = TextTokenizer(tokenizer or model_dir)
    model = load_model(model_dir, device=target, dtype=dtype_).eval()
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tok.source} has {tok.vocab_size} tokens but the model {model_dir} only "
            f"{model.cfg.vocab_size}: they do not belong together"
        )
    log.info("loaded %s (%s, %s) with tokenizer %s", model_dir, target, dtype, tok.source)
    return model, tok
