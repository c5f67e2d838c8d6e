"""The ``danube`` console script: one subcommand per tool, imported only when run."""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from typing import Callable

from danube import logs
from danube.errors import USER_ERRORS

# name -> ("module:function", one-line help). Each function takes argv (list[str]) and
# returns an exit code; it builds its own argparse parser with prog="danube NAME". Bad input
# is raised as ValueError (or OSError for files) with a message naming what and where;
# main() turns it into one line on stderr and exit code 1.
COMMANDS: dict[str, tuple[str, str]] = {
    "import-hf": ("danube.hf:import_hf_main", "convert a Hugging Face Llama/Mistral directory to a danube model directory"),
    "export-hf": ("danube.hf:export_hf_main", "convert a danube model directory to a Hugging Face directory"),
    "plot": ("danube.plot:plot_main", "plot a run's train/val loss, LR and sequence length against tokens (Figure 1)"),
    "train-tokenizer": ("danube.data.tokenizer:train_tokenizer_main", "train a byte-fallback BPE SentencePiece tokenizer"),
    "oasst2-pairs": ("danube.data.oasst2:oasst2_pairs_main", "Oasst2 message rows -> DPO pairs (chosen rank 0, rejected highest rank)"),
    "merge-lora": ("danube.lora:merge_lora_main", "merge a LoRA adapter into its base model: a plain danube model directory"),
    "chat": ("danube.eval.console:chat_main", "chat with a model in the terminal (danube or Hugging Face directory)"),
    "generate": ("danube.eval.console:generate_main", "continue a prompt with a base model (greedy or sampled)"),
    "chat-sample": ("danube.data.chat_sample:chat_sample_main",
                    "write small SFT, preference and Oasst2 files (made here, no download) and an eval task"),
    "prepare": ("danube.corpus.prepare:prepare_main", "tokenize txt/jsonl(.gz,.zst)/parquet files or URLs into pretraining "
                "shards: a resumable datatrove pipeline, local or on SLURM"),
    "data-report": ("danube.data.data_report:data_report_main",
                    "what a pretraining run read of each source: tokens read once, twice, never, per stage"),
    "quality": ("danube.data.quality.cli:quality_main", "filter jsonl documents: heuristic rules, GBM and transformer classifiers"),
    "sweep-report": ("danube.sweep:sweep_report_main", "tabulate a train.py multirun by validation loss (Markdown, CSV, TensorBoard hparams)"),
    "settings": ("danube.config.reference:settings_main", "every setting of train.py, finetune.py and evaluate.py: "
                 "type, default, range"),
    "swap-tokenizer": ("danube.swap_tokenizer:swap_tokenizer_main", "re-map a model directory to another tokenizer (shared pieces keep their rows)"),
}


def command(name: str) -> Callable[[list[str]], int]:
    """The function behind ``danube NAME`` (imported now; tests/test_cli.py resolves every entry)."""
    module, func = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), func)


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: danube COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(lines) + "\n\n`danube COMMAND --help` for each."


def usage_error(message: str) -> int:
    """Print a bad command line as one ``danube: error:`` line on stderr.

    Args:
        message: what is wrong and, where known, the fix.

    Returns:
        2, argparse's exit code for a usage error (what each subcommand's parser returns too).
    """
    print(f"danube: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run ``danube COMMAND [ARGS...]``.

    Args:
        argv: the arguments after ``danube``; ``sys.argv[1:]`` when None.

    Returns:
        The command's exit code: 0 on success, 1 for bad input, 2 for a bad command line.
    """
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return usage_error(f"no command given; one of: {', '.join(COMMANDS)} (`danube --help` says what each does)")
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        # One line, not the whole usage: the nearest name is usually the whole fix.
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        if close:
            return usage_error(f"unknown command {name!r} (did you mean {close[0]}?); `danube --help` lists the commands")
        return usage_error(f"unknown command {name!r}; one of: {', '.join(COMMANDS)} (`danube --help` says what each does)")
    run = command(name)
    logs.setup(verbose=bool(os.environ.get("DANUBE_VERBOSE")), stream=sys.stderr)  # after the imports: see logs.setup
    try:
        return int(run(rest) or 0)
    except BrokenPipeError:  # `danube settings | head`: the reader has what it wanted, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 0
    except USER_ERRORS as err:
        if os.environ.get("DANUBE_TRACEBACK"):
            raise
        print(f"danube {name}: error: {err} (DANUBE_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
