"""Our lm-eval model scores exactly what lm-eval's own `hf` model scores on the exported directory."""

import math

import pytest

TASKS = ("toy_mc", "toy_gen", "toy_text")


@pytest.fixture(scope="module")
def runs(task_dir, model_dirs):
    """toy tasks through (ours on the danube dir, ours on the HF dir, lm-eval's `hf` on the HF dir)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from danube.eval.lm_eval_adapter import DanubeLM

    def run(model, model_args=None):
        return simple_evaluate(
            model=model, model_args=model_args, tasks=list(TASKS), task_manager=TaskManager(include_path=str(task_dir)),
            batch_size=4, bootstrap_iters=0, log_samples=True, random_seed=0,
        )

    danube_dir, hf_dir = model_dirs
    return (
        run(DanubeLM(str(danube_dir), batch_size=4)),
        run(DanubeLM(str(hf_dir), batch_size=3)),
        run("hf", f"pretrained={hf_dir},device=cpu,dtype=float32"),
    )


def choice_logliks(res):
    return [resp[0][0] for s in res["samples"]["toy_mc"] for resp in s["resps"]]


def test_multiple_choice_acc_and_acc_norm_equal_hf(runs):
    theirs = runs[2]["results"]["toy_mc"]
    for ours in runs[:2]:
        r = ours["results"]["toy_mc"]
        assert r["acc,none"] == theirs["acc,none"] and r["acc_norm,none"] == theirs["acc_norm,none"]
        # The log-likelihood of every choice agrees, not just the argmax.
        ll, ref = choice_logliks(ours), choice_logliks(runs[2])
        assert len(ll) == 32 * 4
        assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(ll, ref))


def test_rolling_loglikelihood_equals_hf(runs):
    for ours in runs[:2]:
        for key in ("word_perplexity,none", "bits_per_byte,none"):
            assert math.isclose(ours["results"]["toy_text"][key], runs[2]["results"]["toy_text"][key], rel_tol=1e-5)


def test_generate_until_equals_hf(runs):
    gen = lambda res: [s["resps"][0][0] for s in res["samples"]["toy_gen"]]  # noqa: E731
    ours_sp, ours_hf, theirs = map(gen, runs)
    assert ours_sp == ours_hf == theirs
    assert sum(bool(s) for s in theirs) >= 3
