#!/usr/bin/env bash
# Set up both environments and run the test suite across them, at once (each run is mostly one core):
#   .venv     everything: framework-free and PyTorch tests on transformers 5.x (TensorFlow tests skip)
#   .venv-tf  what that environment adds (CLM_TEST_SCOPE=tf): TensorFlow, parity, and the PyTorch tests marked
#             `compat` on transformers 4.57; framework-free tests are not run twice. Two pytest runs: the
#             stop/resume/several-process modules, and the rest
#   .venv-keras the keras backend's tests (CLM_TEST_SCOPE=keras): Keras 3 + KerasHub on TensorFlow and JAX
# Each environment's pytest output is printed when it ends; the times come last.
# Extra arguments go to both pytest runs, e.g. bash scripts/test.sh -k data
# CLM_COVERAGE=1 also measures line coverage of clm/ (subprocesses included), both environments combined.
set -euo pipefail
cd "$(dirname "$0")/.."
began=$(date +%s)
bash scripts/setup.sh all
set_up=$(( $(date +%s) - began ))
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TF_CPP_MIN_LOG_LEVEL=2
# One compute thread per process: three suites share the cores, and more threads only wait on each other (three
# PyTorch runs at once on 2 cores took 146 s with 2 threads each, 91 s with 1).
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1
# glibc keeps freed memory for reuse instead of unmapping and faulting in a step's large logits again
# (benchmarks/cpu_malloc.py: 1.56x the PyTorch tokens/s on CPU, system time 14.2 s -> 1.9 s per run).
export MALLOC_MMAP_THRESHOLD_=2000000000 MALLOC_TRIM_THRESHOLD_=4000000000 MALLOC_TOP_PAD_=500000000
logs=$(mktemp -d)
rm -rf .coverage-data && mkdir -p .coverage-data

suite() {  # NAME PYTHON [ENV=VALUE...]: pytest in that environment, output to $logs/NAME.log
  local name=$1 python=$2 start; shift 2
  start=$(date +%s)
  local run=(-m pytest)
  [ -z "${CLM_COVERAGE:-}" ] || run=(-m coverage run --rcfile=.coveragerc -m pytest)
  echo "[test] $name environment (transformers $("$python" -c 'import transformers; print(transformers.__version__)')) started"
  set +e
  env "$@" "$python" "${run[@]}" -q -p no:cacheprovider --durations=10 --junitxml="$logs/$name.xml" ${ARGS[@]+"${ARGS[@]}"} \
    > "$logs/$name.log" 2>&1
  echo $? > "$logs/$name.rc"
  echo $(( $(date +%s) - start )) > "$logs/$name.time"
}
ARGS=("$@")
# .venv-tf has the most to do: its subprocess-heavy modules (stop, resume, several processes) run beside the rest,
# so both cores stay busy once the PyTorch environment is done.
SUBPROCESS_TESTS=(tests/test_preemption.py tests/test_distributed.py)
suite pytorch .venv/bin/python & a=$!
(ARGS=("$@" "${SUBPROCESS_TESTS[@]}"); suite tensorflow-processes .venv-tf/bin/python CLM_TEST_SCOPE=tf) & b=$!
(ARGS=("$@" "${SUBPROCESS_TESTS[@]/#/--ignore=}"); suite tensorflow .venv-tf/bin/python CLM_TEST_SCOPE=tf) & c=$!
suite keras .venv-keras/bin/python CLM_TEST_SCOPE=keras XLA_FLAGS=--xla_cpu_multi_thread_eigen=false & d=$!
wait "$a" "$b" "$c" "$d"

status=0
for name in pytorch tensorflow-processes tensorflow keras; do
  echo; echo "[test] ---------------- $name environment"; cat "$logs/$name.log"
  [ "$(cat "$logs/$name.rc")" = 0 ] || [ "$(cat "$logs/$name.rc")" = 5 ] || status=1
done
if [ -n "${CLM_COVERAGE:-}" ]; then
  .venv/bin/python -m coverage combine --rcfile=.coveragerc -q && .venv/bin/python -m coverage report --rcfile=.coveragerc \
    | tail -1 | sed 's/^/[test] line coverage of clm\/, both environments: /'
fi
echo
echo "[test] set-up ${set_up} s; pytorch environment $(cat "$logs/pytorch.time") s; tensorflow environment" \
     "$(cat "$logs/tensorflow-processes.time") s and $(cat "$logs/tensorflow.time") s; keras environment" \
     "$(cat "$logs/keras.time") s (all four at once); ${SECONDS} s in all"
.venv/bin/python - "$logs"/*.xml <<'PY'
import sys, xml.etree.ElementTree as ET
n = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for path in sys.argv[1:]:
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for key in n:
            n[key] += int(suite.get(key, 0))
print(f"total: {n['tests'] - n['failures'] - n['errors'] - n['skipped']} passed, {n['failures'] + n['errors']} failed, "
      f"{n['skipped']} skipped")
PY
exit $status
