"""Evaluation during training, the parts that need no training: tags, the random state, train mode.

End to end (logged points equal `evaluate.py`, the training unchanged, resume, two processes):
tests/train/test_train.py.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from danube.eval.in_training import EvalPlan, evaluate_in_training, kept_random_state, result_scalars


def test_results_become_one_tag_per_task_and_metric_without_standard_errors():
    results = {
        "toy_mc": {"alias": "toy_mc", "acc,none": 0.25, "acc_stderr,none": 0.1, "acc_norm,none": 0.5,
                   "acc_norm_stderr,none": "N/A"},
        "gsm8k": {"exact_match,strict-match": 0.125, "exact_match_stderr,strict-match": 0.01, "sample_len": 8},
    }
    assert result_scalars(results) == {"eval/toy_mc/acc": 0.25, "eval/toy_mc/acc_norm": 0.5,
                                       "eval/gsm8k/exact_match/strict-match": 0.125}


def test_the_training_random_state_is_put_back():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    with kept_random_state():
        random.seed(1234), np.random.seed(1234), torch.manual_seed(1234)  # what lm-eval does
        random.random(), np.random.rand(), torch.rand(5)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_the_model_is_scored_in_eval_mode_and_handed_back_in_train_mode(model_dirs, task_dir):
    from danube.model.loading import load_model

    model_dir = model_dirs[0]
    model = load_model(model_dir).train()
    modes = []
    model.register_forward_pre_hook(lambda m, args: modes.append((m.training, torch.is_grad_enabled())))
    plan = EvalPlan(("toy_mc",), include_path=str(task_dir), limit=2)
    scalars, seconds = evaluate_in_training(model, model_dir / "tokenizer.model", plan)
    assert set(scalars) == {"eval/toy_mc/acc", "eval/toy_mc/acc_norm"} and seconds > 0
    assert modes and set(modes) == {(False, False)}
    assert model.training
