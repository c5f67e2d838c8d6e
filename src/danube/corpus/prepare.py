"""``danube prepare``: raw text into litdata token shards, as a resumable datatrove pipeline.

The pipeline is ``[ReadUnits, TokenizeShards]`` (:mod:`danube.corpus.steps`) run by a datatrove
executor over the plan's tasks (:mod:`danube.corpus.plan`); then one merge indexes every
task's chunks as one dataset:

    OUT/train/   index.json + chunk-TTTTT-N.bin   (task TTTTT's chunks, tasks in input order)
    OUT/val/     held-out documents (chosen per document by a seeded hash of its text)
    OUT/manifest.json

While it runs, the work lives beside the output in ``OUT.partial/`` (the plan, each task's
shards, datatrove's logs and completion records). Re-running the same command after a kill
skips the finished tasks and redoes the unfinished ones from their start; the output is the
same bytes as an uninterrupted run's, for any number of workers. ``OUT`` appears (or is
replaced, with ``overwrite``) only when the whole dataset is assembled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from danube.corpus.inputs import BadRecord, fingerprint, list_inputs, local_paths, plan_units
from danube.corpus.plan import PLAN, group_units, load_plan, same_run, task_bytes
from danube.corpus.steps import SPLITS, ReadUnits, TokenizeShards, error_file, task_dir
from danube.data.prepare import FORMAT, MANIFEST
from danube.data.tokenizer import Tokenizer
from danube.files import atomic_write_text, check_output_dir, remove_stale_temps, replace_dir

log = logging.getLogger(__name__)

EXECUTORS = ("local", "slurm")


def check_run_options(executor: str, tasks: int | None) -> None:
    """The options every corpus command takes: where the tasks run, how many there are."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r}; allowed: {', '.join(EXECUTORS)}")
    if tasks is not None and tasks < 1:
        raise ValueError(f"tasks must be a positive number, got {tasks}")


def work_dir_of(output_dir: Path) -> Path:
    return output_dir.with_name(output_dir.name + ".partial")


def quiet_datatrove(verbose: bool) -> None:
    """datatrove logs through loguru, every task's INFO lines on stderr: keep the console to warnings."""
    import datatrove.utils.logging  # noqa: F401  (its import installs datatrove's console handler: first)
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="INFO" if verbose else "WARNING", format="{time:HH:mm:ss} {level} datatrove: {message}")


def local_executor(pipeline, tasks: int, workers: int, logging_dir: Path, verbose: bool):
    import multiprocessing

    from datatrove.executor import LocalPipelineExecutor

    class Local(LocalPipelineExecutor):
        def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
            # local_rank only picks the console level of a task's log (0: INFO, else ERROR); the
            # task's whole log is in logging_dir/logs either way.
            try:
                return super()._run_for_rank(rank, local_rank if verbose else 1, node_rank)
            finally:
                quiet_datatrove(verbose)  # a task run in this process left its own console handler

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return Local(pipeline, tasks=tasks, workers=max(1, min(workers, tasks)), logging_dir=str(logging_dir),
                 start_method=method, skip_completed=True)


def forget_unfinished(work: Path, tasks: int) -> int:
    """Drop datatrove's completion record of every task whose shards are not committed; count the committed."""
    done = 0
    for rank in range(tasks):
        record = work / "datatrove" / "completions" / f"{rank:05d}"
        if task_dir(work, rank).is_dir() and not error_file(work, rank).exists():
            done += 1
        else:
            record.unlink(missing_ok=True)
    return done


def make_plan(work: Path, key: dict, files: list[str], text_field: str, tasks: int | None, **run) -> dict:
    total = sum(f["size"] for f in key["inputs"].values())
    target = task_bytes(total, tasks)
    units = plan_units(files, text_field, target)
    groups = group_units(units, tasks, target)
    plan = {"key": key, **run, "units": [u.to_dict() for u in units], "tasks": groups}
    if tasks and len(groups) < tasks:
        log.info("%d tasks asked for, %d units of work in the input: %d tasks", tasks, len(units), len(groups))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    atomic_write_text(work / PLAN, json.dumps(plan, indent=1) + "\n")
    return plan


def open_plan(work: Path, key: dict, files: list[str], text_field: str, tasks: int | None, **run) -> dict:
    """The plan of an unfinished run with the same ``key`` (inputs and settings) in ``work``, or a new one."""
    if (work / PLAN).is_file():
        plan = load_plan(work)
        if same_run(plan, key):
            return plan
        log.warning("%s: the inputs or settings changed since that unfinished run; starting it over", work)
    return make_plan(work, key, files, text_field, tasks, **run)


