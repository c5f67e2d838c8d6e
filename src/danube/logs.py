"""One logging set-up for ``train.py``, ``finetune.py``, ``evaluate.py`` and the ``danube`` commands.

* Every message once, on the console (stdout, through Hydra's handler, or stderr for the
  ``danube`` commands): Lightning installs a handler of its own when it is imported before
  logging is configured, which printed each of its lines twice.
* Libraries at WARNING (Lightning's banners and tips, litdata's cache notes, ``datasets``,
  ``transformers``, ``peft``, ...) unless ``verbose=true``; the handful of Python warnings
  every run printed about Lightning internals are filtered the same way.
* The full log of an invocation in its run directory (:func:`log_to_file`), at INFO whatever
  the console shows.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE = "%H:%M:%S"

# Loggers of libraries whose INFO lines say nothing a user acts on.
LIBRARIES = ("lightning", "lightning_fabric", "pytorch_lightning", "litdata", "datasets", "transformers", "peft",
             "tensorboard", "torch", "urllib3", "filelock", "fsspec", "httpx", "huggingface_hub", "lm_eval",
             "matplotlib", "optuna", "numexpr", "sentencepiece")
# Loggers whose warnings are about optional kernels of a library, not about the run: shown with verbose.
# torchao (imported by transformers and peft when installed): its CUDA extensions and triton are absent
# on CPU machines; torch's pytree: torchao registers Enums the deprecated way.
QUIET = ("torchao", "torch.utils._pytree")
# Python warnings every run printed, about library internals rather than anything the run does.
WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Your `IterableDataset` has `__len__` defined",
    r".*`validation_step` but have no `val_dataloader`",
    r"The `srun` command is available on your system but is not used",
    r".*does not have many workers which may be a bottleneck",
    r"Found keys that are in the model state dict but not in the checkpoint",
    # pretraining: the loader's position is the datamodule's state (danube.data.pretrain), which Lightning restores
    r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable",
    # peft: danube sets base_model_name_or_path itself right after (danube.lora.add_lora); the JSON is right
    r"The PEFT config's `base_model_name_or_path` was renamed",
    # peft looks for a Hugging Face config.json beside the base (a danube directory has config.yaml); danube's
    # adapters never change the vocabulary, which is all that check is for
    r"Could not find a config file in .* - will assume that the vocabulary was not modified",
)


_filtered = False


def setup(verbose: bool = False, stream=None) -> None:
    """Configure logging for one process: danube at INFO, libraries at WARNING unless ``verbose``.

    ``stream``: where to print when no handler exists yet (the ``danube`` commands); under
    Hydra its console handler is kept.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, DATE))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    level = logging.INFO if verbose else logging.WARNING
    existing = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in LIBRARIES]
    for name in (*LIBRARIES, *existing):  # children too: Lightning sets its own loggers to INFO on import
        lg = logging.getLogger(name)
        lg.setLevel(level)
        if name.split(".")[0] in ("lightning", "lightning_fabric", "pytorch_lightning"):
            for h in list(lg.handlers):  # Lightning's own StreamHandler: the second copy of each line
                lg.removeHandler(h)
            lg.propagate = True
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    # The other ranks of a multi-device job (started by the launcher) say only what goes wrong.
    from danube.rundir import is_rank_zero

    logging.getLogger("danube").setLevel(logging.INFO if is_rank_zero() else logging.WARNING)
    global _filtered
    if not verbose and not _filtered:
        for message in WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        _filtered = True


def log_to_file(path: Path) -> logging.Handler:
    """Also write every record of this process (INFO and up, libraries included) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    return handler


def close_file(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()


def console_is_terminal() -> bool:
    """Progress bars redraw lines with ``\\r``: only worth it where a person watches a terminal."""
    return sys.stdout.isatty()


def duration(seconds: float) -> str:
    """``3 min 44 s``, ``2 h 05 min``, ``41 s``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
