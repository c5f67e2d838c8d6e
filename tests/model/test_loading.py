"""The one model loader: every format, one set of checks on the path, the device and the dtype."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from danube.cli import main
from danube.errors import MissingHardware
from danube.hf import to_hf
from danube.model import build_model
from danube.model.io import save_model_dir
from danube.model.loading import load_adapter, load_model, resolve_device, resolve_dtype
from tests.conftest import CONF


@pytest.fixture
def dirs(micro_cfg, tmp_path):
    torch.manual_seed(0)
    model = build_model(micro_cfg).eval()
    return model, save_model_dir(model, tmp_path / "native"), to_hf(model, tmp_path / "hf")


def test_both_formats_load_on_the_device_and_in_the_dtype_asked_for(dirs):
    model, native, hf = dirs
    for path in (native, hf):
        loaded = load_model(path, device="cpu", dtype="bfloat16")
        assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
        assert {p.device.type for p in loaded.parameters()} == {"cpu"}
        assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    assert {p.dtype for p in load_model(native, dtype=None).parameters()} == {torch.float32}  # as stored
    with pytest.raises(FileNotFoundError, match="is not a model directory"):
        load_model(hf, hf=False)  # export-hf and swap-tokenizer read danube directories only


def test_a_bad_dtype_or_device_is_named_before_any_file_is_read(dirs, tmp_path):
    _, native, _ = dirs
    with pytest.raises(ValueError, match=r"dtype='float64'; allowed: float32, bfloat16, float16"):
        load_model(native, dtype="float64")
    with pytest.raises(ValueError, match=r"dtype=torch.int8; allowed"):
        resolve_dtype(torch.int8)
    with pytest.raises(ValueError, match=r"device='gpu'; allowed: auto, cpu, cuda, cuda:N, mps"):
        load_model(native, device="gpu")
    with pytest.raises(ValueError, match=r"device='tpu'; allowed"):
        resolve_device("tpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_a_cuda_device_on_a_machine_without_one_is_missing_hardware(dirs):
    with pytest.raises(MissingHardware, match="device=cuda:1: no CUDA device is visible on this machine"):
        load_model(dirs[1], device="cuda:1")


def test_evaluate_and_the_console_commands_accept_and_refuse_the_same_devices(dirs, capsys):
    """`evaluate.py device=X` and `danube chat/generate --device X`: one check, one message."""
    from danube.tasks.evaluate import run

    _, native, _ = dirs
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"model_dir={native}", "tasks=[arc_easy]", "device=gpu"])
    with pytest.raises(ValueError) as from_evaluate:
        run(cfg)
    assert main(["generate", str(native), "hello", "--device", "gpu"]) == 1
    assert f"danube generate: error: {from_evaluate.value}" in capsys.readouterr().err


def test_an_adapter_directory_is_named_as_one(dirs, tmp_path):
    from danube.lora import add_lora

    model, native, _ = dirs
    add_lora(model, base_model=native).save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(FileNotFoundError, match=r"is a LoRA adapter directory, not a model directory: "
                                                r"`danube merge-lora .*adapter OUTPUT`"):
        load_model(tmp_path / "adapter")
    wrapped, base = load_adapter(tmp_path / "adapter")
    assert base == native and hasattr(wrapped, "disable_adapter")
    with pytest.raises(FileNotFoundError, match="is not a LoRA adapter directory: adapter_config.json is missing"):
        load_adapter(native)
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": None}))
    with pytest.raises(ValueError, match="names no base model; pass --base MODEL_DIR"):
        load_adapter(tmp_path / "adapter")