def start_message(doing: str, work: Path, plan: dict, files: list[str], executor: str, workers: int) -> int:
    """Forget unfinished tasks, log what the run does; returns the number of tasks."""
    n = len(plan["tasks"])
    done = forget_unfinished(work, n)
    log.info("%s %d files (%.1f MB) in %d tasks%s, %s", doing, len(files), sum(u["nbytes"] for u in plan["units"]) / 1e6,
             n, f" ({done} done before)" if done else "",
             "on SLURM" if executor == "slurm" else f"{max(1, min(workers, n - done or 1))} at a time")
    return n


def _merge(work: Path, plan: dict) -> Path:
    """Every task's chunks into one dataset (``WORK/dataset``): chunks moved and renamed, one index per split."""
    files, settings, dtype = list(plan["key"]["inputs"]), plan["settings"], plan["dtype"]
    tok = Tokenizer(plan["tokenizer_path"])
    out = work / "dataset"
    shutil.rmtree(out, ignore_errors=True)
    per_source = [{"path": f, "empty_documents": 0, "bad_lines": 0, **{s: {"documents": 0, "tokens": 0} for s in SPLITS}}
                  for f in files]
    indexes: dict[str, dict] = {s: {"chunks": [], "config": None} for s in SPLITS}
    named_bad: list[str] = []
    for rank in range(len(plan["tasks"])):
        done = task_dir(work, rank)
        summary = json.loads((done / "shards.json").read_text())
        for source, counts in summary["read"]["sources"].items():
            per_source[int(source)]["empty_documents"] += counts["empty_documents"]
            per_source[int(source)]["bad_lines"] += counts["bad_records"]
        named_bad += summary["read"].get("bad_records", [])
        for source, counts in summary["sources"].items():
            for s in SPLITS:
                for k in ("documents", "tokens"):
                    per_source[int(source)][s][k] += counts[s][k]
        for s in SPLITS:
            index_file = done / s / "index.json"
            if not index_file.exists():
                continue
            index = json.loads(index_file.read_text())
            indexes[s]["config"] = indexes[s]["config"] or index["config"]
            (out / s).mkdir(parents=True, exist_ok=True)
            for i, chunk in enumerate(index["chunks"]):
                name = f"chunk-{rank:05d}-{i}.bin"
                os.replace(done / s / chunk["filename"], out / s / name)
                indexes[s]["chunks"].append({**chunk, "filename": name})
            index_file.unlink()
    totals = {s: {"documents": sum(p[s]["documents"] for p in per_source),
                  "tokens": sum(p[s]["tokens"] for p in per_source),
                  "chunks": len(indexes[s]["chunks"])} for s in SPLITS}
    if totals["train"]["tokens"] == 0:
        raise ValueError(f"no training documents in {files} (all empty, bad or held out)")
    for s in SPLITS:
        (out / s).mkdir(parents=True, exist_ok=True)
        if indexes[s]["chunks"]:
            index = {"chunks": indexes[s]["chunks"], "config": indexes[s]["config"], "updated_at": str(int(time.time()))}
            (out / s / "index.json").write_text(json.dumps(index, sort_keys=True))
    import danube
    import datatrove

    for message in named_bad:
        log.warning("skipped %s", message)
    manifest = {
        "format": FORMAT,
        "danube_version": danube.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer": {"path": str(tok.model_file.resolve()), "checksum": tok.checksum,
                      "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id},
        "dtype": dtype,
        **settings,
        "pipeline": {"engine": f"datatrove {datatrove.__version__}" if hasattr(datatrove, "__version__")
                     else "datatrove", "tasks": len(plan["tasks"]), "units": len(plan["units"])},
        "input_bytes": sum(u["nbytes"] for u in plan["units"]),
        "sources": per_source,
        "totals": {**totals,
                   "documents": totals["train"]["documents"] + totals["val"]["documents"],
                   "tokens": totals["train"]["tokens"] + totals["val"]["tokens"],
                   "empty_documents": sum(p["empty_documents"] for p in per_source),
                   "bad_lines": sum(p["bad_lines"] for p in per_source)},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def prepare(
    inputs: list[str | Path],
    output_dir: str | Path,
    tokenizer: str | Path,
    text_field: str = "text",
    val_fraction: float = 0.01,
    num_workers: int = 2,
    chunk_bytes: str = "64MB",
    skip_bad: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    tasks: int | None = None,
    verbose: bool = False,
    executor: str = "local",
    slurm: dict | None = None,
) -> dict:
    """Tokenize ``inputs`` into ``output_dir/{train,val}`` litdata shards plus ``manifest.json``.

    Args:
        inputs: Files, directories (searched recursively), globs or fsspec URLs of .txt, .jsonl,
            .jsonl.gz, .jsonl.zst, .parquet (:mod:`danube.corpus.inputs`).
        output_dir: Where the prepared dataset goes; must be absent or empty unless ``overwrite``.
        tokenizer: A SentencePiece ``.model`` file (or a directory holding ``tokenizer.model``).
        text_field: JSON field / parquet column holding the text.
        val_fraction: Expected fraction of documents held out for validation.
        num_workers: Tasks run at once on this machine; the output does not depend on it.
        chunk_bytes: Size of each shard file, litdata style (``"64MB"``).
        skip_bad: Skip (and count, per input file) malformed records instead of stopping.
        seed: Salt of the per-document train/val hash.
        overwrite: Replace an existing non-empty ``output_dir`` (only once the new one is complete).
        tasks: Units of work of the pipeline (datatrove tasks); the output depends on it. Default:
            about a 16th of the input each, between 1 MB and 64 MB.
        verbose: datatrove's INFO lines on the console (they are in ``OUT.partial/datatrove/logs``).
        executor: ``local`` (this machine, ``num_workers`` at a time) or ``slurm``: the tasks are
            submitted as a job array and the merge as a job after it (``slurm``: ``partition``,
            ``time``, ``cpus_per_task``, ``mem_per_cpu_gb``, ``qos``, ``max_running``,
            ``sbatch_args``); this call returns ``{"submitted": {job ids}}`` at once. ``OUT``
            and its parent must be on a filesystem every node sees.

    Returns:
        The manifest (also written to ``output_dir/manifest.json``).

    Raises:
        ValueError: A malformed record (``FILE:LINE: what``) without ``skip_bad`` (the finished
            tasks are kept for the rerun); bad arguments; an output that would be clobbered.
    """
    t0 = time.perf_counter()
    output_dir = Path(output_dir)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    check_run_options(executor, tasks)
    check_output_dir(output_dir, overwrite=overwrite, inputs=[*local_paths(inputs), tokenizer])
    remove_stale_temps(output_dir.parent)
    tok = Tokenizer(tokenizer)
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "int32"
    files = list_input_files(inputs)
    settings = {"text_field": text_field, "val_fraction": val_fraction, "seed": seed}
    key = {"inputs": {f: fingerprint(f) for f in files}, **settings, "skip_bad": skip_bad,
           "chunk_bytes": chunk_bytes, "tokenizer": tok.checksum, "tasks": tasks}
    work = work_dir_of(output_dir)
    plan = open_plan(work, key, files, text_field, tasks, settings=settings, dtype=dtype,
                     tokenizer_path=str(tok.model_file.resolve()), output_dir=str(output_dir.resolve()))
    n = start_message("preparing", work, plan, files, executor, num_workers)
    quiet_datatrove(verbose)
    import litdata.streaming.writer  # noqa: F401  (imported once here, not in every forked worker: ~4 s each)

    pipeline = [ReadUnits(str(work), text_field, skip_bad),
                TokenizeShards(str(work), str(tok.model_file), val_fraction, seed, chunk_bytes, dtype)]
    if executor == "slurm":
        return submit(pipeline, work, n, slurm or {})
    local_executor(pipeline, n, num_workers, work / "datatrove", verbose).run()
    manifest = finish(work)
    t = manifest["totals"]
    if t["bad_lines"]:
        log.warning("skipped %d malformed records (counts per file in %s)", t["bad_lines"], output_dir / MANIFEST)
    if t["empty_documents"]:
        log.info("skipped %d empty documents", t["empty_documents"])
    elapsed = time.perf_counter() - t0
    log.info("wrote %s: train %d tokens (%d docs), val %d tokens (%d docs) in %.1fs (%.2f MB/s)", output_dir,
             t["train"]["tokens"], t["train"]["documents"], t["val"]["tokens"], t["val"]["documents"], elapsed,
             manifest["input_bytes"] / 1e6 / max(elapsed, 1e-9))
    return manifest


def finish(work: Path, keep_logs: bool = False) -> dict:
    """Check every task, merge their shards into the dataset and move it to the output; returns the manifest.

    With ``keep_logs`` (a cluster run) datatrove's logs stay in ``work``; the rest of it goes.
    """
    plan = load_plan(work)
    check_tasks(work, len(plan["tasks"]))
    dataset = _merge(work, plan)
    manifest = json.loads((dataset / MANIFEST).read_text())
    install(dataset, Path(plan["output_dir"]))
    clean_work(work, keep_logs)
    return manifest


def install(built: Path, output: Path) -> None:
    """Move the finished output directory into place (an empty one there is taken, a full one replaced)."""
    if output.exists() and not any(output.iterdir()):
        output.rmdir()
    replace_dir(built, output)


def clean_work(work: Path, keep_logs: bool) -> None:
    """After the merge: all of ``work`` goes, or (a cluster run) all but datatrove's and SLURM's logs."""
    if keep_logs:
        for name in ("tasks", "errors"):
            shutil.rmtree(work / name, ignore_errors=True)
        (work / PLAN).unlink()  # a rerun starts afresh: what the plan described is in the output now
    else:
        shutil.rmtree(work, ignore_errors=True)


def check_tasks(work: Path, n: int) -> None:
    """Raise unless every task of the plan committed its output: the first bad record, or the missing tasks."""
    failed = sorted(work.glob("errors/*.txt"))
    if failed:
        forget_unfinished(work, n)
        first = failed[0].read_text().strip()
        more = f"; {len(failed) - 1} more task(s) stopped likewise ({work / 'errors'})" if len(failed) > 1 else ""
        raise BadRecord(f"{first} (pass --skip-bad to skip and count such records){more}")
    missing = [r for r in range(n) if not task_dir(work, r).is_dir()]
    if missing:
        raise RuntimeError(f"{len(missing)} task(s) of {work} ended without their shards (task {missing[0]}: "
                           f"see {work / 'datatrove' / 'logs'}); run the command again to redo them")


class Merge(PipelineStep):
    """The last job of a cluster run: ``finish(work_dir, keep_logs=True)`` once every task is done.

    ``finish`` is ``"module:function"``: :func:`finish` for ``prepare``,
    :func:`danube.corpus.quality.finish` for the quality filter.
    """

    name = "danube merge"
    type = "🔗 - MERGE"

    def __init__(self, work_dir: str, finish: str = "danube.corpus.prepare:finish") -> None:
        super().__init__()
        self.work_dir, self.finish = str(work_dir), finish

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import importlib

        from datatrove.utils.logging import logger

        module, function = self.finish.split(":")
        getattr(importlib.import_module(module), function)(Path(self.work_dir), keep_logs=True)
        logger.info(f"merged the tasks of {self.work_dir}")
        yield from ()


def submit(pipeline, work: Path, tasks: int, slurm: dict, finish: str = "danube.corpus.prepare:finish") -> dict:
    """Submit the tasks as a SLURM job array and the merge as a job after it (datatrove's SLURM executor)."""
    from datatrove.executor import SlurmPipelineExecutor

    if not slurm.get("partition"):
        raise ValueError("--executor slurm needs --partition")
    common = dict(time=slurm.get("time", "24:00:00"), partition=slurm["partition"], qos=slurm.get("qos") or "",
                  cpus_per_task=slurm.get("cpus_per_task", 1), mem_per_cpu_gb=slurm.get("mem_per_cpu_gb", 2),
                  sbatch_args=slurm.get("sbatch_args") or {}, skip_completed=True)
    tokenize = SlurmPipelineExecutor(pipeline, tasks=tasks, job_name="danube-prepare", logging_dir=str(work / "datatrove"),
                                     slurm_logs_folder=str(work / "slurm_logs"), workers=slurm.get("max_running", -1),
                                     **common)
    merge = SlurmPipelineExecutor([Merge(str(work), finish)], tasks=1, job_name="danube-prepare-merge",
                                  logging_dir=str(work / "merge"), slurm_logs_folder=str(work / "slurm_logs" / "merge"),
                                  depends=tokenize, **common)
    merge.run()
    jobs = {"tasks": str(tokenize.job_id), "merge": str(merge.job_id), "work_dir": str(work)}
    log.debug("submitted SLURM job %s (%d tasks) and %s (the merge, after it); the dataset appears when %s ends. "
             "Logs: %s. Run the same command again to submit what is unfinished.", jobs["tasks"], tasks,
             jobs["merge"], jobs["merge"], work)
    return {"submitted": jobs}


def list_input_files(inputs) -> list[str]:
    files = list_inputs(list(inputs))
    if not files:
        raise ValueError("no input files given")
    return files


def add_cluster_arguments(parser) -> None:
    """The ``--executor slurm`` options of the corpus commands (datatrove's SLURM executor)."""
    cluster = parser.add_argument_group("on a SLURM cluster (--executor slurm: submit and return)")
    cluster.add_argument("--executor", choices=EXECUTORS, default="local", help="where the tasks run")
    cluster.add_argument("--partition", help="SLURM partition of the jobs")
    cluster.add_argument("--time", default="24:00:00", help="time limit of each task's job")
    cluster.add_argument("--cpus-per-task", type=int, default=1, help="CPUs of each task's job")
    cluster.add_argument("--mem-per-cpu-gb", type=int, default=2, help="memory per CPU of each task's job")
    cluster.add_argument("--qos", default="", help="SLURM QOS of the jobs (default: the cluster's)")
    cluster.add_argument("--max-running", type=int, default=-1, help="tasks running at once (default: no limit)")
    cluster.add_argument("--sbatch-arg", action="append", default=[], metavar="KEY=VALUE",
                         help="another #SBATCH option, e.g. --sbatch-arg account=proj (repeatable)")


def cluster_settings(parser, args) -> dict:
    bad = [a for a in args.sbatch_arg if "=" not in a]
    if bad:
        parser.error(f"--sbatch-arg {bad[0]!r}: expected KEY=VALUE")
    return {"partition": args.partition, "time": args.time, "cpus_per_task": args.cpus_per_task,
            "mem_per_cpu_gb": args.mem_per_cpu_gb, "qos": args.qos, "max_running": args.max_running,
            "sbatch_args": dict(a.split("=", 1) for a in args.sbatch_arg)}


def print_submitted(jobs: dict, output: str) -> None:
    """What a corpus command submitted to SLURM, and where its output will appear."""
    print(f"submitted SLURM job {jobs['tasks']} (the tasks) and {jobs['merge']} (the merge, after them)")
    print(f"{output} appears when job {jobs['merge']} ends; logs in {jobs['work_dir']}")


def prepare_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="danube prepare",
        description="Tokenize .txt/.jsonl/.jsonl.gz/.jsonl.zst/.parquet files (directories, globs, fsspec URLs) "
        "into litdata token shards: OUT/train, OUT/val and OUT/manifest.json. A datatrove pipeline: "
        "re-running the same command after a kill continues where it stopped.",
    )
    parser.add_argument("inputs", nargs="+", help="input files, directories, globs or URLs (s3://, hf://datasets/...)")
    parser.add_argument("-o", "--output", required=True, help="output directory")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    parser.add_argument("--text-field", default="text", help="JSON field / parquet column with the text")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents held out")
    parser.add_argument("--workers", type=int, default=2, help="tasks run at once (the output does not depend on it)")
    parser.add_argument("--tasks", type=int, default=None,
                        help="units of work (default: a 16th of the input each, 1-64 MB); the output depends on it")
    parser.add_argument("--chunk-bytes", default="64MB", help="size of each shard file")
    parser.add_argument("--seed", type=int, default=0, help="salt of the train/val split")
    parser.add_argument("--skip-bad", action="store_true", help="skip and count malformed records")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--verbose", action="store_true", help="datatrove's per-task log lines on the console")
    add_cluster_arguments(parser)
    args = parser.parse_args(argv)
    slurm = cluster_settings(parser, args)
    m = prepare(args.inputs, args.output, args.tokenizer, args.text_field, args.val_fraction, args.workers,
                args.chunk_bytes, args.skip_bad, args.seed, args.overwrite, args.tasks, args.verbose,
                executor=args.executor, slurm=slurm)
    if "submitted" in m:
        print_submitted(m["submitted"], args.output)
        return 0
    t = m["totals"]
    print(f"train: {t['train']['tokens']:,} tokens in {t['train']['documents']:,} documents")
    print(f"val:   {t['val']['tokens']:,} tokens in {t['val']['documents']:,} documents")
    if t["bad_lines"] or t["empty_documents"]:
        print(f"skipped: {t['bad_lines']:,} malformed records, {t['empty_documents']:,} empty documents")
    print(f"wrote {args.output}")
    return 0
