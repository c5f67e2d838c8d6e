"""A small transformer quality classifier: a danube backbone, mean-pooled, and one logit.

H2O-Danube2 (report, section 7) also scored documents with small BERT-style models.
Ours reuses :class:`danube.model.transformer.DanubeModel` (causal, so with right padding
a token's hidden state never sees the padding and a document scores the same in any
batch), averages the hidden states of the document's tokens and maps them to one logit:
the probability that the document is good. Only the first ``max_tokens`` tokens of a
document are read. Saved as a classifier directory::

    MODEL/quality_classifier.json   kind "transformer", max_tokens, tokenizer checksum, metrics
    MODEL/config.yaml               the backbone's DanubeConfig
    MODEL/model.safetensors         backbone (model.*) and head (score.*)
    MODEL/tokenizer.model           the SentencePiece tokenizer

:class:`HFScorer` scores with any local Hugging Face sequence-classification directory
(e.g. a fine-tuned BERT) instead; nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from danube.data.quality import classifier
from danube.data.tokenizer import Tokenizer
from danube.model.config import DanubeConfig
from danube.model.transformer import Danube

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"


def classifier_config(vocab_size: int, max_tokens: int = 256, n_layer: int = 2, n_embd: int = 128,
                      n_head: int = 4, n_kv_head: int = 2) -> DanubeConfig:
    """A backbone small enough to train on a CPU in minutes (~0.3M parameters besides the embedding).

    SwiGLU width 8/3 x n_embd rounded up to a multiple of 8 (Llama's rule); no sliding
    window, since a classified document is at most ``max_tokens`` long.
    """
    return DanubeConfig(
        vocab_size=vocab_size, n_embd=n_embd, intermediate_size=-(-8 * n_embd // 3 // 8) * 8, n_layer=n_layer,
        n_head=n_head, n_kv_head=n_kv_head, sliding_window=None, max_seq_len=max_tokens,
    )


class DanubeClassifier(nn.Module):
    """``DanubeClassifier(cfg)(input_ids, lengths)`` -> one logit per sequence ``(B,)``."""

    def __init__(self, cfg: DanubeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Danube's own construction and Llama initialisation, without the LM head.
        lm = Danube(cfg)
        lm.init_weights()
        self.model = lm.model
        self.score = nn.Linear(cfg.n_embd, 1)
        nn.init.normal_(self.score.weight, std=cfg.init_std)
        nn.init.zeros_(self.score.bias)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids)  # (B, T, C)
        mask = (torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] < lengths[:, None])  # (B, T)
        pooled = (hidden * mask[..., None]).sum(1) / lengths[:, None].clamp(min=1)  # (B, C)
        return self.score(pooled).squeeze(-1)  # (B,)


def _encode(tok: Tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """BOS + the first ids of each text, at most ``max_tokens`` in all (an empty text keeps its BOS)."""
    prefix = [tok.bos_id] if tok.bos_id >= 0 else []
    return [(prefix + ids)[:max_tokens] or [tok.eos_id] for ids in tok.encode_batch(texts)]


def _batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, lengths


@dataclass
class TransformerScorer:
    """A trained :class:`DanubeClassifier` with its tokenizer."""

    model: DanubeClassifier
    tokenizer: Tokenizer
    max_tokens: int
    batch_size: int = 32
    path: Path | None = None
    meta: dict | None = None
    kind: str = "transformer"

    @torch.no_grad()
    def score(self, texts: list[str]) -> np.ndarray:
        """Probability of the good class per text."""
        self.model.eval()
        seqs = _encode(self.tokenizer, texts, self.max_tokens)
        out = np.zeros(len(texts))
        # Similar lengths per batch: less padding (which does not change a score, see module doc).
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            ids, lengths = _batch([seqs[i] for i in idx], self.tokenizer.pad_id)
            out[idx] = torch.sigmoid(self.model(ids, lengths)).double().numpy()
        return out

    def save(self, path: str | Path, meta: dict | None = None) -> Path:
        from safetensors.torch import save_file

        meta = {**(meta or self.meta or {}), "kind": "transformer", "max_tokens": self.max_tokens,
                "pooling": "mean", "tokenizer_checksum": self.tokenizer.checksum}

        def write(tmp: Path) -> None:
            (tmp / CONFIG_FILE).write_text(yaml.safe_dump(self.model.cfg.to_dict(), sort_keys=False))
            state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            shutil.copyfile(self.tokenizer.model_file, tmp / TOKENIZER_FILE)

        self.path = classifier.write_dir(path, meta, write)
        self.meta = meta
        log.info("wrote transformer quality classifier %s", self.path)
        return self.path

    @classmethod
    def load(cls, path: str | Path, batch_size: int = 32) -> "TransformerScorer":
        from safetensors.torch import load_file

        from danube.model.io import read_config

        path = Path(path)
        meta = classifier.read_meta(path, "transformer")
        for name in (WEIGHTS_FILE, TOKENIZER_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path}: {name} is missing")
        tok = Tokenizer(path / TOKENIZER_FILE)
        if tok.checksum != meta.get("tokenizer_checksum"):
            raise ValueError(f"{path}: {TOKENIZER_FILE} is not the tokenizer the classifier was trained with "
                             "(checksum differs from quality_classifier.json)")
        cfg = read_config(path)
        if cfg.vocab_size != tok.vocab_size:
            raise ValueError(f"{path}: config vocab_size={cfg.vocab_size} but the tokenizer has "
                             f"{tok.vocab_size} pieces")
        model = DanubeClassifier(cfg)
        state = load_file(str(path / WEIGHTS_FILE))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path / WEIGHTS_FILE}: does not match {CONFIG_FILE}: {err}") from err
        max_tokens = meta.get("max_tokens")
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= cfg.max_seq_len:
            raise ValueError(f"{path}: max_tokens={max_tokens!r} must be an integer in [1, {cfg.max_seq_len}]")
        return cls(model.eval(), tok, max_tokens, batch_size, path, meta)


def train_transformer(
    texts: list[str],
    labels: np.ndarray,
    tokenizer: str | Path | Tokenizer,
    cfg: DanubeConfig | None = None,
    max_tokens: int = 256,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[TransformerScorer, dict]:
    """Train a :class:`DanubeClassifier` on ``texts`` (labels 1 good, 0 bad); returns it and its metrics.

    AdamW with linear warm-up over the first 10% of ``steps`` then cosine decay to 10% of
    ``lr``; binary cross-entropy weighted so that both classes count equally however
    unbalanced the sets are.
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    cfg = cfg or classifier_config(tok.vocab_size, max_tokens)
    if cfg.vocab_size != tok.vocab_size:
        raise ValueError(f"classifier vocab_size={cfg.vocab_size} but the tokenizer has {tok.vocab_size} pieces")
    if not 1 <= max_tokens <= cfg.max_seq_len:
        raise ValueError(f"max_tokens={max_tokens} must be in [1, {cfg.max_seq_len}] (the config's max_seq_len)")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"steps={steps}, batch_size={batch_size} and lr={lr} must be positive")
    train_idx, val_idx = classifier.split(len(texts), labels, val_fraction, seed)
    seqs = _encode(tok, texts, max_tokens)
    torch.manual_seed(seed)
    model = DanubeClassifier(cfg)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min((s + 1) / warmup, 0.1 + 0.9 * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, steps - warmup))))))
    train_labels = labels[train_idx]
    n_pos = int(train_labels.sum())
    pos_weight = torch.tensor((len(train_labels) - n_pos) / max(n_pos, 1), dtype=torch.float32)
    rng = np.random.default_rng(seed)
    order, cursor, losses = rng.permutation(train_idx), 0, []
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = rng.permutation(train_idx), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        ids, lengths = _batch([seqs[i] for i in idx], tok.pad_id)
        target = torch.tensor(labels[idx], dtype=torch.float32)
        loss = nn.functional.binary_cross_entropy_with_logits(model(ids, lengths), target, pos_weight=pos_weight)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            log.info("step %d/%d: loss %.4f", step + 1, steps, float(np.mean(losses[-max(1, steps // 10):])))
    scorer = TransformerScorer(model.eval(), tok, max_tokens, batch_size=max(batch_size, 32))
    report = {
        "positive": int(labels.sum()), "negative": int(len(labels) - labels.sum()), "steps": steps,
        "final_loss": float(np.mean(losses[-max(1, steps // 10):])),
        "train": classifier.metrics(train_labels, scorer.score([texts[i] for i in train_idx])),
    }
    if len(val_idx):
        report["val"] = classifier.metrics(labels[val_idx], scorer.score([texts[i] for i in val_idx]))
    log.info("transformer quality classifier: %s", {k: v for k, v in report.items() if k != "final_loss"})
    return scorer, report


class HFScorer:
    """A local Hugging Face ``AutoModelForSequenceClassification`` directory as a scorer.

    The score is the probability of label ``label`` (softmax over the labels), or the
    sigmoid of the single logit of a one-label model. ``local_files_only``: never downloads.
    """

    kind = "transformer"

    def __init__(self, path: str | Path, batch_size: int = 32, max_tokens: int = 512, label: int = 1) -> None:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        self.path = Path(path)
        try:
            config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.path}: not a Hugging Face model directory: {err}") from err
        if config.num_labels > 1 and not 0 <= label < config.num_labels:
            raise ValueError(f"{self.path}: label {label} is not one of its {config.num_labels} labels "
                             f"({json.dumps(getattr(config, 'id2label', {}))})")
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(self.path, local_files_only=True).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.path}: cannot load a sequence classifier and its tokenizer: {err}") from err
        self.batch_size = batch_size
        limit = getattr(self.model.config, "max_position_embeddings", None) or max_tokens
        self.max_tokens = min(max_tokens, limit)
        self.label = label
        self.meta = {"kind": "transformer", "hf": str(self.path), "label": label}

    @torch.no_grad()
    def score(self, texts: list[str]) -> np.ndarray:
        out = np.zeros(len(texts))
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start : start + self.batch_size], truncation=True,
                                   max_length=self.max_tokens, padding=True, return_tensors="pt")
            logits = self.model(**batch).logits.float()  # (B, num_labels)
            if logits.shape[-1] == 1:
                probs = torch.sigmoid(logits[:, 0])
            else:
                probs = torch.softmax(logits, dim=-1)[:, self.label]
            out[start : start + len(probs)] = probs.double().numpy()
        return out
