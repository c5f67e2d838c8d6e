"""Chat fine-tuning: `python finetune.py loss=sft|dpo model_dir=DIR chat_data=NAME ...`.

The report's chain (README, "Chat fine-tuning"):
    python finetune.py experiment=danube_chat_sft  model_dir=BASE_MODEL_DIR ...
    python finetune.py experiment=danube_chat_dpo1 ...
    python finetune.py experiment=danube_chat_dpo2 ...
"""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from danube.tasks.common import run_entry_point
    from danube.tasks.finetune import run

    run_entry_point("finetune.py", run, cfg)


if __name__ == "__main__":
    from pathlib import Path

    from danube.entry import preflight

    preflight("finetune", Path(__file__).parent / "conf")  # another script's experiment; --help's group list
    main()
