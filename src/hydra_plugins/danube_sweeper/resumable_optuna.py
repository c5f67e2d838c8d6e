"""hydra-optuna-sweeper with a study that outlives the sweep: a relaunched sweep goes on where it stopped.

Hydra finds sweepers only in the ``hydra_plugins`` package, so this module lives there; the
configs select it with ``hydra.sweeper._target_`` (``conf/hparams_search/*_optuna.yaml``).

With a database ``storage`` (``sqlite:///PATH``), running the same ``train.py -m`` command
again after the sweep died (the login node rebooted, the sweep's own job was preempted):

* loads the study: the trials already finished stay, and the sampler models them;
* trials left running by the dead sweep are marked failed and their parameters queued
  again, so they run once more, first;
* runs only the trials still missing from ``n_trials`` (the total, not a number more);
* numbers the new jobs after the old ones (the trial number is the job's folder), so no job
  reuses a folder of the dead sweep.

Without a storage it is hydra-optuna-sweeper's own in-memory study, unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List

log = logging.getLogger(__name__)

RUN_AGAIN = "danube:run_again"  # a trial's system attribute: it was running when its sweep died

try:  # the sweep extra; Hydra imports every plugin module at start, so a missing one must stay quiet
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # pragma: no cover - without danube[sweep]
    OptunaSweeper = None


def sqlite_file(storage: Any) -> Path | None:
    """The file of a ``sqlite:///PATH`` storage URL (None for another database or an in-memory study)."""
    if not isinstance(storage, str) or not storage.startswith("sqlite:///"):
        return None
    return Path(storage[len("sqlite:///"):])


if OptunaSweeper is not None:
    class ResumableOptunaSweeper(OptunaSweeper):
        """:class:`OptunaSweeper` that resumes its study from its storage (see the module's text)."""

        def sweep(self, arguments: List[str]) -> None:
            impl = self.sweeper
            if impl.storage:
                path = sqlite_file(impl.storage)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)  # sqlite makes the file, not its folder
                self._resume(impl)
            return super().sweep(arguments)

        @staticmethod
        def _resume(impl) -> None:
            import optuna
            from optuna.trial import TrialState

            try:
                study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
            except KeyError:  # optuna 2.x: no study of that name yet, a first launch
                return
            trials = study.get_trials(deepcopy=False)
            if not trials:
                return
            # A trial a dead sweep left running is not counted: it is run again.
            finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
                           and not t.system_attrs.get(RUN_AGAIN) for t in trials)
            stale = [t for t in trials if t.state == TrialState.RUNNING]
            for trial in stale:  # the dead sweep's: failed, and queued to run again with the same parameters
                study._storage.set_trial_system_attr(trial._trial_id, RUN_AGAIN, True)
                study._storage.set_trial_state(trial._trial_id, TrialState.FAIL)
                study.enqueue_trial(trial.params)
            total = impl.n_trials
            impl.n_trials = max(0, total - finished)
            impl.job_idx = len(trials)  # every trial so far had a job folder 0 .. len - 1
            reseed = getattr(impl.sampler, "reseed_rng", None)
            if reseed is not None:  # the seeded sampler would otherwise repeat the first launch's random trials
                reseed()
            log.info("study %s in %s: %d of %d trials finished, %d interrupted trial(s) run again; %d to go, "
                     "from job %d", impl.study_name, impl.storage, finished, total, len(stale), impl.n_trials,
                     impl.job_idx)
