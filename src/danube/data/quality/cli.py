"""``danube quality``: filter documents, train the GBM and the transformer classifier."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USAGE = """usage: danube quality {filter,train-gbm,train-transformer,sample} ...

  filter              score .jsonl documents with heuristics / GBM / transformer; keep the good ones
  train-gbm           train the gradient-boosting classifier from positive and negative .jsonl
  train-transformer   train the small danube transformer classifier from positive and negative .jsonl
  sample              write labelled demo documents made here (CPython prose, generated junk)

`danube quality SUBCOMMAND --help` for each."""


def _filter(argv: list[str]) -> int:
    from danube.corpus.prepare import add_cluster_arguments, cluster_settings, print_submitted
    from danube.corpus.quality import filter_documents
    from danube.data.quality.filter import report_path
    from danube.data.quality.heuristics import GOPHER_RULES, HeuristicRules

    p = argparse.ArgumentParser(
        prog="danube quality filter",
        description="Score .jsonl documents through heuristic rules, a GBM and a transformer classifier (each "
        "optional, in that order); write the kept records with a `quality` field, a report next to the output "
        "(OUT.quality.json) and optionally pretraining shards of the kept documents.",
    )
    p.add_argument("inputs", nargs="+", help="files, directories, globs or URLs of .jsonl(.gz/.zst), .parquet, .txt")
    p.add_argument("-o", "--output", required=True,
                   help="kept records: a .jsonl file, or a directory of kept/ and rejected/ .jsonl.zst parts")
    p.add_argument("--rejected", help="with a .jsonl output: also write the dropped records with the reason (.jsonl)")
    p.add_argument("--text-field", default="text", help="field holding the document (default: text)")
    p.add_argument("--no-heuristics", action="store_true", help="skip the rule layer")
    p.add_argument("--rules", help=f"YAML of heuristic thresholds (fields of HeuristicRules; {GOPHER_RULES} "
                   "lists them all at their defaults, with their sources)")
    p.add_argument("--rule", action="append", default=[], metavar="NAME=VALUE",
                   help="override one threshold, e.g. --rule min_words=20 (repeatable)")
    p.add_argument("--gbm", help="GBM classifier directory (danube quality train-gbm)")
    p.add_argument("--gbm-threshold", type=float, default=0.5, help="keep when P(good) >= this (default 0.5)")
    p.add_argument("--transformer", help="transformer classifier directory (danube quality train-transformer, "
                   "or a local Hugging Face sequence-classification directory)")
    p.add_argument("--transformer-threshold", type=float, default=0.5, help="keep when P(good) >= this")
    p.add_argument("--hf-label", type=int, default=1, help="Hugging Face classifier: index of the good label")
    p.add_argument("--tokenizer", help="SentencePiece model: count tokenizer tokens (and needed by --shards)")
    p.add_argument("--shards", help="also tokenize the kept documents into this directory (danube prepare)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="--shards: documents held out")
    p.add_argument("--workers", type=int, default=2, help="tasks run at once (the output does not depend on it)")
    p.add_argument("--tasks", type=int, default=None, help="units of work (default: a 16th of the input each, "
                   "1-64 MB); a directory output has one part per task")
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed records")
    p.add_argument("--batch-size", type=int, default=256, help="documents scored together")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--verbose", action="store_true", help="datatrove's per-task log lines on the console")
    add_cluster_arguments(p)
    args = p.parse_args(argv)
    if args.no_heuristics and (args.rules or args.rule):
        raise ValueError("--rules/--rule given with --no-heuristics")
    rules = None if args.no_heuristics else HeuristicRules.load(args.rules, args.rule)
    report = filter_documents(
        args.inputs, args.output, args.text_field, rules, args.gbm, args.gbm_threshold, args.transformer,
        args.transformer_threshold, args.rejected, args.tokenizer, args.shards, args.val_fraction, args.workers,
        args.batch_size, args.hf_label, args.overwrite, args.tasks, args.skip_bad, args.executor,
        cluster_settings(p, args), args.verbose,
    )
    if "submitted" in report:
        print_submitted(report["submitted"], args.output)
        return 0
    unit = "tokens" if args.tokenizer else "words"
    print(f"{'layer':<12} {'seen docs':>10} {'kept docs':>10} {'seen ' + unit:>14} {'kept ' + unit:>14}")
    for layer in report["layers"]:
        print(f"{layer['layer']:<12} {layer['seen']['documents']:>10,} {layer['kept']['documents']:>10,} "
              f"{layer['seen']['tokens']:>14,} {layer['kept']['tokens']:>14,}")
        for rule, n in layer.get("failed_by_rule", {}).items():
            if n:
                print(f"  {rule:<26} {n:>8,} documents")
    print(f"kept {report['kept']['documents']:,} of {report['input']['documents']:,} documents -> {args.output}")
    print(f"report: {report_path(args.output) if args.output.endswith('.jsonl') else Path(args.output) / 'quality.json'}")
    if "shards" in report:
        t = report["shards"]["totals"]
        print(f"shards: {t['train']['tokens']:,} train + {t['val']['tokens']:,} val tokens -> {args.shards}")
    return 0


def _training_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--positive", nargs="+", required=True, help=".jsonl files of good documents (label 1)")
    p.add_argument("--negative", nargs="+", required=True, help=".jsonl files of bad documents (label 0)")
    p.add_argument("--out", required=True, help="classifier directory to write")
    p.add_argument("--text-field", default="text", help="field holding the document (default: text)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out to report accuracy/AUC")
    p.add_argument("--seed", type=int, default=0)
    return p


def _print_metrics(report: dict, out: str) -> None:
    for split in ("train", "val"):
        if split in report:
            m = report[split]
            auc = f", AUC {m['auc']:.4f}" if "auc" in m else ""
            print(f"{split}: {m['examples']:,} examples, accuracy {m['accuracy']:.4f}{auc}")
    print(f"wrote {out}")


def _train_gbm(argv: list[str]) -> int:
    from danube.data.quality.classifier import labelled
    from danube.data.quality.gbm import train_gbm

    p = _training_parser("danube quality train-gbm", "Train a HistGradientBoostingClassifier on cheap text "
                         "features of positive (good) and negative (bad) documents.")
    p.add_argument("--max-iter", type=int, default=200, help="boosting rounds")
    p.add_argument("--learning-rate", type=float, default=0.1)
    args = p.parse_args(argv)
    texts, labels = labelled(args.positive, args.negative, args.text_field)
    scorer, report = train_gbm(texts, labels, args.val_fraction, args.seed, args.max_iter, args.learning_rate)
    scorer.save(args.out, {"trained": report, "positive": args.positive, "negative": args.negative})
    _print_metrics(report, args.out)
    return 0


def _train_transformer(argv: list[str]) -> int:
    from danube.data.quality.classifier import labelled
    from danube.data.quality.transformer import classifier_config, train_transformer
    from danube.data.tokenizer import Tokenizer

    p = _training_parser("danube quality train-transformer", "Train a small danube transformer (mean-pooled, "
                         "one logit) on positive (good) and negative (bad) documents.")
    p.add_argument("--tokenizer", required=True, help="SentencePiece model (copied into the classifier)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens read from the start of each document")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-kv-head", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    tok = Tokenizer(args.tokenizer)
    cfg = classifier_config(tok.vocab_size, args.max_tokens, args.n_layer, args.n_embd, args.n_head, args.n_kv_head)
    texts, labels = labelled(args.positive, args.negative, args.text_field)
    scorer, report = train_transformer(texts, labels, tok, cfg, args.max_tokens, args.steps, args.batch_size,
                                       args.lr, val_fraction=args.val_fraction, seed=args.seed)
    scorer.save(args.out, {"trained": report, "positive": args.positive, "negative": args.negative})
    _print_metrics(report, args.out)
    return 0


def _sample(argv: list[str]) -> int:
    from danube.data.quality.sample import write_sample

    p = argparse.ArgumentParser(
        prog="danube quality sample",
        description="Write good.jsonl (prose bundled with CPython), junk.jsonl (generated: random characters, "
        "symbol soup, boilerplate, repetition, word salad) and web.jsonl (both, shuffled) to try the filter on.",
    )
    p.add_argument("out_dir", help="directory to write the three files to")
    p.add_argument("--good", type=int, default=150, help="prose documents")
    p.add_argument("--junk", type=int, default=150, help="generated bad documents")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    paths = write_sample(args.out_dir, args.good, args.junk, args.seed)
    for name, path in paths.items():
        print(f"wrote {path}")
    return 0


SUBCOMMANDS = {"filter": _filter, "train-gbm": _train_gbm, "train-transformer": _train_transformer, "sample": _sample}


def quality_main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] not in SUBCOMMANDS:
        print(f"danube quality: unknown subcommand {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return SUBCOMMANDS[argv[0]](argv[1:])
