"""Chat fine-tuning: `python finetune.py loss=sft|dpo model_dir=DIR chat_data=NAME ...`.

The report's chain (README, "Chat fine-tuning"):
    python finetune.py experiment=danube_chat_sft  model_dir=BASE_MODEL_DIR ...
    python finetune.py experiment=danube_chat_dpo1 ...
    python finetune.py experiment=danube_chat_dpo2 ...
"""

import hydra
from omegaconf import DictConfig

import danube.config  # noqa: F401  registers the schema conf/finetune.yaml is checked against


@hydra.main(config_path="conf", config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from danube.entry import run_entry_point
    from danube.tasks.finetune import run

    run_entry_point("finetune.py", run, cfg)


if __name__ == "__main__":
    from pathlib import Path

    from danube.entry import launch

    launch("finetune", Path(__file__).parent / "conf", main)  # one-line errors, --help's group list
