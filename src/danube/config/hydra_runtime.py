"""What Hydra knows at run time and a config does not: multirun or not, each group's chosen option, the job's folder."""

from __future__ import annotations

from pathlib import Path


def is_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (a sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def choice(group: str) -> str | None:
    """The option chosen for ``group`` (``model`` -> ``tiny``), None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def job_dir() -> Path | None:
    """A multirun job's own folder (``hydra.sweep.dir/<job number>``), None in a single run."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if is_multirun() else None


def group_options(group: str) -> list[str]:
    """The options of ``group`` in the config sources Hydra composes from; [] outside Hydra.

    Hydra's config loader knows its sources (the checkout's ``conf/``, or any other search
    path): no path is guessed from where this file lies.
    """
    from hydra.core.global_hydra import GlobalHydra

    hydra = GlobalHydra.instance()
    return sorted(hydra.config_loader().get_group_options(group)) if hydra.is_initialized() else []
