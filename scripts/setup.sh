#!/usr/bin/env bash
# Create clm's virtual environments.
#   bash scripts/setup.sh        -> .venv     PyTorch, current transformers (5.x)
#   bash scripts/setup.sh tf     -> .venv-tf  PyTorch + TensorFlow, transformers 4.57 (the last with TF models)
#   bash scripts/setup.sh all    -> both
# torch is installed first with an exact pin: an open range would pull several GB of CUDA wheels on a CPU
# machine. On a GPU machine, set TORCH_SPEC to the build you want (e.g. TORCH_SPEC="torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

pip_quiet() {  # pip, without the index's "Location ... is ignored" chatter; keeps pip's exit status
  "$@" 2> >(grep -v "^WARNING: Location" >&2)
}

make_env() {
  local dir=$1 extras=$2
  if [ ! -x "$dir/bin/python" ]; then
    echo "[setup] creating $dir"
    "$PYTHON" -m venv "$dir"
  fi
  echo "[setup] installing $TORCH_SPEC and clm[$extras] into $dir"
  pip_quiet "$dir/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
  pip_quiet "$dir/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]"
}

case "${1:-pt}" in
  pt)  make_env .venv pt,test ;;
  tf)  make_env .venv-tf pt,tf,test ;;
  all)  # both at once: installing is mostly waiting on downloads and disk
        make_env .venv pt,test & first=$!
        make_env .venv-tf pt,tf,test & second=$!
        wait "$first"; wait "$second" ;;
  *)   echo "usage: bash scripts/setup.sh [pt|tf|all]" >&2; exit 2 ;;
esac
