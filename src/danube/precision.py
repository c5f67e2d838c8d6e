"""FP8 training on the seven projections of every block, ``lm_head`` kept in bf16.

Two backends, chosen with ``precision.backend``:

* ``te`` (the report's path): NVIDIA Transformer Engine. Lightning's
  ``precision="transformer-engine"`` would swap every eligible ``nn.Linear`` --
  ``lm_head`` included -- so danube builds ``te.Linear`` itself for q/k/v/o and
  gate/up/down and runs the blocks under ``fp8_autocast``.
* ``torchao``: torchao's float8 training (dynamic scaling, what torchtitan uses): the
  model is built with ``nn.Linear`` and the same seven projections are swapped for
  ``Float8Linear`` by :func:`convert_to_float8`. torchao's automatic filter would skip
  the k/v projections (640 x 2560 is too small for its heuristic), so danube passes its
  own filter. It composes with ``torch.compile`` (which it needs to be fast) and FSDP.

Either way ``lm_head`` stays a plain ``nn.Linear`` under bf16 autocast. Both packages are
optional extras, imported only when FP8 is asked for; without CUDA or the package,
:func:`check_fp8_available` stops the run at start saying what is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from dataclasses import dataclass

import torch
from torch import nn

from danube.errors import MissingHardware
from danube.settings import check_ranges, setting

FP8_BACKENDS = ("te", "torchao")
FP8_FORMATS = ("hybrid", "e4m3")
TORCHAO_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
# The projections of a block that run in FP8 (Hugging Face names); nothing else does.
FP8_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PACKAGES = {
    "te": ("transformer_engine", "NVIDIA Transformer Engine: pip install -e '.[gpu]' (transformer-engine[pytorch])"),
    "torchao": ("torchao", "torchao: pip install -e '.[fp8]'"),
}

log = logging.getLogger(__name__)


TRAINER_PRECISIONS = ("32-true", "bf16-mixed")  # fp16 would need a loss scaler: danube clips unscaled gradients


@dataclass
class PrecisionConfig:
    """``precision`` (conf/precision/*.yaml): the Trainer's precision and, optionally, FP8 on the block projections."""

    trainer_precision: str = setting("32-true", "Lightning's precision", choices=TRAINER_PRECISIONS)
    fp8: bool = setting(False, "FP8 on every attention and MLP projection (lm_head stays bf16); Hopper GPUs")
    backend: str = setting("te", "fp8: te (Transformer Engine, the report's) or torchao", choices=FP8_BACKENDS)
    fp8_format: str = setting("hybrid", "te: hybrid (E4M3 forward, E5M2 backward) or e4m3", choices=FP8_FORMATS)
    amax_history_len: int = setting(1024, "te: steps of amax history for delayed scaling", min=1)
    amax_compute_algo: str = setting("max", "te: max | most_recent over the history")
    recipe: str = setting("tensorwise", "torchao: tensorwise (fastest), rowwise, rowwise_with_gw_hp (most accurate)",
                          choices=TORCHAO_RECIPES)

    def __post_init__(self) -> None:
        check_ranges(self, "precision")  # every option named, whether or not fp8 uses it

    @property
    def fp8_backend(self) -> str | None:
        """The FP8 backend asked for (None: no FP8)."""
        return self.backend if self.fp8 else None


def check_fp8_available(precision: PrecisionConfig | None = None) -> None:
    """Fail before any compute when FP8 is asked for where it cannot run, naming what is missing."""
    backend = (precision or PrecisionConfig()).backend
    package, install = _PACKAGES[backend]
    if not torch.cuda.is_available():
        raise MissingHardware(
            f"precision=fp8 needs a CUDA GPU (Hopper or newer) and {install.split(':')[0]}; "
            "no CUDA device is visible: use precision=bf16 or fp32 here"
        )
    if importlib.util.find_spec(package) is None:
        raise MissingHardware(f"precision=fp8 (backend {backend}) needs {install}; or use precision=bf16")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise MissingHardware(f"precision=fp8 needs compute capability >= 8.9 (Ada/Hopper); this GPU is {major}.{minor}")


# -- Transformer Engine -------------------------------------------------------------------
def _recipe(precision: PrecisionConfig):
    from transformer_engine.common.recipe import DelayedScaling, Format

    return DelayedScaling(
        fp8_format=Format.HYBRID if precision.fp8_format == "hybrid" else Format.E4M3,
        amax_history_len=precision.amax_history_len,
        amax_compute_algo=precision.amax_compute_algo,
    )


def te_linear_factory(precision: PrecisionConfig):
    """A ``linear(in, out)`` factory building bias-free ``te.Linear`` layers."""
    check_fp8_available(precision)
    import transformer_engine.pytorch as te

    def linear(in_features: int, out_features: int) -> torch.nn.Module:
        return te.Linear(in_features, out_features, bias=False)

    return linear


def fp8_autocast(enabled: bool, precision: PrecisionConfig | None):
    """TE's fp8 autocast when enabled, a no-op context otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te

    return te.fp8_autocast(enabled=True, fp8_recipe=_recipe(precision or PrecisionConfig(fp8=True)))


# -- torchao ------------------------------------------------------------------------------
def is_block_projection(module: nn.Module, fqn: str) -> bool:
    """The module filter: a block's q/k/v/o or gate/up/down projection, never ``lm_head``.

    ``fqn`` is relative to the module being converted (``model.layers.3.self_attn.k_proj``
    from a ``Danube``, ``layers.3.self_attn.k_proj`` from its ``model``).
    """
    parts = fqn.split(".")
    return isinstance(module, nn.Linear) and parts[-1] in FP8_PROJECTIONS and "layers" in parts[:-1]


def _import_torchao_float8():
    # torchao logs a warning for each of its CUDA kernels libraries it cannot load (all of
    # them on a CPU build of torch); float8 training needs none of them.
    quiet = logging.getLogger("torchao")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    finally:
        quiet.setLevel(level)
    return Float8LinearConfig, convert_to_float8_training


def convert_to_float8(model: nn.Module, precision: PrecisionConfig | None = None, *, emulate: bool = False) -> list[str]:
    """Swap every block projection of ``model`` for torchao's ``Float8Linear``, in place.

    Returns the converted modules' names. ``emulate=True`` casts to FP8 but multiplies in
    high precision (torchao's emulation: runs on CPU; for tests). FP8 matmuls need both
    dimensions divisible by 16: a projection that is not is an error here, not a failed
    kernel later.
    """
    Float8LinearConfig, convert_to_float8_training = _import_torchao_float8()
    recipe = (precision or PrecisionConfig(fp8=True, backend="torchao")).recipe
    chosen = [name for name, m in model.named_modules() if is_block_projection(m, name)]
    for name in chosen:
        weight = model.get_submodule(name).weight
        if weight.shape[0] % 16 or weight.shape[1] % 16:
            raise ValueError(f"precision=fp8: {name} is {weight.shape[1]} -> {weight.shape[0]}; "
                             "FP8 matmuls need both sizes divisible by 16")
    config = Float8LinearConfig.from_recipe_name(recipe)
    if emulate:
        import dataclasses

        config = dataclasses.replace(config, emulate=True)
    convert_to_float8_training(model, module_filter_fn=is_block_projection, config=config)
    log.info("torchao float8 (%s scaling): %d block projections converted, lm_head kept in high precision",
             recipe, len(chosen))
    return chosen


def fp8_modules(model: nn.Module) -> list[str]:
    """Names of the modules that run their matmul in FP8 (torchao's or TE's)."""
    def fp8(module: nn.Module) -> bool:
        kind = type(module)
        return kind.__name__ == "Float8Linear" or (kind.__name__ == "Linear"
                                                   and kind.__module__.startswith("transformer_engine"))

    return [name for name, module in model.named_modules() if fp8(module)]
