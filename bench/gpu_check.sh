#!/usr/bin/env bash
# GPU check for a machine with nothing but this repo and a CUDA PyTorch (no network needed):
# builds the CUDA extension in place, runs the whole test suite (GPU tests included) and the kernel
# benchmarks (the main job with --all, concat attention, fusion layers), and writes logs, JUnit XML, benchmark JSON and summary.json under $OUT.
#   OUT=/some/dir bench/gpu_check.sh        (default OUT=bench/out/gpu_check)
# MPLUG_KERNELS_CUDA_ARCHS defaults to this GPU's own architecture; MAX_JOBS to the core count.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out/gpu_check}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
declare -A RESULTS=()

run_step() {  # run_step NAME COMMAND...: log to $OUT/NAME.log, remember the exit status
  local name=$1
  shift
  echo "== $name: $*"
  "$@" >"$OUT/$name.log" 2>&1
  RESULTS[$name]=$?
  echo "   exit ${RESULTS[$name]} (log: $OUT/$name.log)"
  tail -n 5 "$OUT/$name.log"
}

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA device; nothing to check" >&2
  exit 2
fi
DEVICE_ARCH=$("$PYTHON" -c "import torch; major, minor = torch.cuda.get_device_capability(); print(f'{major}{minor}')")
export MPLUG_KERNELS_CUDA_ARCHS="${MPLUG_KERNELS_CUDA_ARCHS:-$DEVICE_ARCH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

run_step environment sh -c "nvidia-smi; nvcc --version; $PYTHON -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())'"
run_step install "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e .
run_step info "$PYTHON" -m mplug_kernels.info
run_step tests "$PYTHON" -m pytest tests -q -rs --durations=25 --junitxml="$OUT/tests.xml"
run_step bench_tests "$PYTHON" -m pytest bench -q -rs --junitxml="$OUT/bench_tests.xml"
run_step main_job "$PYTHON" -m bench --all --json-dir "$OUT"
for module in bench.bench_concat_attention bench.bench_fusion_layers; do
  run_step "${module#bench.}" "$PYTHON" -m "$module" --json-dir "$OUT"
done

summary=""
failed=0
for name in "${!RESULTS[@]}"; do
  summary+="\"$name\": ${RESULTS[$name]}, "
  [ "${RESULTS[$name]}" -ne 0 ] && failed=1
done
"$PYTHON" - "$OUT" "{${summary%, }}" <<'PY'
import datetime, json, sys, torch
out, steps = sys.argv[1], json.loads(sys.argv[2])
summary = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "device": torch.cuda.get_device_name(),
           "archs": __import__("os").environ["MPLUG_KERNELS_CUDA_ARCHS"], "exit_status": steps}
with open(f"{out}/summary.json", "w") as handle:
    json.dump(summary, handle, indent=2)
print(json.dumps(summary, indent=2))
PY
echo "gpu_check: results in $OUT (copy the benchmark JSON to bench/results/ to commit it)"
exit $failed
