"""``python evaluate.py``: lm-eval tasks and the report's suites, perplexity, MT-Bench answers.

Writes ``output_path`` (results JSON) and a Markdown table beside it (same name, ``.md``):
for lm-eval tasks lm-eval's own table (every metric with its standard error), after the
report's layout for suites that have one. The table is also logged. The default
``output_path`` is named after the model directory (``runs/tiny/seq256/model`` ->
``runs/eval/tiny-seq256-tasks.json``); existing results are never replaced without
``overwrite=true``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from danube import logs
from danube.config import EvaluateConfig, SuiteConfig, typed
from danube.files import atomic_write_text

log = logging.getLogger(__name__)


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


def output_path(job: EvaluateConfig, label: str, model_name: str) -> Path:
    """The results JSON; refused up front if it, or any file the run writes beside it, exists (overwrite off)."""
    if job.output_path:
        out = Path(job.output_path)
    else:
        out = Path(job.paths.runs_dir) / "eval" / f"{model_label(job.model_dir, job.paths.runs_dir)}-{label}.json"
    files = [out, out.with_suffix(".md")]
    if job.kind == "mt_bench":
        files += [out.with_name(f"{model_name}.jsonl"), out.with_name(f"{model_name}-judgments.jsonl")]
    existing = [str(f) for f in files if f.exists()]
    if existing and not job.overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} already exist(s); pass overwrite=true to replace, or output_path=ANOTHER.json "
            "(nothing was evaluated)"
        )
    return out


def load(cfg: DictConfig) -> EvaluateConfig:
    """The door: the composed config as an :class:`EvaluateConfig`; then what it names must exist, before any load."""
    from danube.model.io import check_model_dir
    from danube.model.loading import resolve_device

    job = typed(cfg, EvaluateConfig, "evaluate.py", EvaluateConfig.REQUIRED)
    check_model_dir(job.model_dir, "model_dir")
    resolve_device(job.device)  # the same values as `danube chat --device`; a missing GPU is named here
    if job.include_path and not Path(job.include_path).is_dir():
        raise FileNotFoundError(f"include_path={job.include_path}: not a directory")
    return job


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``model_dir`` as the composed config says; returns what is written to ``output_path``."""
    job = load(cfg)
    if job.offline:
        from danube.eval.suites import go_offline

        go_offline()
    import torch

    torch.manual_seed(job.seed)
    model_name = job.model_name or model_label(job.model_dir, job.paths.runs_dir)
    label = job.suite.name if job.suite else "tasks"
    out_path = output_path(job, label, model_name)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = logs.log_to_file(out_path.with_suffix(".log"))  # appended: a failed attempt's log stays
    start = time.perf_counter()
    try:
        result, table = _evaluate(job, model_name, label, out_path)
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


def _evaluate(job: EvaluateConfig, model_name: str, label: str, out_path: Path) -> tuple[dict[str, Any], str | None]:
    """Run the suite, tasks, perplexity or MT-Bench; returns the results and their Markdown table."""
    result: dict[str, Any] = {"model_dir": job.model_dir, "model_name": model_name, "suite": label, "kind": job.kind}
    table = None
    suite: SuiteConfig | None = job.suite

    if job.kind == "lm_eval":
        from danube.eval.suites import SuiteTask, parse_entries, results_table, run_tasks, task_manager

        if suite:
            tasks = parse_entries([dataclasses.asdict(t) for t in suite.tasks], job.task_map)
        else:
            tasks = [SuiteTask(t, job.num_fewshot) for t in job.tasks]
        # Every dataset is checked before the model is loaded: a missing one costs seconds, not a load.
        manager = task_manager([t.task for t in tasks], job.include_path)
        from danube.eval.lm_eval_adapter import DanubeLM

        lm = DanubeLM(job.model_dir, tokenizer=job.tokenizer, device=job.device, dtype=job.dtype,
                      batch_size=job.batch_size, max_length=job.max_length)
        limit = int(job.limit) if job.limit is not None and job.limit >= 1 else job.limit  # below 1: a fraction
        out = run_tasks(lm, tasks, include_path=job.include_path, limit=limit, seed=job.seed, manager=manager,
                        bootstrap_iters=job.bootstrap_iters)
        result.update(out)
        table = results_table(out)
        if suite and suite.table:
            from danube.eval.tables import benchmark_table

            table = benchmark_table(
                suite.table, out["scores"], model_name, size=job.model_size or _size(lm.model),
                tokens=job.model_tokens or "", reference=job.reference or suite.reference,
            ) + "\nEvery task and metric (lm-eval):\n\n" + table
    elif job.kind == "perplexity":
        from danube.eval.perplexity import perplexity
        from danube.model.loading import load_model

        # Perplexity needs no tokenizer: the shards are token ids already.
        model = load_model(job.model_dir, device=job.device, dtype=job.dtype, what="model_dir").eval()
        result["perplexity"] = perplexity(model, job.data_dir, job.seq_len, job.batch_size, job.max_blocks)
        p = result["perplexity"]
        table = (f"| Model | Data | seq_len | Tokens | Loss | Perplexity |\n|---|---|---:|---:|---:|---:|\n"
                 f"| {model_name} | {p['data_dir']} | {p['seq_len']} | {p['tokens']:,} | {p['loss']:.4f} | "
                 f"{p['perplexity']:.3f} |\n")
    else:
        table = _mt_bench(job, model_name, out_path, result)
    return result, table


def _mt_bench(job: EvaluateConfig, model_name: str, out_path: Path, result: dict[str, Any]) -> str | None:
    from danube.data.records import write_jsonl
    from danube.eval.inference import load_for_eval
    from danube.eval.mt_bench import Judge, answer_questions, judge_answers, load_questions, tabulate
    from danube.eval.tables import mt_bench_table
    from danube.model.generate import SamplingParams

    questions = load_questions(job.questions, job.skip_categories or ())
    j = job.judge
    judge = Judge(j.url, j.model, j.api_key_env, j.timeout_s) if j.url else None
    model, tok = load_for_eval(job.model_dir, job.tokenizer, job.device, job.dtype)
    params = SamplingParams(max_new_tokens=job.max_new_tokens, temperature=job.temperature,
                            repetition_penalty=job.repetition_penalty)
    answers = answer_questions(model, tok, questions, model_name, params, job.batch_size, job.system_prompt)
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
