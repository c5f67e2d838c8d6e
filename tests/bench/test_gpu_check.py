"""The prepared device run: its wheels and its dry run, on a machine without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_wheels  # noqa: E402


def fake_wheel(directory: Path, name: str, version: str, tags: str = "py3-none-any") -> Path:
    """A wheel file with only its METADATA: what the checks read."""
    stem = f"{gpu_wheels.normalise(name)}-{version}"
    path = directory / f"{stem}-{tags}.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{stem}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return path


@pytest.fixture
def wheels(tmp_path) -> Path:
    directory = tmp_path / "whl"
    directory.mkdir()
    for name, (version, _) in gpu_wheels.WHEELS.items():
        tags = "cp310-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64" if name == "torchao" else "py3-none-any"
        fake_wheel(directory, name, version, tags)
    return directory


def test_the_listed_wheels_pass_the_check(wheels):
    assert gpu_wheels.check(wheels) == []


@pytest.mark.parametrize("tags, ok", [
    ("py3-none-any", True),
    ("cp310-abi3-manylinux_2_28_x86_64", True),
    ("cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64", True),
    ("cp311-cp311-manylinux_2_17_x86_64", False),  # another CPython
    ("cp312-cp312-macosx_11_0_arm64", False),
    ("cp312-cp312-manylinux_2_17_aarch64", False),
    ("py3-none-manylinux_2_40_x86_64", False),  # newer glibc than the device's 2.39
])
def test_tags_that_install_on_the_device(tags, ok):
    python, abi, platform = tags.split("-")
    assert gpu_wheels.installable(python, abi, platform) is ok


def test_missing_extra_and_second_versions_are_named(wheels):
    (next(wheels.glob("torchao-*.whl"))).unlink()
    fake_wheel(wheels, "litdata", "0.2.50")
    fake_wheel(wheels, "numpy", "2.0.0", "cp312-cp312-manylinux_2_17_x86_64")
    problems = "\n".join(gpu_wheels.check(wheels))
    assert "torchao==0.18.0 missing" in problems and "python bench/gpu_wheels.py fetch" in problems
    assert "litdata-0.2.50-py3-none-any.whl: version 0.2.50, the list says 0.2.76" in problems
    assert "litdata: 2 wheels" in problems
    assert "numpy-2.0.0-cp312-cp312-manylinux_2_17_x86_64.whl: not in bench/gpu_wheels.py's list" in problems


def test_check_command_fails_with_the_problem(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_wheels.py"), "check", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "hydra-core==1.3.8 missing" in proc.stderr


@pytest.mark.slow
def test_dry_run_checks_wheels_configs_commands_and_test_collection(wheels, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           # the script runs `python3`: this interpreter's, even when its virtualenv is not activated
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--wheels", str(wheels),
                           str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    out = proc.stdout
    assert "9 wheels in" in out and out.count("composes: debug=fast") == 3
    assert "danube_1p8b seq 2048: transformers bf16 sdpa; danube bf16 sdpa" in out
    assert "danube_1p8b seq 16384: danube, compiled bf16 flex" in out and "AdamW step, danube_1p8b" in out
    assert "tests/gpu/test_cuda.py::test_train_py_debug_fast_bf16_on_one_gpu" in out
    assert "0 phase(s) failed" in out
    assert (tmp_path / "out" / "gpu_check.log").read_text().count("=== ") >= 10
