"""One typed config per script, registered with Hydra as the schema its YAML files are checked against.

``conf/train.yaml``, ``conf/finetune.yaml`` and ``conf/evaluate.yaml`` name their schema first
in their defaults list (``train_schema``, ...): Hydra then refuses an unknown key or a
wrong type at composition, and :func:`typed` builds the dataclasses once, at the entry
point, running every range and cross-field check. Below ``danube.tasks`` functions take
the typed piece they need.

A new setting is one field in the section's dataclass (its type, default, a line of
documentation and its range, through :func:`setting`) and, if a YAML should show it, the
same default there; the README's table of settings is generated from these classes.
"""

from hydra.core.config_store import ConfigStore

from danube.config.common import NumericsConfig, PathsConfig, TrainerConfig
from danube.config.door import ConfigError, one_line, typed, with_defaults
from danube.config.evaluate import EvaluateConfig, JudgeConfig, SuiteConfig, SuiteTaskConfig
from danube.config.finetune import (ChatDataConfig, ChatSourceConfig, FinetuneConfig, FinetuneLoopConfig,
                                    FinetuneOptimConfig, LoraConfig, LossConfig)
from danube.config.train import (CooldownConfig, DataConfig, LoopConfig, OptimConfig, PerfConfig, PretrainConfig,
                                 RecipeConfig, StageConfig)
from danube.model.config import DanubeConfig
from danube.precision import PrecisionConfig
from danube.settings import setting

# script -> its schema, registered under the name its primary YAML puts first in its defaults.
SCHEMAS = {"train": PretrainConfig, "finetune": FinetuneConfig, "evaluate": EvaluateConfig}


def model_preset(path) -> DanubeConfig:
    """A conf/model/*.yaml preset (or any YAML of DanubeConfig fields) as a :class:`DanubeConfig`.

    Benchmarks and tests build presets without composing a script's config; a bad field or
    value is a ValueError naming the file.
    """
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    try:
        return DanubeConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


for _script, _schema in SCHEMAS.items():
    ConfigStore.instance().store(name=f"{_script}_schema", node=_schema)

__all__ = ["SCHEMAS", "ChatDataConfig", "ChatSourceConfig", "ConfigError", "CooldownConfig", "DanubeConfig", "DataConfig",
           "EvaluateConfig", "FinetuneConfig", "FinetuneLoopConfig", "FinetuneOptimConfig", "JudgeConfig",
           "LoopConfig", "LoraConfig", "LossConfig", "NumericsConfig", "OptimConfig", "PathsConfig", "PerfConfig",
           "PrecisionConfig", "PretrainConfig", "RecipeConfig", "StageConfig", "SuiteConfig", "SuiteTaskConfig",
           "TrainerConfig", "model_preset", "one_line", "setting", "typed", "with_defaults"]
