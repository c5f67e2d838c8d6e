"""Files and directories written whole or not at all, and outputs that never clobber inputs.

Each file is written to a temporary sibling and renamed over its name (``os.replace`` is
atomic on POSIX and Windows); a failure removes the temporary file and leaves what was
there before. Directories get the same treatment from :func:`atomic_dir`. Temporary names
are ``.NAME.tmp-PID-XXXX``: a kill leaves one behind, and :func:`remove_stale_temps`
removes those whose process is gone. Everything is created with the permissions the
umask gives (``tempfile`` would make directories ``drwx------``).
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping

_TEMP = re.compile(r"^\..+\.tmp-(\d+)(-[0-9a-f]+)?$")


@functools.cache
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary sibling directory of ``path`` to fill; it replaces ``path`` whole only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    tmp.mkdir(mode=0o777 & ~_umask())
    try:
        yield tmp
        honour_umask(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def honour_umask(directory: Path) -> None:
    """Give everything under ``directory`` the permissions the umask allows (safetensors writes files ``0600``)."""
    mask = _umask()
    for root, dirs, files in os.walk(directory):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            file = Path(root) / name
            if not file.is_symlink():
                executable = file.stat().st_mode & 0o111
                os.chmod(file, (0o666 | executable) & ~mask)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory ``src`` to ``dst``, replacing an existing one only at the end."""
    if dst.exists():
        old = _temp_sibling(dst)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(directory: str | Path, recursive: bool = False) -> list[Path]:
    """Delete the temporary files and directories that killed writers left in ``directory``.

    Only names of the form :func:`atomic_file` / :func:`atomic_dir` give, and only when the
    process named in them no longer runs (a live writer's temporary is left alone).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    entries = directory.rglob(".*") if recursive else directory.glob(".*")
    removed = []
    for entry in sorted(entries, key=lambda p: len(p.parts)):
        m = _TEMP.match(entry.name)
        if not m or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))) or not entry.exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _within(path: Path, other: Path) -> bool:
    """Whether ``path`` is ``other`` or lies inside it (both resolved)."""
    return path == other or other in path.parents


def check_output_dir(output: str | Path, *, overwrite: bool, inputs: Mapping[str, str | Path] | Iterable[str | Path] = (),
                     flag: str = "--overwrite") -> Path:
    """Refuse an output directory that would clobber something, before any work is done.

    The output may not be or contain any of ``inputs`` (paths, or ``{what: path}`` for the
    message; not even with ``overwrite``:
    replacing it would delete what the command reads), and an existing non-empty output
    needs ``overwrite``. The output itself is replaced only when the new one is
    complete (:func:`atomic_dir`).
    """
    out = Path(output)
    resolved = out.resolve()
    named = inputs.items() if isinstance(inputs, Mapping) else (("input", item) for item in inputs)
    for what, item in named:
        src = Path(item).resolve()
        if _within(src, resolved):
            raise FileExistsError(
                f"the output {out} {'is' if resolved == src else 'contains'} the {what} {item}: refusing to overwrite "
                "it (that would destroy what is being read); choose another output"
            )
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass {flag} to replace it (nothing was written)")
    return out
