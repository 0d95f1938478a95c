#!/usr/bin/env bash
# Set up both environments and run the test suite in each:
#   .venv     PyTorch on transformers 5.x (TensorFlow tests skip)
#   .venv-tf  PyTorch + TensorFlow on transformers 4.57 (TF backend, parity, PyTorch on 4.x)
# Extra arguments go to pytest, e.g. bash scripts/test.sh -k data
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh all
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TF_CPP_MIN_LOG_LEVEL=2
export CLM_SLOW_TESTS=1  # include the TensorFlow default run (a few minutes)
echo "[test] PyTorch environment (transformers $(.venv/bin/python -c 'import transformers; print(transformers.__version__)'))"
.venv/bin/python -m pytest -q "$@"
echo "[test] TensorFlow environment (transformers $(.venv-tf/bin/python -c 'import transformers; print(transformers.__version__)'))"
.venv-tf/bin/python -m pytest -q "$@"
