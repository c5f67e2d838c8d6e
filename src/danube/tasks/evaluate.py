"""``python evaluate.py``: lm-eval tasks and the report's suites, perplexity, MT-Bench answers.

Writes ``output_path`` (results JSON) and a Markdown table beside it (same name, ``.md``):
for lm-eval tasks lm-eval's own table (every metric with its standard error), after the
report's layout for suites that have one. The table is also logged. The default
``output_path`` is named after the model directory (``runs/tiny/seq256/model`` ->
``runs/eval/tiny-seq256-tasks.json``); existing results are never replaced without
``overwrite=true``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from danube import logs
from danube.files import atomic_write_text
from danube.tasks.common import current_names

log = logging.getLogger(__name__)

KINDS = ("lm_eval", "perplexity", "mt_bench")
# Keys renamed in this release (old -> new): the old names work, with a warning, until the next.
RENAMED = {"model_path": "model_dir"}


def _size(model) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def model_label(model_dir: str | Path, runs_dir: str | Path) -> str:
    """A readable name that tells models apart although every model directory is called ``model``.

    Under the runs directory it is the path below it (``runs/tiny/seq256/model`` ->
    ``tiny-seq256``, ``runs/danube_chat_sft/hf`` -> ``danube_chat_sft-hf``); elsewhere the
    directory's name, or its parent's when the directory is called ``model``.
    """
    path, runs = Path(model_dir).resolve(), Path(runs_dir).resolve()
    try:
        parts = list(path.relative_to(runs).parts)
    except ValueError:
        parts = list(path.parts[-2:]) if path.name == "model" else [path.name]
    if len(parts) > 1 and parts[-1] == "model":
        parts = parts[:-1]
    return "-".join(parts) or path.name


def output_path(cfg: DictConfig, kind: str, label: str, model_name: str) -> Path:
    """The results JSON; refused up front if it, or any file the run writes beside it, exists (overwrite off)."""
    if cfg.get("output_path"):
        out = Path(cfg.output_path)
    else:
        out = Path(cfg.paths.runs_dir) / "eval" / f"{model_label(cfg.model_dir, cfg.paths.runs_dir)}-{label}.json"
    files = [out, out.with_suffix(".md")]
    if kind == "mt_bench":
        files += [out.with_name(f"{model_name}.jsonl"), out.with_name(f"{model_name}-judgments.jsonl")]
    existing = [str(f) for f in files if f.exists()]
    if existing and not cfg.get("overwrite"):
        raise FileExistsError(
            f"{', '.join(existing)} already exist(s); pass overwrite=true to replace, or output_path=ANOTHER.json "
            "(nothing was evaluated)"
        )
    return out


def _check(cfg: DictConfig) -> tuple[str, DictConfig | None]:
    """Validate the config before any model is loaded."""
    suite = cfg.get("suite")
    kind = suite.get("kind", "lm_eval") if suite else "lm_eval"
    if kind not in KINDS:
        raise ValueError(f"suite.kind={kind!r}; choose one of {KINDS}")
    from danube.model.loading import resolve_device, resolve_dtype
    from danube.model.io import check_model_dir

    if OmegaConf.is_missing(cfg, "model_dir") or cfg.model_dir is None:
        raise ValueError("model_dir=PATH is required: a danube model directory or a Hugging Face directory")
    check_model_dir(cfg.model_dir, "model_dir")
    resolve_device(cfg.device)  # the same values as `danube chat --device`: auto, cpu, cuda, cuda:N, mps
    resolve_dtype(cfg.dtype)
    if kind == "lm_eval" and not suite and not cfg.get("tasks"):
        raise ValueError("give tasks=[task,...] or suite=danube_table1|open_llm_v1|perplexity|mt_bench")
    if suite and cfg.get("tasks"):
        raise ValueError("give either tasks=[...] or suite=..., not both")
    if kind == "perplexity" and not cfg.get("data_dir"):
        raise ValueError("suite=perplexity needs data_dir=FOLDER (validation shards from `danube prepare`)")
    if kind == "mt_bench" and not cfg.get("questions"):
        raise ValueError("suite=mt_bench needs questions=PATH (FastChat's data/mt_bench/question.jsonl)")
    if cfg.get("include_path") and not Path(cfg.include_path).is_dir():
        raise FileNotFoundError(f"include_path={cfg.include_path}: not a directory")
    return kind, suite


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.model_dir`` as ``cfg`` says; returns what is written to ``output_path``."""
    cfg = current_names(cfg, RENAMED, "evaluate.py")
    kind, suite = _check(cfg)
    if cfg.get("offline", True):
        from danube.eval.suites import go_offline

        go_offline()
    import torch

    torch.manual_seed(int(cfg.seed))
    model_name = cfg.get("model_name") or model_label(cfg.model_dir, cfg.paths.runs_dir)
    label = suite.name if suite else "tasks"
    out_path = output_path(cfg, kind, label, model_name)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = logs.log_to_file(out_path.with_suffix(".log"))  # appended: a failed attempt's log stays
    start = time.perf_counter()
    try:
        result, table = _evaluate(cfg, kind, suite, model_name, label, out_path)
        result["wall_s"] = round(time.perf_counter() - start, 1)
        written = [out_path]
        atomic_write_text(out_path, json.dumps(result, indent=2, default=str) + "\n")
        if table:
            written.append(atomic_write_text(out_path.with_suffix(".md"), table))
            log.info("%s", table.rstrip("\n"))
        written += [Path(result[k]) for k in ("answers", "judgments") if result.get(k)]
        log.info("evaluate.py done in %s: %s of %s\n%s\n  log: %s", logs.duration(result["wall_s"]), label,
                 result["model_dir"], "\n".join(f"  wrote {p}" for p in written), log_file.baseFilename)
    finally:
        logs.close_file(log_file)
    return result


