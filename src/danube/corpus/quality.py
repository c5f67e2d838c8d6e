"""``danube quality filter`` as a datatrove pipeline: Danube2's rules, GBM and transformer over tasks.

The pipeline is ``[ReadUnits(records=True), QualityLayers, WriteKept]`` over the plan's tasks
(:mod:`danube.corpus.plan`), run by datatrove's local or SLURM executor like ``danube prepare``
(:mod:`danube.corpus.prepare`: the same ``OUT.partial`` work directory, commit by rename,
resume). :class:`QualityLayers` scores a task's documents in batches through the layers of
:mod:`danube.data.quality.filter`, puts what each measured in ``metadata["quality"]``, passes
the kept documents on and writes the dropped ones (with the reason) to the task's
``rejected.jsonl.zst``, its counts per layer and rule to the task's ``quality.json``;
:class:`WriteKept` writes the kept records to ``kept.jsonl.zst`` and commits the task;
:func:`finish` gathers the parts and sums the counts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from danube.corpus.steps import task_dir


class ZstdJsonl:
    """Records appended to a ``.jsonl.zst`` file, one JSON object per line."""

    def __init__(self, path: Path) -> None:
        import zstandard

        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "wb")
        self._stream = zstandard.ZstdCompressor(level=3).stream_writer(self._file)

    def write(self, record: dict) -> None:
        self._stream.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    def close(self) -> None:
        self._stream.close()  # closes the file too


def output_record(doc) -> dict:
    """The input record of a scored document, with what the layers measured as its ``quality`` field."""
    return {**doc.metadata.get("record", {"text": doc.text}), "quality": doc.metadata["quality"]}


class QualityLayers(PipelineStep):
    """Score documents through the enabled layers; yield the kept ones, write the dropped ones."""

    name = "danube quality layers"
    type = "🔻 - FILTER"

    def __init__(self, work_dir: str, rules: dict | None, gbm: str | None = None, gbm_threshold: float = 0.5,
                 transformer: str | None = None, transformer_threshold: float = 0.5, hf_label: int = 1,
                 batch_size: int = 256, tokenizer: str | None = None, keep_rejected: bool = True) -> None:
        super().__init__()
        self.work_dir, self.rules = str(work_dir), rules
        self.gbm, self.gbm_threshold = gbm, gbm_threshold
        self.transformer, self.transformer_threshold, self.hf_label = transformer, transformer_threshold, hf_label
        self.batch_size, self.tokenizer, self.keep_rejected = batch_size, tokenizer, keep_rejected

    def _layers(self) -> tuple[list, Any]:
        from danube.data.quality.filter import _Layer, load_scorer
        from danube.data.quality.heuristics import HeuristicRules

        rules = HeuristicRules(**self.rules) if self.rules is not None else None
        layers = []
        if rules is not None:
            layers.append(_Layer("heuristics", info={"rules": rules.to_dict()},
                                 failed_by_rule=dict.fromkeys(rules.rule_names(), 0)))
        if self.gbm:
            layers.append(_Layer("gbm", info={"model": self.gbm, "threshold": self.gbm_threshold},
                                 scorer=load_scorer(self.gbm, "gbm"), threshold=self.gbm_threshold))
        if self.transformer:
            layers.append(_Layer("transformer", info={"model": self.transformer, "threshold": self.transformer_threshold},
                                 scorer=load_scorer(self.transformer, "transformer", hf_label=self.hf_label),
                                 threshold=self.transformer_threshold))
        return layers, rules

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from danube.data.quality.filter import _apply, _Count

        layers, rules = self._layers()
        tok = None
        if self.tokenizer:
            from danube.data.tokenizer import Tokenizer

            tok = Tokenizer(self.tokenizer)
        tmp = task_dir(self.work_dir, rank, tmp=True)
        rejected = None
        total, kept_total = _Count(), _Count()
        batch = []

        def flush():
            nonlocal rejected
            texts = [d.text for d in batch]
            lengths = [len(ids) for ids in tok.encode_batch(texts)] if tok else [len(t.split()) for t in texts]
            quality: list[dict[str, Any]] = [{} for _ in batch]
            stats: list = [None] * len(batch)
            alive = list(range(len(batch)))
            for n in lengths:
                total.add(n)
            for layer in layers:
                for i in alive:
                    layer.seen.add(lengths[i])
                if not alive:
                    continue
                alive = _apply(layer, alive, texts, stats, quality, rules)
                for i in alive:
                    layer.kept.add(lengths[i])
            keep = set(alive)
            for i, doc in enumerate(batch):
                quality[i]["kept"] = i in keep
                doc.metadata["quality"] = quality[i]
                if i in keep:
                    kept_total.add(lengths[i])
                    self.stat_update("kept")
                    yield doc
                else:
                    self.stat_update("dropped")
                    if self.keep_rejected:
                        if rejected is None:
                            rejected = ZstdJsonl(tmp / "rejected.jsonl.zst")
                        rejected.write(output_record(doc))
            batch.clear()

        for doc in data or ():
            batch.append(doc)
            if len(batch) >= self.batch_size:
                yield from flush()
        if batch:
            yield from flush()
        if rejected is not None:
            rejected.close()
        if tmp.is_dir():
            (tmp / "quality.json").write_text(json.dumps({
                "input": vars(total), "kept": vars(kept_total), "layers": [layer.to_dict() for layer in layers],
            }, indent=1) + "\n")


class WriteKept(PipelineStep):
    """The writer: kept records (with their ``quality``) into the task's ``kept.jsonl.zst``; commits the task."""

    name = "danube kept records"
    type = "💽 - WRITER"

    def __init__(self, work_dir: str) -> None:
        super().__init__()
        self.work_dir = str(work_dir)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from danube.corpus.steps import commit_task, task_failed

        tmp = task_dir(self.work_dir, rank, tmp=True)
        kept = None
        for doc in data or ():
            if kept is None:
                kept = ZstdJsonl(tmp / "kept.jsonl.zst")
            kept.write(output_record(doc))
            self.stat_update("written")
        if kept is not None:
            kept.close()
        if task_failed(self.work_dir, rank):
            return  # the reader stopped at a bad record: nothing of this task is kept
        commit_task(self.work_dir, rank)
        yield from ()


