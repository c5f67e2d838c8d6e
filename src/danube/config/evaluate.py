"""The schema of ``evaluate.py`` (conf/evaluate.yaml, ``suite``): lm-eval tasks, the report's suites, perplexity, MT-Bench."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from omegaconf import MISSING

from danube.config.common import PathsConfig
from danube.settings import check_ranges, setting

KINDS = ("lm_eval", "perplexity", "mt_bench")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class SuiteTaskConfig:
    """One task of a suite: its lm-eval name, shots, the metric reported and its table column."""

    task: str = setting(MISSING, "the lm-eval task name")
    num_fewshot: int | None = setting(None, "examples in the prompt", min=0)
    metric: str | None = setting(None, "the lm-eval result key shown, e.g. acc_norm,none")
    column: str | None = setting(None, "the report table's column")


@dataclass
class SuiteConfig:
    """``suite`` (conf/suite/*.yaml): a fixed set of tasks, perplexity, or MT-Bench answers."""

    name: str = setting(MISSING, "names the results file")
    kind: str = setting("lm_eval", "lm_eval | perplexity | mt_bench", choices=KINDS)
    table: str | None = setting(None, "the report table whose layout the results take (table1, table2)")
    reference: str | None = setting(None, "the report rows shown for comparison (table1, table4, ...)")
    tasks: list[SuiteTaskConfig] = setting(doc="lm_eval: the tasks", factory=list)

    def __post_init__(self) -> None:
        check_ranges(self, "suite")


@dataclass
class JudgeConfig:
    """``judge``: the OpenAI-compatible endpoint that scores MT-Bench answers (null url: none)."""

    url: str | None = setting(None, "e.g. https://api.openai.com/v1; null: no judging")
    model: str = setting("gpt-4", "the judge model")
    api_key_env: str | None = setting("OPENAI_API_KEY", "the environment variable holding the key")
    timeout_s: float = setting(120, "per request", above=0)

    def __post_init__(self) -> None:
        check_ranges(self, "judge")


@dataclass
class EvaluateConfig:
    """What ``python evaluate.py`` runs: conf/evaluate.yaml with ``suite`` and overrides, checked."""

    suite: SuiteConfig | None = setting(None, "danube_table1 | open_llm_v1 | perplexity | mt_bench; null: tasks")
    paths: PathsConfig = setting(doc="where runs live (results default under runs/eval/)", factory=PathsConfig)
    model_dir: str | None = setting(None, "danube model directory or Hugging Face directory")
    model_path: str | None = setting(None, "the old name of model_dir (deprecated: it goes in the next release)")
    tokenizer: str | None = setting(None, "default: the model directory's own")
    tasks: Any = setting(None, "lm-eval task names ([arc_easy,piqa] or one name), when no suite is given")
    num_fewshot: int | None = setting(None, "for tasks (suites fix their own)", min=0)
    include_path: str | None = setting(None, "folder of extra task YAMLs (e.g. local JSON data)")
    task_map: Any = setting(None, "suite task -> replacement task: {arc_easy: my_arc_easy}")  # Any: see StageConfig
    limit: float | None = setting(None, "at most this many documents per task (below 1: a fraction)", above=0)
    output_path: str | None = setting(None, "results JSON (Markdown beside it); default runs/eval/NAME-SUITE.json")
    overwrite: bool = setting(False, "replace existing results (else the run stops before any work)")
    batch_size: int = setting(8, "sequences per forward", min=1)
    device: str = setting("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = setting("float32", "float32 | bfloat16 | float16", choices=DTYPES)
    max_length: int | None = setting(None, "context limit for lm-eval; default the model's max_seq_len", min=1)
    offline: bool = setting(True, "never reach the Hugging Face Hub (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)")
    seed: int = setting(1234, "lm-eval's few-shot sampling and ours")
    verbose: bool = setting(False, "the libraries' INFO lines too (lm-eval, datasets, ...)")
    bootstrap_iters: int = setting(100_000, "lm-eval's standard errors (bootstrap where not closed form); 0: none",
                                   min=0)
    model_name: str | None = setting(None, "the table's row name; default: from the model directory")
    model_size: str | None = setting(None, "e.g. 1.8B; default: counted parameters")
    model_tokens: str | None = setting(None, "training tokens for Table 1, e.g. 1.00T")
    reference: str | None = setting(None, "the report table compared with; default the suite's")
    data_dir: str | None = setting(None, "perplexity: litdata shard folder (index.json + chunks)")
    seq_len: int = setting(2048, "perplexity: tokens per block", min=1)
    max_blocks: int | None = setting(None, "perplexity: at most this many blocks", min=1)
    questions: str | None = setting(None, "mt_bench: FastChat's question.jsonl")
    skip_categories: list[str] = setting(doc="mt_bench: categories left out (the report leaves coding out)",
                                         factory=lambda: ["coding"])
    max_new_tokens: int = setting(1024, "mt_bench: per answer", min=1)
    repetition_penalty: float = setting(1.1, "mt_bench: the report's 1.1", above=0)
    temperature: float = setting(0.0, "mt_bench: 0 is greedy", min=0)
    system_prompt: str | None = setting(None, "mt_bench: a system message before each question")
    judge: JudgeConfig = setting(doc="mt_bench: the judge", factory=JudgeConfig)

    RENAMED: ClassVar[dict[str, str]] = {"model_path": "model_dir"}
    REQUIRED: ClassVar[dict[str, str]] = {
        "model_dir": "model_dir=PATH is required: a danube model directory or a Hugging Face directory"}

    def __post_init__(self) -> None:
        check_ranges(self, "")
        if self.model_dir is None:
            raise ValueError(self.REQUIRED["model_dir"])
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        if self.task_map is not None and not isinstance(self.task_map, dict):
            raise ValueError(f"task_map={self.task_map!r} must map suite tasks to tasks: task_map={{arc_easy:my_arc}}")
        if not re.fullmatch(r"auto|cpu|cuda|cuda:\d+|mps", self.device):
            raise ValueError(f"device={self.device!r}; allowed: auto, cpu, cuda, cuda:N, mps")
        if self.kind == "lm_eval" and not self.suite and not self.tasks:
            raise ValueError("give tasks=[task,...] or suite=danube_table1|open_llm_v1|perplexity|mt_bench")
        if self.suite and self.tasks:
            raise ValueError("give either tasks=[...] or suite=..., not both")
        if self.kind == "perplexity" and not self.data_dir:
            raise ValueError("suite=perplexity needs data_dir=FOLDER (validation shards from `danube prepare`)")
        if self.kind == "mt_bench" and not self.questions:
            raise ValueError("suite=mt_bench needs questions=PATH (FastChat's data/mt_bench/question.jsonl)")

    @property
    def kind(self) -> str:
        return self.suite.kind if self.suite else "lm_eval"