def _evaluate(cfg: DictConfig, kind: str, suite: DictConfig | None, model_name: str, label: str,
              out_path: Path) -> tuple[dict[str, Any], str | None]:
    """Run the suite, tasks, perplexity or MT-Bench; returns the results and their Markdown table."""
    result: dict[str, Any] = {"model_dir": str(cfg.model_dir), "model_name": model_name, "suite": label, "kind": kind}
    table = None

    if kind == "lm_eval":
        from danube.eval.suites import SuiteTask, parse_entries, results_table, run_tasks, task_manager

        if suite:
            tasks = parse_entries(OmegaConf.to_container(suite.tasks), OmegaConf.to_container(cfg.task_map) if cfg.get("task_map") else None)
        else:
            names = [cfg.tasks] if isinstance(cfg.tasks, str) else list(cfg.tasks)
            tasks = [SuiteTask(t, cfg.get("num_fewshot")) for t in names]
        # Every dataset is checked before the model is loaded: a missing one costs seconds, not a load.
        manager = task_manager([t.task for t in tasks], cfg.get("include_path"))
        from danube.eval.lm_eval_adapter import DanubeLM

        lm = DanubeLM(
            str(cfg.model_dir), tokenizer=cfg.get("tokenizer"), device=cfg.device, dtype=cfg.dtype,
            batch_size=cfg.batch_size, max_length=cfg.get("max_length"),
        )
        out = run_tasks(lm, tasks, include_path=cfg.get("include_path"), limit=cfg.get("limit"), seed=int(cfg.seed),
                        manager=manager, bootstrap_iters=int(cfg.get("bootstrap_iters", 100_000)))
        result.update(out)
        table = results_table(out)
        if suite and suite.get("table"):
            from danube.eval.tables import benchmark_table

            reference = cfg.get("reference") or suite.get("reference")
            table = benchmark_table(
                suite.table, out["scores"], model_name, size=cfg.get("model_size") or _size(lm.model),
                tokens=cfg.get("model_tokens") or "", reference=reference,
            ) + "\nEvery task and metric (lm-eval):\n\n" + table
    elif kind == "perplexity":
        from danube.eval.perplexity import perplexity

        from danube.model.loading import load_model

        # Perplexity needs no tokenizer: the shards are token ids already.
        model = load_model(cfg.model_dir, device=cfg.device, dtype=cfg.dtype, what="model_dir").eval()
        result["perplexity"] = perplexity(model, cfg.data_dir, int(cfg.seq_len), int(cfg.batch_size), cfg.get("max_blocks"))
        p = result["perplexity"]
        table = f"| Model | Data | seq_len | Tokens | Loss | Perplexity |\n|---|---|---:|---:|---:|---:|\n| {model_name} | {p['data_dir']} | {p['seq_len']} | {p['tokens']:,} | {p['loss']:.4f} | {p['perplexity']:.3f} |\n"
    else:
        table = _mt_bench(cfg, model_name, out_path, result)
    return result, table


def _mt_bench(cfg: DictConfig, model_name: str, out_path: Path, result: dict[str, Any]) -> str | None:
    from danube.eval.inference import load_for_eval
    from danube.data.records import write_jsonl
    from danube.eval.mt_bench import Judge, answer_questions, judge_answers, load_questions, tabulate
    from danube.eval.tables import mt_bench_table
    from danube.model.generate import SamplingParams

    questions = load_questions(cfg.questions, cfg.skip_categories or ())
    judge = Judge(cfg.judge.url, cfg.judge.model, cfg.judge.get("api_key_env"), cfg.judge.get("timeout_s", 120)) if cfg.judge.get("url") else None
    model, tok = load_for_eval(cfg.model_dir, cfg.get("tokenizer"), cfg.device, cfg.dtype)
    params = SamplingParams(
        max_new_tokens=int(cfg.max_new_tokens), temperature=float(cfg.temperature),
        repetition_penalty=float(cfg.repetition_penalty),
    )
    answers = answer_questions(model, tok, questions, model_name, params, int(cfg.batch_size), cfg.get("system_prompt"))
    answers_path = write_jsonl(answers, out_path.with_name(f"{model_name}.jsonl"))
    result.update(answers=str(answers_path), questions=len(questions), sampling=params.__dict__)
    log.info("wrote %d MT-Bench answers to %s (FastChat model_answer format)", len(answers), answers_path)
    if judge is None:
        return None
    judgments = judge_answers(judge, questions, answers)
    judgments_path = write_jsonl(judgments, out_path.with_name(f"{model_name}-judgments.jsonl"))
    scores = tabulate(judgments)
    result.update(judgments=str(judgments_path), judge=judge.model, scores={str(k): v for k, v in scores.items()})
    return mt_bench_table(scores, model_name)