def _merge_layers(per_task: list[list[dict]]) -> list[dict]:
    """Every task's layer counts summed; mean scores weighted by the documents each task's layer saw."""
    import copy

    merged: list[dict] = []
    for layers in per_task:
        for i, layer in enumerate(layers):
            score = layer.get("mean_score", 0.0) * layer["seen"]["documents"]
            if i == len(merged):
                merged.append({**copy.deepcopy(layer), "_score": score})
                continue
            m = merged[i]
            for part in ("seen", "kept", "dropped"):
                for k in ("documents", "tokens"):
                    m[part][k] += layer[part][k]
            for rule, n in layer.get("failed_by_rule", {}).items():
                m["failed_by_rule"][rule] += n
            m["_score"] += score
    for m in merged:
        score = m.pop("_score")
        if m["layer"] != "heuristics" and m["seen"]["documents"]:  # as _Layer.to_dict gives it
            m["mean_score"] = round(score / m["seen"]["documents"], 6)
    return merged


def _concatenate(parts: list[Path], out: Path) -> None:
    """``.jsonl.zst`` parts decompressed, in order, into ``out`` (written whole or not at all)."""
    import shutil

    import zstandard

    from danube.files import atomic_file

    with atomic_file(out) as tmp, open(tmp, "wb") as f:
        for part in parts:
            with open(part, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
                shutil.copyfileobj(reader, f)


def finish(work: Path, keep_logs: bool = False) -> dict:
    """Check every task, gather kept and rejected records and the counts; returns the report.

    A ``.jsonl`` output is one file (the parts decompressed in task order), with the rejected
    records in their own file when asked; a directory output holds ``kept/`` and ``rejected/``
    as ``part-TTTTT.jsonl.zst`` (task TTTTT's records, tasks in input order) and ``quality.json``.
    """
    import time

    import danube
    from danube.corpus.plan import load_plan
    from danube.corpus.prepare import check_tasks, clean_work, install
    from danube.data.quality.filter import REPORT_FORMAT, report_path
    from danube.files import atomic_write_text

    plan = load_plan(work)
    run = plan["run"]
    n = len(plan["tasks"])
    check_tasks(work, n)
    tasks = [task_dir(work, r) for r in range(n)]
    summaries = [json.loads((t / "quality.json").read_text()) for t in tasks]
    reads = [json.loads((t / "read.json").read_text()) if (t / "read.json").exists() else {"sources": {}}
             for t in tasks]
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "danube_version": danube.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": list(plan["key"]["inputs"]),
        "output": run["output"],
        "rejected": run["rejected"],
        "text_field": plan["key"]["text_field"],
        "token_unit": f"tokens of {run['tokenizer']}" if run["tokenizer"] else "whitespace words",
        "input": {k: sum(s["input"][k] for s in summaries) for k in ("documents", "tokens")},
        "layers": _merge_layers([s["layers"] for s in summaries]),
        "kept": {k: sum(s["kept"][k] for s in summaries) for k in ("documents", "tokens")},
        "bad_lines": sum(c["bad_records"] for r in reads for c in r["sources"].values()),
        "pipeline": {"engine": "datatrove", "tasks": n, "units": len(plan["units"])},
    }
    output = Path(run["output"])
    if run["directory"]:
        out = work / "dataset"
        for kind in ("kept", "rejected"):
            (out / kind).mkdir(parents=True, exist_ok=True)
            for r, t in enumerate(tasks):
                if (t / f"{kind}.jsonl.zst").exists():
                    os.replace(t / f"{kind}.jsonl.zst", out / kind / f"part-{r:05d}.jsonl.zst")
        (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
        install(out, output)
    else:
        _concatenate([t / "kept.jsonl.zst" for t in tasks if (t / "kept.jsonl.zst").exists()], output)
        if run["rejected"]:
            _concatenate([t / "rejected.jsonl.zst" for t in tasks if (t / "rejected.jsonl.zst").exists()],
                         Path(run["rejected"]))
        atomic_write_text(report_path(output), json.dumps(report, indent=2) + "\n")
    clean_work(work, keep_logs)
    return report


def filter_documents(
    inputs: list[str | Path],
    output: str | Path,
    text_field_name: str = "text",
    rules=None,
    gbm=None,
    gbm_threshold: float = 0.5,
    transformer=None,
    transformer_threshold: float = 0.5,
    rejected: str | Path | None = None,
    tokenizer: str | Path | None = None,
    shards: str | Path | None = None,
    val_fraction: float = 0.01,
    num_workers: int = 1,
    batch_size: int = 256,
    hf_label: int = 1,
    overwrite: bool = False,
    tasks: int | None = None,
    skip_bad: bool = False,
    executor: str = "local",
    slurm: dict | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Filter ``inputs`` into ``output``; returns the report (also written beside or into the output).

    A datatrove pipeline (this module's docstring): reader, these layers, a writer of the kept
    records, over tasks; the same command after a kill goes on. A ``.jsonl`` output is one
    file; any other output a directory of parts. ``report_path`` is
    :func:`danube.data.quality.filter.report_path`.

    Args:
        inputs: Files, directories, globs or URLs of ``.jsonl(.gz/.zst)``, ``.parquet``, ``.txt``
            (:mod:`danube.corpus.inputs`), one document per record in ``text_field_name``.
        output: The kept records: a ``.jsonl`` file, or a directory of ``kept/`` and ``rejected/``
            ``.jsonl.zst`` parts (one per task) with ``quality.json``.
        rules: Heuristic thresholds; ``None`` skips the rule layer.
        gbm: A GBM classifier directory (or loaded scorer); ``None`` skips the layer.
        gbm_threshold: Keep documents whose GBM probability of being good is at least this.
        transformer: A transformer classifier directory (danube or local Hugging Face), or scorer.
        transformer_threshold: Keep documents scoring at least this.
        rejected: Optional ``.jsonl`` of the dropped records with the reason.
        tokenizer: SentencePiece model: counts become tokens, and needed for ``shards``.
        shards: Optional directory for litdata pretraining shards of the kept documents.
        val_fraction: Passed to :func:`danube.corpus.prepare.prepare` for ``shards``.
        num_workers: Tasks run at once (and ``prepare``'s workers for ``shards``).
        batch_size: Documents scored together.
        hf_label: For a Hugging Face classifier, the index of the "good" label.
        overwrite: Replace existing outputs (only once the new ones are complete).
        tasks, skip_bad, executor, slurm, verbose: as :func:`danube.corpus.prepare.prepare`'s.

    Raises:
        ValueError: Bad arguments or a classifier of the wrong kind, before any data is read;
            a malformed record (``FILE:LINE: what``), before any output is written.
    """
    import time

    from danube.corpus.inputs import fingerprint, local_paths
    from danube.corpus.prepare import (
        check_run_options,
        list_input_files,
        local_executor,
        open_plan,
        quiet_datatrove,
        start_message,
        submit,
        work_dir_of,
    )
    from danube.corpus.steps import ReadUnits
    from danube.data.quality.filter import load_scorer, report_path
    from danube.files import check_output_dir, remove_stale_temps

    t0 = time.perf_counter()
    output = Path(output)
    directory = not output.name.endswith(".jsonl")
    # ---- everything that can be wrong is checked before any work starts
    if rejected is not None and directory:
        raise ValueError(f"{output} is a directory output: the dropped records go to {output / 'rejected'} "
                         "(--rejected FILE is for a .jsonl output)")
    if rejected is not None and not str(rejected).endswith(".jsonl"):
        raise ValueError(f"{rejected}: the rejected records go to a .jsonl file")
    if rejected is not None and Path(rejected).resolve() == output.resolve():
        raise ValueError(f"the rejected file and the output are the same file: {output}")
    if rules is None and gbm is None and transformer is None:
        raise ValueError("no layer to filter with: enable the heuristics or pass a GBM or transformer classifier")
    for name, value in (("gbm_threshold", gbm_threshold), ("transformer_threshold", transformer_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value} must be a probability in [0, 1]")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if shards is not None and tokenizer is None:
        raise ValueError("shards need a tokenizer (--tokenizer)")
    if shards is not None and executor == "slurm":
        raise ValueError("--shards runs on this machine; on SLURM, run `danube prepare` on the kept records "
                         "once the merge job has ended")
    check_run_options(executor, tasks)
    if directory:
        check_output_dir(output, overwrite=overwrite, inputs=local_paths(inputs))
    elif not overwrite:
        for path in (output, rejected, report_path(output)):
            if path is not None and Path(path).exists():
                raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
    if shards is not None and not overwrite and Path(shards).exists() and \
            (not Path(shards).is_dir() or any(Path(shards).iterdir())):
        raise FileExistsError(f"{shards} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    remove_stale_temps(output.parent)
    tok_path, tok_sum = None, None
    if tokenizer is not None:
        from danube.data.tokenizer import Tokenizer

        tok = Tokenizer(tokenizer)
        tok_path, tok_sum = str(tok.model_file.resolve()), tok.checksum
    # Load the classifiers here once: the wrong kind of directory fails before any data is read.
    gbm = load_scorer(gbm, "gbm") if isinstance(gbm, (str, Path)) else gbm
    transformer = load_scorer(transformer, "transformer", hf_label=hf_label) \
        if isinstance(transformer, (str, Path)) else transformer
    gbm_path = str(Path(gbm.path).resolve()) if gbm is not None else None
    transformer_path = str(Path(transformer.path).resolve()) if transformer is not None else None
    files = list_input_files(inputs)
    rules_dict = rules.to_dict() if rules is not None else None
    key = {"inputs": {f: fingerprint(f) for f in files}, "text_field": text_field_name, "rules": rules_dict,
           "gbm": gbm_path, "gbm_threshold": gbm_threshold, "transformer": transformer_path,
           "transformer_threshold": transformer_threshold, "hf_label": hf_label, "tokenizer": tok_sum,
           "tasks": tasks, "skip_bad": skip_bad, "directory": directory, "rejected": rejected is not None}
    work = work_dir_of(output)
    plan = open_plan(work, key, files, text_field_name, tasks, run={
        "output": str(output.resolve()), "rejected": str(Path(rejected).resolve()) if rejected else None,
        "directory": directory, "tokenizer": tok_path})
    n = start_message("filtering", work, plan, files, executor, num_workers)
    quiet_datatrove(verbose)
    pipeline = [ReadUnits(str(work), text_field_name, skip_bad, records=True),
                QualityLayers(str(work), rules_dict, gbm_path, gbm_threshold, transformer_path, transformer_threshold,
                              hf_label, batch_size, tok_path, keep_rejected=directory or rejected is not None),
                WriteKept(str(work))]
    if executor == "slurm":
        return submit(pipeline, work, n, slurm or {}, finish="danube.corpus.quality:finish")
    local_executor(pipeline, n, num_workers, work / "datatrove", verbose).run()
    report = finish(work)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    if shards is not None:
        from danube.corpus.prepare import prepare

        manifest = prepare([output / "kept" if directory else output], shards, tok_path, text_field_name, val_fraction,
                           num_workers, overwrite=overwrite)
        report["shards"] = {"path": str(shards), "totals": manifest["totals"]}
    from danube.files import atomic_write_text

    atomic_write_text(output / "quality.json" if directory else report_path(output), json.dumps(report, indent=2) + "\n")
    return report
