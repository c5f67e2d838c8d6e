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
import logging
import sys
from pathlib import Path

from danube.data.records import write_jsonl

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

# The sample's documents by what they are, for mixtures (data=sample_sources): pydoc's help
# topics (English prose about the language), module/class/function docstrings, module source.
SOURCES = ("topics", "docstrings", "code")
SOURCES_DIR = "sources"
CORPUS = "corpus.jsonl"
TOKENIZER = "tokenizer.model"
SHARDS = "shards"
DOC_CHARS = 8_000


def _module_docs(name: str) -> list[tuple[str, str]]:
    """The module's docstrings (module, then each public class with its methods, each function) and its source.

    Returns:
        ``(source name, text)`` pairs: ``("docstrings", ...)`` then ``("code", ...)``.
    """
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
    docs.append(("docstrings", f"Module {name}\n\n" + "\n\n".join(p for p in parts if p.strip())))
    try:
        source = inspect.getsource(mod)
    except (OSError, TypeError):
        source = ""
    if source.strip():
        docs.append(("code", source))
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


def labelled_documents() -> list[tuple[str, str]]:
    """Every document of the sample corpus with the source it belongs to (see :data:`SOURCES`), in a fixed order."""
    from pydoc_data.topics import topics

    docs = [("topics", topics[k]) for k in sorted(topics)]
    for name in MODULES:
        docs.extend(_module_docs(name))
    # Paragraph groups rather than whole files: a finer train/val split, and SentencePiece
    # trains on records shorter than its 64 KiB sentence limit.
    return [(source, p) for source, d in docs for p in _pieces(d)]


def sample_documents() -> list[str]:
    """Every document of the sample corpus, in a fixed order."""
    return [text for _, text in labelled_documents()]


def _is_ready(root: Path, vocab_size: int) -> bool:
    from danube.data.tokenizer import Tokenizer

    tok_path = root / TOKENIZER
    if not tok_path.is_file():
        return False
    try:
        tok = Tokenizer(tok_path)
    except (OSError, ValueError) as err:
        log.warning("rebuilding the sample data in %s: %s", root, err)
        return False
    if tok.vocab_size != vocab_size:
        # Runs and prepared sources elsewhere refer to this tokenizer by checksum: never replace it in place.
        raise ValueError(
            f"{root} holds the sample made with a {tok.vocab_size:,}-piece tokenizer, not {vocab_size:,} "
            f"(data.vocab_size): give the other size its own directory, e.g. data.root={root}_{vocab_size} "
            f"(or paths.data_dir=...), so the runs trained on {tok_path} keep their tokenizer"
        )
    return _shards_match(root / SHARDS, tok.checksum)


def _shards_match(shards: Path, checksum: str) -> bool:
    """Whether ``shards`` is a complete prepared directory made with the tokenizer of sha256 ``checksum``."""
    from danube.data.prepare import read_manifest

    if not (shards / "train" / "index.json").is_file():
        return False
    try:
        manifest = read_manifest(shards)
    except (OSError, ValueError) as err:
        log.warning("rebuilding %s: %s", shards, err)
        return False
    if manifest["tokenizer"]["checksum"] != checksum:
        log.warning("rebuilding %s: it was tokenized with another tokenizer", shards)
        return False
    return True


def ensure_sample_data(root: str | Path, vocab_size: int = 4096, num_workers: int = 2) -> tuple[Path, Path]:
    """Build (once) the sample corpus, its tokenizer and its shards under ``root``.

    Returns:
        ``(tokenizer.model path, prepared shard directory)``; the directory holds
        ``train/``, ``val/`` and ``manifest.json`` for :class:`~danube.data.pretrain.PretrainDataModule`.
    """
    from filelock import FileLock

    from danube.corpus.prepare import prepare
    from danube.data.tokenizer import train_tokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok_path, shards = root / TOKENIZER, root / SHARDS
    # Several ranks (or runs) may ask at once: one builds, the others wait and reuse.
    with FileLock(str(root / ".lock")):
        if _is_ready(root, vocab_size):
            return tok_path, shards
        log.info("building the sample corpus in %s (Python %d.%d stdlib text)", root, *sys.version_info[:2])
        corpus = write_jsonl(({"text": doc} for doc in sample_documents()), root / CORPUS)
        tmp_tok = root / "tokenizer.tmp.model"
        train_tokenizer([corpus], tmp_tok, vocab_size=vocab_size)
        tmp_tok.replace(tok_path)
        prepare([corpus], shards, tok_path, val_fraction=0.02, num_workers=num_workers, chunk_bytes="8MB",
                seed=0, overwrite=True)
    return tok_path, shards


def ensure_sample_sources(root: str | Path, vocab_size: int = 4096, num_workers: int = 2) -> tuple[Path, dict[str, Path]]:
    """The sample corpus as the named sources of :data:`SOURCES`, one prepared directory each.

    They share the sample's tokenizer (built by :func:`ensure_sample_data` under the same
    ``root``), so a run can mix them by weight, and a model trained on ``data=sample`` reads them.

    Returns:
        ``(tokenizer.model path, {source name: prepared directory})``.
    """
    from filelock import FileLock

    from danube.corpus.prepare import prepare
    from danube.data.tokenizer import Tokenizer

    tok_path, _ = ensure_sample_data(root, vocab_size=vocab_size, num_workers=num_workers)
    checksum = Tokenizer(tok_path).checksum
    base = Path(root) / SOURCES_DIR
    dirs = {name: base / name for name in SOURCES}
    with FileLock(str(Path(root) / ".lock")):
        stale = [name for name, d in dirs.items() if not _shards_match(d, checksum)]
        if stale:
            base.mkdir(exist_ok=True)
            docs: dict[str, list[str]] = {name: [] for name in SOURCES}
            for source, text in labelled_documents():
                docs[source].append(text)
            for name in stale:
                log.info("preparing sample source %r (%d documents) in %s", name, len(docs[name]), dirs[name])
                corpus = write_jsonl(({"text": text} for text in docs[name]), base / f"{name}.jsonl")
                # 5% held out: the smallest source (topics) still gets a few validation documents.
                prepare([corpus], dirs[name], tok_path, val_fraction=0.05, num_workers=num_workers,
                        chunk_bytes="8MB", seed=0, overwrite=True)
    return tok_path, dirs
