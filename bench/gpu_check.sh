#!/usr/bin/env bash
# The GPU check, one device call: install the carried wheels, run `pytest -m gpu`, then time
# AdamW (fused vs foreach, with clipping) and the training step grid, and write BENCHMARKS.md's
# GPU sections to OUT. Sized for one H100/H200: --quick < 3 minutes, the full run < 8.
#
#   bash bench/gpu_check.sh [--quick] [--dry-run] [--wheels DIR] OUT
#
#   --quick     the tests not marked slow, and one cell of the grid (danube_1p8b at 2,048:
#               transformers bf16, danube bf16 SDPA, danube FP8 torchao compiled)
#   --dry-run   on any machine, in seconds: the wheels are all there and installable on the
#               device, the configs compose, the commands below parse, the GPU tests collect
#   --wheels    default .whl (filled by `python bench/gpu_wheels.py fetch`)
#
# OUT receives gpu_check.log (everything printed), BENCHMARKS.md (the repository's, with the
# sections written on the device) and junit.xml (the test results). Each phase has its own
# time limit; a phase that fails or runs out does not stop the next. Exit status: 0 when every
# phase passed.
set -uo pipefail
cd "$(dirname "$0")/.."

quick=0 dry=0 wheels=.whl out=
while [ $# -gt 0 ]; do
    case $1 in
        --quick) quick=1 ;;
        --dry-run) dry=1 ;;
        --wheels) wheels=$2; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
        *) out=$1 ;;
    esac
    shift
