"""The schema of ``finetune.py`` (conf/finetune.yaml, ``loss``, ``chat_data``): SFT of every parameter, or DPO with LoRA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from danube.config.common import NumericsConfig, PathsConfig, TrainerConfig
from danube.settings import check_ranges, setting
from danube.config.train import check_betas
from danube.data.sft import TRUNCATION
from danube.precision import PrecisionConfig

LOSSES = ("sft", "dpo")


@dataclass
class ChatSourceConfig:
    """One ``chat_data.sources`` entry: where its records are and how to read them."""

    path: str | None = setting(None, "a .jsonl/.json/.parquet file, or a local copy of a Hub dataset")
    hub: str | None = setting(None, "a Hub dataset id, read through datasets (offline, from its cache)")
    split: str | None = setting(None, "the split trained on (a file has none)")
    revision: str | None = setting(None, "the Hub revision")
    format: str = setting("messages", "how a record reads: messages, sharegpt, openorca, ..., ultrafeedback, pairs")
    lang: str | None = setting(None, "Oasst2: keep this language only (en); null: every language")
    val_split: str | None = setting(None, "its own held-out split, validated every train.val_every_n_steps")
    max_rows: int | None = setting(None, "train on this many of its conversations or pairs, a seeded choice; null: all",
                                   min=1)
    fraction: float | None = setting(None, "train on this share of them (rounded half up, at least 1), a seeded "
                                           "choice; null: all", above=0, max=1)
    seed: int | None = setting(None, "seeds the choice of max_rows or fraction; null: the run's seed")

    def check(self, key: str) -> None:
        """Refuse a bad subsample in one line naming ``key`` (``chat_data.sources.NAME``)."""
        check_ranges(self, key)
        if self.max_rows is not None and self.fraction is not None:
            raise ValueError(f"{key}: max_rows={self.max_rows} and fraction={self.fraction} both given; set one")


@dataclass
class ChatDataConfig:
    """``chat_data`` (conf/chat_data/*.yaml): named sources, each read and tokenized in turn."""

    sources: dict[str, ChatSourceConfig] = setting(doc="name -> source", factory=dict)


@dataclass
class LoraConfig:
    """``loss.lora``: the adapters DPO trains (report: r 4, alpha 16)."""

    r: int = setting(4, "adapter rank", min=1)
    alpha: float = setting(16.0, "scale: the update is alpha / r x B A", above=0)
    dropout: float = setting(0.05, "dropout on the adapters' input", min=0, below=1)
    target_modules: list[str] = setting(doc="the projections adapted (never lm_head)",
                                        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"])

    def __post_init__(self) -> None:
        check_ranges(self, "loss.lora")


@dataclass
class LossConfig:
    """``loss`` (conf/loss/*.yaml): sft trains every parameter; dpo trains LoRA adapters against the model with them off."""

    name: str = setting("sft", "sft: every parameter, prompt loss masked; dpo: LoRA adapters against the model", choices=LOSSES)
    beta: float | None = setting(None, "dpo: the KL strength (report: 0.2)", above=0)
    lora: LoraConfig | None = setting(None, "dpo: the adapters")

    def __post_init__(self) -> None:
        if self.name not in LOSSES:
            raise ValueError(f"loss.name={self.name!r}; allowed: {', '.join(LOSSES)}")
        check_ranges(self, "loss")
        if self.name == "dpo" and (self.beta is None or self.lora is None):
            raise ValueError("loss=dpo needs loss.beta and loss.lora (conf/loss/dpo.yaml)")


@dataclass
class FinetuneOptimConfig:
    """``optim`` of fine-tuning: AdamW, linear warm-up then cosine by optimizer step."""

    lr: float = setting(1e-5, "peak learning rate (report: 1e-5 for SFT and DPO 1, 3e-6 for DPO 2)", above=0)
    min_lr_ratio: float = setting(0.0, "the cosine ends at lr x this, at the last step", min=0, max=1)
    warmup_ratio: float = setting(0.02, "warm-up over this share of the steps (the report: \"a short warm-up\")",
                                  min=0, below=1)
    betas: list[float] = setting(doc="AdamW's (beta1, beta2), each in [0, 1)", factory=lambda: [0.9, 0.999])
    eps: float = setting(1e-8, "AdamW's epsilon", above=0)
    weight_decay: float = setting(0.0, "on every matrix, never the norms", min=0)
    grad_clip: float | None = setting(1.0, "clip the global gradient norm to this; null: no clipping", above=0)
    fused: Any = setting("auto", "the fused AdamW kernel (auto: where the device has one)",
                         choices=("auto", True, False))

    def __post_init__(self) -> None:
        check_ranges(self, "optim")
        check_betas(self.betas, "optim")


@dataclass
class FinetuneLoopConfig(NumericsConfig):
    """``train`` of fine-tuning: the batch, the epochs, lengths and held-out data."""

    batch_size: int = setting(8, "samples (packed rows with packing) per optimizer step, all devices together", min=1)
    micro_batch_size: int = setting(1, "per device per forward; accumulation = batch_size / (this x devices)", min=1)
    epochs: int = setting(1, "passes over the training items", min=1)
    max_steps: int | None = setting(None, "stop after this many optimizer steps (smoke tests)", min=1)
    max_seq_len: int = setting(16_384, "longest sample in tokens (report: the full pre-trained context)", min=1)
    truncation: str = setting("truncate", "overlong samples: truncate (keep the first max_seq_len ids) | drop",
                              choices=TRUNCATION)
    packing: bool = setting(False, "SFT: pack samples into rows of max_seq_len (no cross-sample attention)")
    activation_checkpointing: bool = setting(False, "recompute each block's activations in backward")
    num_workers: int = setting(0, "DataLoader worker processes", min=0)
    log_every_n_steps: int = setting(10, "train/* scalars every this many optimizer steps", min=1)
    val_fraction: float = setting(0.0, "hold out this seeded share of each source without a val_split; 0: none")
    val_every_n_steps: int | None = setting(500, "validate every this many steps (and after the last); null: only "
                                                 "after the last", min=1)

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"train.val_fraction={self.val_fraction}: must be in [0, 1) (0: no held-out set)")
        super().__post_init__()


@dataclass
class FinetuneConfig:
    """What ``python finetune.py`` runs: conf/finetune.yaml with ``loss``, ``chat_data`` and overrides, checked."""

    loss: LossConfig = setting(doc="sft or dpo (conf/loss/*.yaml)", factory=LossConfig)
    chat_data: ChatDataConfig | None = setting(None, "the conversations or pairs (conf/chat_data/*.yaml)")
    trainer: TrainerConfig = setting(doc="the devices (conf/trainer/*.yaml)", factory=TrainerConfig)
    precision: PrecisionConfig = setting(doc="fp32 or bf16 (conf/precision/*.yaml)", factory=PrecisionConfig)
    paths: PathsConfig = setting(doc="where data and runs live", factory=PathsConfig)
    train: FinetuneLoopConfig = setting(doc="batch, epochs, lengths, held-out data", factory=FinetuneLoopConfig)
    optim: FinetuneOptimConfig = setting(doc="AdamW and the LR schedule", factory=FinetuneOptimConfig)
    name: str | None = setting(None, "names the run directory: ${paths.runs_dir}/${name}")
    run_dir: str | None = setting(None, "default: ${paths.runs_dir}/${name}")
    overwrite: bool = setting(False, "replace the fine-tuned model a finished run left in run_dir")
    model_dir: str | None = setting(None, "the model to start from: danube model directory or Hugging Face checkpoint")
    tokenizer: str | None = setting(None, "default: ${model_dir}/tokenizer.model")
    export_hf: bool = setting(True, "also write ${run_dir}/hf (what `danube export-hf` writes)")
    seed: int = setting(42, "seeds the data order, the held-out split, the sources' subsamples and the adapters")
    verbose: bool = setting(False, "the libraries' INFO lines too (Lightning, datasets, peft, ...)")

    REQUIRED: ClassVar[dict[str, str]] = {
        "model_dir": "model_dir=PATH is required: a danube model directory or a Hugging Face checkpoint directory"}

    def __post_init__(self) -> None:
        if self.model_dir is None:
            raise ValueError(self.REQUIRED["model_dir"])
        if self.chat_data is None:
            from danube.config.hydra_runtime import group_options

            options = group_options("chat_data")
            raise ValueError(f"no chat_data chosen: pass chat_data=NAME ({', '.join(options) or 'see conf/chat_data/'})")
        if not self.chat_data.sources:
            raise ValueError("chat_data.sources must map names to {path or hub, format, ...}")
        from danube.data import preference, sft

        allowed = sft.FORMATS if self.loss.name == "sft" else preference.FORMATS
        for name, source in self.chat_data.sources.items():
            source.check(f"chat_data.sources.{name}")
            if source.format not in allowed:
                raise ValueError(f"chat_data.sources.{name}.format={source.format!r} is not {self.loss.name} data; "
                                 f"allowed with loss={self.loss.name}: {', '.join(allowed)}")
        if self.precision.fp8:
            raise ValueError("precision=fp8 is for pretraining; fine-tune with precision=bf16 (or fp32)")
        if self.trainer.strategy == "fsdp":
            raise ValueError("trainer.strategy=fsdp is for pretraining; fine-tuning replicates the model on "
                             "every device (trainer.strategy=ddp or auto): a 1.8B model with its AdamW state "
                             "fits one 80 GB GPU")
