#!/usr/bin/env bash
# GPU check for a machine with nothing but this repo and a CUDA PyTorch (no network needed):
# builds the CUDA extension in place, runs the kernel tests, the benchmarks (the main job, co-attention,
# concat attention, Owl3/decode rows against the peers, fusion layers), the model tests and the pytest-benchmark
# suites (quick grids), and writes logs, JUnit XML, benchmark JSON and summary.json under $OUT.
#   OUT=/some/dir bench/gpu_check.sh        (default OUT=bench/out/gpu_check)
# MPLUG_KERNELS_CUDA_ARCHS defaults to this GPU's own architecture; MAX_JOBS to the core count.
# The whole run keeps within GPU_CHECK_SECONDS (default 570: the device tool stops a command at 600):
# each step has a cap and gets at most the time left; a step cut short reports exit 124 and keeps its
# log. GPU_CHECK_STEPS picks steps (default: all, in priority order), e.g. for a second call
#   GPU_CHECK_STEPS="install model_tests bench_tests" bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out/gpu_check}"
PYTHON="${PYTHON:-python}"
BUDGET="${GPU_CHECK_SECONDS:-570}"
STEPS=" ${GPU_CHECK_STEPS:-environment install info kernel_tests main_job estimate co_attention concat_attention owl3 fusion_layers estimate_vs_measured model_tests bench_tests} "
mkdir -p "$OUT"
declare -A RESULTS=()

run_step() {  # run_step NAME CAP_SECONDS COMMAND...: log to $OUT/NAME.log, remember the exit status
  local name=$1 cap=$2
  shift 2
  [[ "$STEPS" == *" $name "* ]] || return 0
  local left=$((BUDGET - SECONDS - 10))
  ((left < cap)) && cap=$left
  if ((cap <= 0)); then
    echo "== $name: no time left"
    RESULTS[$name]=124
    return 0
  fi
  echo "== $name (at most ${cap}s): $*"
  timeout --kill-after=5 "$cap" "$@" >"$OUT/$name.log" 2>&1
  RESULTS[$name]=$?
  echo "   exit ${RESULTS[$name]} after ${SECONDS}s (log: $OUT/$name.log)"
  tail -n 5 "$OUT/$name.log"
}

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA device; nothing to check" >&2
  exit 2
fi
DEVICE_ARCH=$("$PYTHON" -c "import torch; major, minor = torch.cuda.get_device_capability(); print(f'{major}{minor}')")
export MPLUG_KERNELS_CUDA_ARCHS="${MPLUG_KERNELS_CUDA_ARCHS:-$DEVICE_ARCH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

run_step environment 30 sh -c "nvidia-smi; nvcc --version; $PYTHON -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())'"
run_step install 200 "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e .
run_step info 30 "$PYTHON" -m mplug_kernels.info
# Kernel tests first, the model's after the benchmarks; each test file in its own pytest process, 8 at a
# time (Triton compiles on the CPU), logs and JUnit XML per file. One fixed Triton configuration in the
# tests (each autotuning candidate has a test of its own); the benchmarks autotune.
KERNEL_TESTS=(tests/test_co_attention.py tests/test_concat_attention.py tests/test_cuda_extension.py
  tests/test_merge_attention_states.py tests/test_connected_attention.py tests/test_co_attention_stack.py
  tests/test_absorbed_co_attention.py tests/test_dispatch.py)
MODEL_TESTS=()
for file in tests/test_*.py; do
  [[ " ${KERNEL_TESTS[*]} " == *" $file "* ]] || MODEL_TESTS+=("$file")
done
export OUT PYTHON
PYTEST_ONE_FILE='name=$(basename "$1" .py); MPLUG_KERNELS_TRITON_AUTOTUNE=0 "$PYTHON" -m pytest "$1" -q -rs --durations=10 --junitxml="$OUT/$name.xml" >"$OUT/$name.log" 2>&1; status=$?; echo "$1: exit $status"; exit $((status != 0))'
run_step kernel_tests 200 sh -c 'printf "%s\n" "$@" | xargs -P 8 -I{} sh -c "$0" _ {}' "$PYTEST_ONE_FILE" "${KERNEL_TESTS[@]}"
# The benchmarks time each cell for at most --budget seconds after its 5 repeats (bench.common.measure).
run_step main_job 240 "$PYTHON" -m bench --budget 0.2 --json-dir "$OUT"
# The split plan's modelled time (ESTIMATE, no GPU needed) next to the measured logs, to compare with them.
run_step estimate 30 "$PYTHON" -m bench.static --estimate --json "$OUT/estimate.json"
# bench_owl3 compiles FlexAttention once per case and writes its JSON after every case: cut short, it keeps its rows.
for module in bench.bench_co_attention bench.bench_concat_attention bench.bench_owl3 bench.bench_fusion_layers; do
  run_step "${module#bench.bench_}" 90 "$PYTHON" -m "$module" --budget 0.2 --json-dir "$OUT"
done
# The ESTIMATE beside the measured cuda forward of the same shapes (printed into the log and the step's tail).
run_step estimate_vs_measured 30 "$PYTHON" -m bench.estimate_vs_measured "$OUT/estimate.json" "$OUT/co_attention.json" \
  "$OUT/concat_attention.json" --json "$OUT/estimate_vs_measured.json"
run_step model_tests 150 sh -c 'printf "%s\n" "$@" | xargs -P 8 -I{} sh -c "$0" _ {}' "$PYTEST_ONE_FILE" "${MODEL_TESTS[@]}"
run_step bench_tests 120 "$PYTHON" -m pytest bench -q -rs --quick --junitxml="$OUT/bench_tests.xml"

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
