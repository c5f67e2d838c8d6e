"""Pretrain a Danube model: `python train.py` (tiny model, embedded data, CPU).

The report's run, one stage at a time:
    python train.py model=danube_1p8b stage=seq2k trainer=h100x8 precision=fp8 data=pretrain ...
"""

import hydra
from omegaconf import DictConfig

import danube.config  # noqa: F401  registers the schema conf/train.yaml is checked against


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from danube.sweep import objective
    from danube.entry import run_entry_point
    from danube.tasks.train import run

    # What a sweeper (Optuna) minimises: the final validation loss, inf when missing or not finite.
    return objective(run_entry_point("train.py", run, cfg))


if __name__ == "__main__":
    from pathlib import Path

    from danube.entry import launch

    launch("train", Path(__file__).parent / "conf", main)  # one-line errors, --help's group list
