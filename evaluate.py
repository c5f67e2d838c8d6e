"""Evaluate a model: lm-eval tasks, the report's suites, perplexity, MT-Bench answers."""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from danube.tasks.common import run_entry_point
    from danube.tasks.evaluate import run

    run_entry_point("evaluate.py", run, cfg)


if __name__ == "__main__":
    from pathlib import Path

    from danube.entry import preflight

    preflight("evaluate", Path(__file__).parent / "conf")  # another script's experiment; --help's group list
    main()
