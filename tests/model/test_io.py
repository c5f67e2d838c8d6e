"""Model and Hugging Face directories are replaced whole or not at all."""

import pytest
import torch

import danube.model.io as io
from danube.hf import to_hf
from danube.model import build_model
from danube.model.io import save_model_dir
from danube.model.loading import load_model


@pytest.mark.parametrize("write", [save_model_dir, to_hf], ids=["model_dir", "hf_dir"])
def test_a_failed_write_leaves_the_previous_directory_intact(write, micro_cfg, tmp_path, monkeypatch):
    torch.manual_seed(0)
    old = build_model(micro_cfg)
    target = tmp_path / "out"
    write(old, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr("danube.hf.save_file", crash)
    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        write(build_model(micro_cfg), target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary sibling left behind


def test_saving_over_a_model_directory_replaces_it(micro_cfg, tmp_path):
    torch.manual_seed(0)
    save_model_dir(build_model(micro_cfg), tmp_path / "m")
    (tmp_path / "m" / "stale.txt").write_text("from an older save")
    new = build_model(micro_cfg)
    save_model_dir(new, tmp_path / "m")
    assert not (tmp_path / "m" / "stale.txt").exists()
    torch.testing.assert_close(load_model(tmp_path / "m").state_dict(), new.state_dict(), atol=0, rtol=0)