done
[ -n "$out" ] || { echo "gpu_check.sh: give the output folder (on the device: \$OUT)" >&2; exit 2; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
exec > >(tee -a "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1

# Budgets, seconds. The grid starts no side after its budget; the last one started may run
# on (a compiled 1.8B side: ~45 s), hence its phase limit. Full: ~15 install and versions
# + 140 tests + ~20 AdamW + 240 grid + its tail < 8 minutes. Quick: ~15 + 60 + 75 + tail < 3.
if [ $quick = 1 ]; then
    marks="gpu and not slow"; tests_limit=60; grid=gpu-quick; grid_budget=75; tail_limit=45; adamw=0
else
    marks="gpu"; tests_limit=140; grid=gpu; grid_budget=240; tail_limit=60; adamw=1
fi
tests=(tests/gpu tests/model/test_attention.py)
py=python3
failed=() phases=()

phase() {  # phase NAME SECONDS COMMAND...: run it under a time limit, note the outcome
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "=== $name (limit ${limit}s): $*"
    # SIGINT first: pytest still writes junit.xml, the benchmark still writes what it measured.
    timeout --signal=INT --kill-after=20 "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc after $(( $(date +%s) - start ))s"
    phases+=("$name:$rc:$(( $(date +%s) - start ))")
    [ $rc = 0 ] || failed+=("$name (exit $rc)")
}

if [ $dry = 1 ]; then
    # Here, anywhere: nothing is installed and nothing is timed.
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    phase wheels 30 $py bench/gpu_wheels.py check "$wheels"
    phase configs 60 $py - <<'EOF'
from hydra import compose, initialize_config_dir
from danube.config import PretrainConfig, typed
from pathlib import Path
runs = [["debug=fast", "trainer=h100x1", "precision=bf16"],
        ["debug=fast", "trainer=h100x1", "precision=fp8", "precision.backend=torchao"],
        ["debug=fast", "trainer=h100x8_fsdp", "trainer.devices=1", "precision=fp8", "precision.backend=torchao",
         "train.compile=true"]]
with initialize_config_dir(config_dir=str(Path("conf").resolve()), version_base="1.3"):
    for overrides in runs:
        # The schema and its rules, not the hardware (this machine may have no GPU).
        assert typed(compose("train", overrides=overrides), PretrainConfig, "train.py").validate(), overrides
        print("composes:", " ".join(overrides))
EOF
    phase grid-plan 60 $py bench/train_throughput.py --grid $grid --dry-run
    phase adamw-plan 30 $py bench/step_parts.py --device cuda --dry-run
    phase collect 120 $py -m pytest -q -p no:cacheprovider --collect-only -m "$marks" "${tests[@]}"
else
    phase install 120 $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$wheels"/*.whl
    export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    phase versions 60 $py -c "
import torch, lightning, transformers, hydra, litdata, danube, importlib.util as u
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())
print('lightning', lightning.__version__, 'transformers', transformers.__version__, 'hydra', hydra.__version__,
      'litdata', litdata.__version__)
for name in ('torchao', 'transformer_engine', 'flash_attn', 'xdist'):
    print(name, 'installed' if u.find_spec(name) else 'not installed')
from danube.precision import _import_torchao_float8; _import_torchao_float8(); print('torchao float8 imports')
"
    cp BENCHMARKS.md "$out/BENCHMARKS.md"
    parallel=()
    $py -c "import xdist" 2>/dev/null && parallel=(-n 4)  # tiny models: four test processes share the GPU
    phase tests $tests_limit $py -m pytest -p no:cacheprovider -v -rfEs --durations=15 "${parallel[@]}" \
        --junitxml="$out/junit.xml" -m "$marks" "${tests[@]}"
    if [ $adamw = 1 ]; then
        phase adamw 60 $py bench/step_parts.py --device cuda --benchmarks "$out/BENCHMARKS.md"
    fi
    phase grid $(( grid_budget + tail_limit )) $py bench/train_throughput.py --grid $grid --time-budget $grid_budget \
        --benchmarks "$out/BENCHMARKS.md"
    # The phases and the test counts as BENCHMARKS.md's gpu_check section (beside the tables above).
    GPU_CHECK_PHASES="${phases[*]}" GPU_CHECK_ARGS="$([ $quick = 1 ] && echo --quick)" $py - "$out" <<'EOF'
import os, sys, xml.etree.ElementTree as ET
from pathlib import Path
sys.path.insert(0, "bench")
import benchlib
out = Path(sys.argv[1])
lines = ["| phase | exit | seconds |", "|---|---:|---:|"]
lines += [f"| {n} | {rc} | {s} |" for n, rc, s in (p.split(":") for p in os.environ["GPU_CHECK_PHASES"].split())]
tests = "no junit.xml: the tests did not finish"
if (out / "junit.xml").is_file():
    suite = ET.parse(out / "junit.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    bad = [c.get("classname", "") + "::" + c.get("name", "") for c in suite.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    tests = f"{n - f - e - s} passed, {f} failed, {e} errors, {s} skipped" + (": " + ", ".join(bad) if bad else "")
quick = bool(os.environ["GPU_CHECK_ARGS"])
benchlib.write_section("gpu_check_quick" if quick else "gpu_check", "GPU check (quick)" if quick else "GPU check",
                       f"`pytest -m gpu`: {tests}.\n\n" + "\n".join(lines), out / "BENCHMARKS.md",
                       command="bash bench/gpu_check.sh --quick OUT" if quick else "bash bench/gpu_check.sh OUT")
print(f"wrote {out / 'BENCHMARKS.md'}")
EOF
    # Last, the tables (a device call returns the end of the output).
    for section in gpu_check step_parts_gpu train_throughput_gpu; do
        [ $quick = 1 ] && section=${section}_quick
        sed -n "/<!-- bench:$section -->/,/<!-- \/bench:$section -->/p" "$out/BENCHMARKS.md" | grep -E '^(\||`pytest)'
    done
fi

echo "=== gpu_check.sh $([ $quick = 1 ] && echo --quick) $([ $dry = 1 ] && echo --dry-run): ${#failed[@]} phase(s) failed${failed[*]:+: ${failed[*]}}"
[ ${#failed[@]} = 0 ]
