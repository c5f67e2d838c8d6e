"""The built-in sample corpus: text that ships with CPython, so training runs with no download.

Documents are the pydoc help topics (English prose about the language), the docstrings of
a fixed list of standard-library modules, and those modules' source files. That is
about 1M tokens with a 4,096-piece tokenizer: enough to see a tiny model learn, far too
little for anything else. The exact text depends on the Python version, which is why reuse
is checked against the manifest and the tokenizer checksum rather than assumed.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# Pure-Python standard-library modules present in every CPython >= 3.11 build.
MODULES = (
    "abc argparse ast asyncio.base_events asyncio.streams asyncio.tasks base64 bisect calendar cmd codecs "
    "collections concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib dis "
    "email.message email.utils enum fractions ftplib functools getopt gettext glob gzip hashlib heapq hmac "
    "html.parser http.client http.cookies http.server imaplib inspect io ipaddress json locale logging "
    "logging.handlers lzma mailbox mimetypes numbers operator optparse os pathlib pdb pickle pickletools "
    "pkgutil platform plistlib poplib pprint queue random re sched secrets selectors shelve shlex shutil "
    "smtplib socket socketserver statistics string subprocess tarfile tempfile textwrap threading "
    "timeit tokenize trace traceback types typing unittest.case unittest.mock urllib.parse urllib.request "
    "uuid warnings weakref xml.dom.minidom xml.etree.ElementTree zipfile"
).split()

CORPUS = "corpus.jsonl"
TOKENIZER = "tokenizer.model"
SHARDS = "shards"
DOC_CHARS = 8_000


def _module_docs(name: str) -> list[str]:
    """The module's docstrings (module, then each public class with its methods, each function) and its source."""
    try:
        mod = importlib.import_module(name)
    except ImportError:  # a build without e.g. _ssl or _lzma
        return []
    docs = []
    parts = [inspect.getdoc(mod) or ""]
    for attr, obj in sorted(vars(mod).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isclass(obj):
            methods = [
                f"{attr}.{m}: {inspect.getdoc(f)}" for m, f in sorted(vars(obj).items())
                if not m.startswith("_") and inspect.isfunction(f) and inspect.getdoc(f)
            ]
            parts.append("\n\n".join([f"class {attr}: {inspect.getdoc(obj) or ''}", *methods]))
        elif inspect.isfunction(obj) and inspect.getdoc(obj):
            parts.append(f"{attr}(): {inspect.getdoc(obj)}")
    docs.append(f"Module {name}\n\n" + "\n\n".join(p for p in parts if p.strip()))
    try:
        source = inspect.getsource(mod)
    except (OSError, TypeError):
        source = ""
    if source.strip():
        docs.append(source)
    return docs


def _pieces(text: str, size: int = DOC_CHARS) -> list[str]:
    """Split at blank lines into pieces of about ``size`` characters (whole paragraphs each)."""
    pieces, current, length = [], [], 0
    for para in text.split("\n\n"):
        current.append(para)
        length += len(para) + 2
        if length >= size:
            pieces.append("\n\n".join(current))
            current, length = [], 0
    if current:
        pieces.append("\n\n".join(current))
    return [p for p in pieces if p.strip()]


def sample_documents() -> list[str]:
    """Every document of the sample corpus, in a fixed order."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    for name in MODULES:
        docs.extend(_module_docs(name))
    # Paragraph groups rather than whole files: a finer train/val split, and SentencePiece
    # trains on records shorter than its 64 KiB sentence limit.
    return [p for d in docs for p in _pieces(d)]


def _is_ready(root: Path, vocab_size: int) -> bool:
    from danube.data.prepare import read_manifest
    from danube.data.tokenizer import Tokenizer

    tok_path, shards = root / TOKENIZER, root / SHARDS
    if not (tok_path.is_file() and (shards / "train" / "index.json").is_file()):
        return False
    try:
        manifest = read_manifest(shards)
        tok = Tokenizer(tok_path)
    except (OSError, ValueError) as err:
        log.warning("rebuilding the sample data in %s: %s", root, err)
        return False
    same = manifest["tokenizer"]["checksum"] == tok.checksum and tok.vocab_size == vocab_size
    if not same:
        log.warning("rebuilding the sample data in %s: tokenizer changed or vocab size is not %d", root, vocab_size)
    return same


def ensure_sample_data(root: str | Path, vocab_size: int = 4096, num_workers: int = 2) -> tuple[Path, Path]:
    """Build (once) the sample corpus, its tokenizer and its shards under ``root``.

    Returns:
        ``(tokenizer.model path, prepared shard directory)``; the directory holds
        ``train/``, ``val/`` and ``manifest.json`` for :class:`~danube.data.pretrain.PretrainDataModule`.
    """
    from filelock import FileLock

    from danube.data.prepare import prepare
    from danube.data.tokenizer import train_tokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok_path, shards = root / TOKENIZER, root / SHARDS
    # Several ranks (or runs) may ask at once: one builds, the others wait and reuse.
    with FileLock(str(root / ".lock")):
        if _is_ready(root, vocab_size):
            return tok_path, shards
        log.info("building the sample corpus in %s (Python %d.%d stdlib text)", root, *sys.version_info[:2])
        corpus = root / CORPUS
        tmp = corpus.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in sample_documents():
                f.write(json.dumps({"text": doc}) + "\n")
        tmp.replace(corpus)
        tmp_tok = root / "tokenizer.tmp.model"
        train_tokenizer([corpus], tmp_tok, vocab_size=vocab_size)
        tmp_tok.replace(tok_path)
        prepare([corpus], shards, tok_path, val_fraction=0.02, num_workers=num_workers, chunk_bytes="8MB",
                seed=0, overwrite=True)
    return tok_path, shards
