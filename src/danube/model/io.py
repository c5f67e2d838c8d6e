"""The native model directory: what every danube command reads and writes.

A model directory holds::

    config.yaml             # DanubeConfig fields (plain YAML)
    model.safetensors       # the state dict, Hugging Face parameter names
    tokenizer.model         # optional: the SentencePiece model the vocabulary comes from
    generation_config.json  # optional: kept from an imported Hugging Face checkpoint, exported as is
    chat_template.jinja     # optional: likewise, the imported tokenizer's chat template
    checksums.sha256        # sha256 of the files above (`sha256sum -c checksums.sha256` reads it)

Directories are written to a temporary sibling and renamed into place, so a crash
mid-write never leaves a half-written model where a good one was. Reading verifies the
checksums (a file changed since it was written is refused, naming it) and refuses
weights that are not finite. Commands load models through :func:`danube.model.loading.load_model`,
which reads this format and Hugging Face's.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Mapping

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from danube.files import atomic_dir
from danube.model.config import DanubeConfig
from danube.model.transformer import Danube

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"
GENERATION_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHECKSUM_FILE = "checksums.sha256"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # a peft LoRA adapter directory (danube.lora)


class CorruptFileError(ValueError):
    """A file that is not what was written: truncated, overwritten, or not finite."""


def file_sha256(path: str | Path, chunk_bytes: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: Path, names: list[str]) -> None:
    """``checksums.sha256`` in ``sha256sum`` format for the files ``names`` of ``directory``."""
    lines = [f"{file_sha256(directory / n)}  {n}\n" for n in names]
    (directory / CHECKSUM_FILE).write_text("".join(lines))


def verify_checksums(directory: str | Path, names: list[str] | None = None) -> bool:
    """Check the files ``checksums.sha256`` lists (or only ``names``); False if there is no such file.

    Raises:
        CorruptFileError: a listed file is missing or its contents changed.
    """
    directory = Path(directory)
    listing = directory / CHECKSUM_FILE
    if not listing.is_file():
        return False
    for lineno, line in enumerate(listing.read_text().splitlines(), 1):
        expected, sep, name = line.partition("  ")
        if not sep or len(expected) != 64:
            raise CorruptFileError(f"{listing}:{lineno}: not a sha256sum line: {line!r}")
        if names is not None and name not in names:
            continue
        file = directory / name
        if not file.is_file():
            raise CorruptFileError(f"{file}: missing (listed in {listing})")
        actual = file_sha256(file)
        if actual != expected:
            raise CorruptFileError(
                f"corrupt file {file}: its sha256 is {actual[:12]}..., {listing.name} recorded {expected[:12]}... "
                "when it was written; restore it from a copy or write the directory again"
            )
    return True


def read_safetensors(file: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file; a damaged file is a :class:`CorruptFileError` naming it."""
    try:
        return load_file(str(file), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptFileError(f"corrupt file {file}: not a readable safetensors file ({err})") from err


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or infinity: they can only come from a damaged file or a diverged run."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CorruptFileError(f"{source}: tensor {name!r} holds NaN or infinite values; refusing to load it")


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise a clear error if ``state`` does not fit ``model`` exactly (names and shapes)."""
    # Transformer Engine layers (fp8) keep scaling metadata as `_extra_state`: never in a file.
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
    if getattr(model, "cfg", None) is not None and model.cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: checkpoint does not match the model config: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, shape in expected.items():
        got = tuple(state[name].shape)
        if got != shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {list(got)}, the config needs {list(shape)}")


def load_weights(model: Danube, state: Mapping[str, torch.Tensor], source: str) -> Danube:
    """Check shapes, then load (``assign`` so a meta-built model takes the tensors as they are)."""
    check_state_dict(model, state, source)
    model.load_state_dict(dict(state), strict=not model.cfg.tie_word_embeddings, assign=True)
    if model.cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def read_config(path: str | Path) -> DanubeConfig:
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a danube model directory: {CONFIG_FILE} is missing")
    with open(file) as f:
        values = yaml.safe_load(f)
    if not isinstance(values, dict):
        raise ValueError(f"{file}: expected a mapping of DanubeConfig fields")
    try:
        return DanubeConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: {err}") from err


def read_weights(path: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A model directory's state dict, checksum-verified (when recorded) and finite."""
    path = Path(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: {WEIGHTS_FILE} is missing")
    if not verify_checksums(path, [WEIGHTS_FILE]):
        log.warning("%s has no %s: its weights cannot be verified", path, CHECKSUM_FILE)
    state = read_safetensors(weights, device)
    check_finite(state, str(weights))
    return state


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face checkpoint directory: ``config.json`` and weights (safetensors, sharded or not, or .bin)."""
    path = Path(path)
    return (path / "config.json").is_file() and any(
        path.glob(pattern) for pattern in ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin"))


# Folders of a run directory that never hold a model (skipped when looking for one).
_NOT_MODELS = {"checkpoints", "tensorboard", "eval"}


def find_under(path: str | Path, is_target, max_depth: int = 3) -> list[Path]:
    """Directories below ``path`` (at most ``max_depth`` levels) for which ``is_target`` holds, oldest first.

    A run directory holds its models a level or two down (``<stage>/model``, ``model``,
    ``hf``, ``adapter``); a multirun one more. Hidden folders (``.hydra``, temporary
    siblings of atomic writes) and checkpoint/TensorBoard folders are not searched. Oldest
    first: a pretraining run's last stage, the model it ends with, comes last.
    """
    found, level = [], [Path(path)]
    for _ in range(max_depth):
        below = []
        for d in level:
            try:
                children = sorted(c for c in d.iterdir() if c.is_dir())
            except OSError:
                continue
            for c in children:
                if c.name.startswith(".") or c.name in _NOT_MODELS:
                    continue
                (found if is_target(c) else below).append(c)
        level = below
    return sorted(found, key=lambda d: d.stat().st_mtime)


def check_model_dir(path: str | Path, what: str = "", hf: bool = True) -> Path:
    """``path`` if it is a danube model directory (or, with ``hf``, a Hugging Face one); else a clear error.

    The error says what ``path`` is instead: missing, a file, or a run directory, naming
    the model directories inside it (``runs/tiny`` -> ``runs/tiny/seq256/model``).
    ``what`` names the option it came from (``model_dir``) for the message.
    """
    path = Path(path)
    if is_model_dir(path) or (hf and is_hf_dir(path)):
        return path
    name = f"{what}={path}" if what else str(path)
    if not path.exists():
        raise FileNotFoundError(f"{name}: no such directory")
    if not path.is_dir():
        raise NotADirectoryError(f"{name} is a file; give a model directory (config.yaml + {WEIGHTS_FILE})")
    models = find_under(path, lambda d: is_model_dir(d) or (hf and is_hf_dir(d)))
    finetune = (path / "metrics.json").is_file() or (path / "adapter").is_dir()
    kind = "a fine-tuning run directory" if finetune else "a run directory"
    if models:
        listed = ", ".join(str(m) for m in models)
        last = " (the last one written is the run's final model)" if len(models) > 1 else ""
        raise FileNotFoundError(f"{name} is {kind}, not a model directory; the model directories in it: {listed}{last}")
    if _is_run_dir(path):
        raise FileNotFoundError(f"{name} is {kind} without a model directory yet: a stage (or a fine-tuning run) "
                                "writes its `model` directory when it completes")
    if (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{name}: {WEIGHTS_FILE} is missing beside {CONFIG_FILE}")
    if (path / ADAPTER_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{name} is a LoRA adapter directory, not a model directory: `danube merge-lora {path} "
                                "OUTPUT` writes its base model with the adapter merged in, a model directory")
    wanted = f"{CONFIG_FILE} + {WEIGHTS_FILE} (danube)" + (" or config.json + weights (Hugging Face)" if hf else "")
    raise FileNotFoundError(f"{name} is not a model directory: it has no {wanted}, and none is inside it")


def _is_run_dir(path: Path) -> bool:
    """What train.py / finetune.py leave: TensorBoard logs, or a config.yaml of the whole run."""
    if (path / "tensorboard").is_dir():
        return True
    try:
        with open(path / CONFIG_FILE) as f:
            values = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(values, dict) and bool({"recipe", "train", "model_dir"} & set(values))


def tokenizer_path(path: str | Path) -> Path | None:
    file = Path(path) / TOKENIZER_FILE
    return file if file.is_file() else None


def save_model_dir(
    model: Danube, path: str | Path, tokenizer: str | Path | None = None, extra_files: Mapping[str, str] | None = None
) -> Path:
    """Write ``model`` (and optionally its SentencePiece tokenizer) as a model directory, atomically.

    ``extra_files`` maps file names (:data:`GENERATION_FILE`, :data:`CHAT_TEMPLATE_FILE`) to
    their text, written into the same directory before it is renamed into place.
    """
    with atomic_dir(path) as tmp:
        with open(tmp / CONFIG_FILE, "w") as f:
            yaml.safe_dump(model.cfg.to_dict(), f, sort_keys=False)
        state = saved_state(model)
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        names = [CONFIG_FILE, WEIGHTS_FILE]
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
            names.append(TOKENIZER_FILE)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
            names.append(name)
        write_checksums(tmp, names)
    log.info("wrote model directory %s", path)
    return Path(path)


def saved_state(model: Danube) -> dict[str, torch.Tensor]:
    """The state dict as files hold it: contiguous CPU tensors, no ``lm_head`` when tied."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state
