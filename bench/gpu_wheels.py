"""The wheels bench/gpu_check.sh installs on the GPU machine, fetched here beforehand.

The GPU machine (CPython 3.12, x86-64) has no package index. Its image has torch 2.11 +
CUDA, lightning, transformers, peft, sentencepiece, tensorboard, triton and pytest (and
pytest-xdist, safetensors, matplotlib, numpy, requests, urllib3, python-dateutil,
filelock, tifffile, lightning-utilities, torchvision), but not the packages below. Run
``fetch`` here, where the index is reachable: the wheels land in ``.whl/`` (git-ignored,
~20 MB), which the device call carries with the working tree, and ``gpu_check.sh``
installs them there with ``--no-index --no-deps``.

    python bench/gpu_wheels.py fetch [DIR]   # download what is missing, drop what is not listed, check
    python bench/gpu_wheels.py check [DIR]   # each listed wheel present once, installable on the device
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / ".whl"
# name: (version, why). Versions are those of the CPU machines, where the tests pass.
WHEELS = {
    "hydra-core": ("1.3.8", "train.py's configs"),
    "omegaconf": ("2.3.1", "hydra's config objects"),
    "antlr4-python3-runtime": ("4.9.3", "omegaconf's parser; a source release only, built here (pure Python)"),
    "litdata": ("0.2.76", "the token shards"),
    "boto3": ("1.44.8", "imported by litdata at import time (its S3 client)"),
    "botocore": ("1.44.8", "boto3's"),
    "s3transfer": ("0.19.3", "boto3's"),
    "jmespath": ("1.1.0", "botocore's"),
    "torchao": ("0.18.0", "precision=fp8 precision.backend=torchao; built for torch >= 2.11"),
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
MAX_MB = 40  # the device call carries at most 64 MiB, the working tree included


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def parse(path: Path) -> tuple[str, str, str, str, str]:
    """(name, version, python tag, abi tag, platform tag) of a wheel file name."""
    parts = path.name[: -len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"{path.name}: not a wheel file name")
    return normalise(parts[0]), parts[1], parts[-3], parts[-2], parts[-1]


def installable(python: str, abi: str, platform: str) -> bool:
    """Would pip install this on CPython 3.12, manylinux x86-64 (glibc 2.39)?"""
    pythons = python.split(".")
    ok_python = any(p in ("py3", "cp312") or (abi == "abi3" and re.fullmatch(r"cp3(\d+)", p)
                                               and int(p[3:]) <= 12) for p in pythons)
    ok_abi = abi in ("none", "abi3", "cp312")
    ok_platform = all(p == "any" or (p.endswith("_x86_64") and _glibc(p) <= (2, 39)) for p in platform.split("."))
    return ok_python and ok_abi and ok_platform


def _glibc(tag: str) -> tuple[int, int]:
    if tag.startswith(("manylinux1", "manylinux2010", "manylinux2014")):
        return (2, 17)
    m = re.match(r"manylinux_(\d+)_(\d+)_", tag)
    return (int(m.group(1)), int(m.group(2))) if m else (99, 0)


def metadata(path: Path) -> tuple[str, str]:
    """(Name, Version) from the wheel's own METADATA."""
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        fields = dict(line.split(": ", 1) for line in z.read(name).decode().splitlines()
                      if ": " in line and not line.startswith(" "))
    return normalise(fields["Name"]), fields["Version"]


def check(directory: Path) -> list[str]:
    """What is wrong with ``directory`` as the device's wheels (empty: nothing)."""
    problems = []
    found: dict[str, list[Path]] = {}
    for path in sorted(directory.glob("*.whl")):
        try:
            name, version, python, abi, platform = parse(path)
        except ValueError as err:
            problems.append(str(err))
            continue
        found.setdefault(name, []).append(path)
        wanted = {normalise(n): v for n, (v, _) in WHEELS.items()}
        if name not in wanted:
            problems.append(f"{path.name}: not in bench/gpu_wheels.py's list (remove it: two versions stop the install)")
        elif version != wanted[name]:
            problems.append(f"{path.name}: version {version}, the list says {wanted[name]}")
        if not installable(python, abi, platform):
            problems.append(f"{path.name}: tags {python}-{abi}-{platform} do not install on CPython 3.12 x86-64")
        try:
            if metadata(path) != (name, version):
                problems.append(f"{path.name}: its METADATA says {metadata(path)}")
        except (zipfile.BadZipFile, StopIteration, KeyError):
            problems.append(f"{path.name}: not a readable wheel (no METADATA)")
    for name, (version, _) in WHEELS.items():
        paths = found.get(normalise(name), [])
        if not paths:
            problems.append(f"{name}=={version} missing from {directory}: run `python bench/gpu_wheels.py fetch`")
        elif len(paths) > 1:
            problems.append(f"{name}: {len(paths)} wheels ({', '.join(p.name for p in paths)}); keep one")
    size = sum(p.stat().st_size for p in directory.glob("*.whl")) / 2**20
    if size > MAX_MB:
        problems.append(f"{directory}: {size:.0f} MB of wheels, over {MAX_MB} MB (the device call carries 64 MiB)")
    return problems


def fetch(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, (version, _) in WHEELS.items():
        for path in directory.glob("*.whl"):
            n, v, *_ = parse(path)
            if n == normalise(name) and v != version:
                path.unlink()
                print(f"removed {path.name}")
        if any(parse(p)[:2] == (normalise(name), version) for p in directory.glob("*.whl")):
            continue
        req = f"{name}=={version}"
        print(f"+ {req}", flush=True)
        pip = [sys.executable, "-m", "pip"]
        args = ["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(directory), req]
        if subprocess.run(pip + args, capture_output=True, text=True).returncode != 0:
            # A source release only: pure Python, so a wheel built here is the same wheel there.
            print(f"  no wheel of {req} for CPython 3.12 x86-64 on the index: building one here", flush=True)
            subprocess.run(pip + ["wheel", "-q", "--no-deps", "-w", str(directory), req], check=True)
    wanted = {normalise(n) for n in WHEELS}
    for path in directory.glob("*.whl"):
        if parse(path)[0] not in wanted:
            path.unlink()
            print(f"removed {path.name} (not listed)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["fetch", "check"])
    parser.add_argument("directory", nargs="?", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    if args.command == "fetch":
        fetch(args.directory)
    problems = check(args.directory) if args.directory.is_dir() else [f"{args.directory}: no such directory; "
                                                                       "run `python bench/gpu_wheels.py fetch`"]
    for p in problems:
        print(f"gpu_wheels: {p}", file=sys.stderr)
    if not problems:
        size = sum(p.stat().st_size for p in args.directory.glob("*.whl")) / 2**20
        print(f"{len(WHEELS)} wheels in {args.directory}, {size:.1f} MB: ready for the device")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
