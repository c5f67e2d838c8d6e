"""Evaluate a model: lm-eval tasks, the report's suites, perplexity, MT-Bench answers."""

import hydra
from omegaconf import DictConfig

import danube.config  # noqa: F401  registers the schema conf/evaluate.yaml is checked against


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from danube.entry import run_entry_point
    from danube.tasks.evaluate import run

    run_entry_point("evaluate.py", run, cfg)


if __name__ == "__main__":
    from pathlib import Path

    from danube.entry import launch

    launch("evaluate", Path(__file__).parent / "conf", main)  # one-line errors, --help's group list
