"""`danube plot`: the sequence-length step at the stage boundary, stages marked, tokens as 1.5M; fine-tuning by step."""

import pytest
import yaml

from danube.plot import format_tokens, make_figure, plot_run, read_scalars


def write_scalars(directory, points: dict[str, list[tuple[int, float]]]):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(directory))
    for tag, values in points.items():
        for step, value in values:
            writer.add_scalar(tag, value, global_step=step)
    writer.close()


@pytest.fixture
def two_stage_logs(tmp_path):
    # What PretrainModule logs: a point at each stage's first token, then its steps, the last one included.
    tb = tmp_path / "run" / "tensorboard"
    write_scalars(tb / "seq128", {"train/seq_len": [(0, 128), (8192, 128), (983_040, 128)],
                                  "train/loss": [(8192, 8.0), (983_040, 4.0)], "val/loss": [(983_040, 4.2)],
                                  "train/lr": [(0, 0.0), (8192, 1e-3), (983_040, 2e-3)]})
    write_scalars(tb / "seq256", {"train/seq_len": [(983_040, 256), (991_232, 256), (1_310_720, 256)],
                                  "train/loss": [(991_232, 3.9), (1_310_720, 3.5)], "val/loss": [(1_310_720, 3.6)],
                                  "train/lr": [(983_040, 2e-3), (991_232, 2e-3), (1_310_720, 3e-4)]})
    return tmp_path / "run"


def test_sequence_length_steps_at_the_boundary_and_stages_are_marked(two_stage_logs):
    seq = read_scalars(two_stage_logs)["train/seq_len"]
    assert seq[2:4] == [(983_040, 128.0), (983_040, 256.0)]  # the earlier stage's end, then the later's start
    fig = make_figure(two_stage_logs)
    loss_ax, val_ax, lr_ax, seq_ax = fig.axes
    x, y = seq_ax.lines[0].get_data()
    assert list(zip(x, y))[2:4] == [(983_040, 128.0), (983_040, 256.0)]
    assert seq_ax.lines[0].get_drawstyle() == "steps-post"
    for ax in fig.axes:
        marks = [line.get_xdata()[0] for line in ax.lines[1:]]
        assert marks == [983_040], ax.get_title()
    names = [t.get_text().strip() for t in loss_ax.texts]
    assert names == ["seq128", "seq256"]
    assert seq_ax.get_xlabel() == "tokens seen"
    assert seq_ax.xaxis.get_major_formatter()(1_500_000, 0) == "1.5M"


def test_token_axis_labels():
    assert [format_tokens(x) for x in (0, 512, 250_000, 1_500_000, 2e9, 1e12)] == ["0", "512", "250K", "1.5M", "2B", "1T"]


def test_a_fine_tuning_run_is_drawn_against_optimizer_steps(tmp_path):
    run = tmp_path / "dpo"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model_dir": "runs/sft/model", "loss": {"name": "dpo"}}))
    write_scalars(run / "tensorboard" / "dpo", {"train/loss": [(1, 0.69), (2, 0.6), (3, 0.5)],
                                                "train/lr": [(1, 1e-5), (2, 8e-6), (3, 2e-6)],
                                                "rewards/margins": [(1, 0.0), (2, 0.1), (3, 0.3)],
                                                "rewards/accuracies": [(1, 0.0), (2, 0.5), (3, 1.0)]})
    fig = make_figure(run)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["DPO loss", "Learning rate", "Reward margin (chosen - rejected)", "Reward accuracy"]
    assert {ax.get_xlabel() for ax in fig.axes[2:]} == {"optimizer step"}
    assert "tokens" not in " ".join(ax.get_xlabel() for ax in fig.axes)
    assert plot_run(run).name == "figure1.png"
