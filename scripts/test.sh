#!/usr/bin/env bash
# Set up both environments and run the test suite across them:
#   .venv     everything: framework-free and PyTorch tests on transformers 5.x (TensorFlow tests skip)
#   .venv-tf  what that environment adds (CLM_TEST_SCOPE=tf): TensorFlow, parity, and the PyTorch tests marked
#             `compat` on transformers 4.57; framework-free tests are not run twice
# Extra arguments go to pytest, e.g. bash scripts/test.sh -k data
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh all
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TF_CPP_MIN_LOG_LEVEL=2
export CLM_SLOW_TESTS=1  # include the TensorFlow default run (a few minutes)
echo "[test] PyTorch environment (transformers $(.venv/bin/python -c 'import transformers; print(transformers.__version__)'))"
.venv/bin/python -m pytest -q --durations=10 "$@"
echo "[test] TensorFlow environment (transformers $(.venv-tf/bin/python -c 'import transformers; print(transformers.__version__)'))"
CLM_TEST_SCOPE=tf .venv-tf/bin/python -m pytest -q --durations=10 "$@"
