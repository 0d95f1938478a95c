#!/usr/bin/env bash
# Create clm's virtual environments with uv, at the versions CI tests (constraints/*.txt).
#   bash scripts/setup.sh        -> .venv     PyTorch, transformers 5.x
#   bash scripts/setup.sh tf     -> .venv-tf  PyTorch + TensorFlow, transformers 4.57 (the last with TF models)
#   bash scripts/setup.sh keras  -> .venv-keras Keras 3 + KerasHub on TensorFlow and JAX (CPU builds), no torch
#   bash scripts/setup.sh all    -> all three, at once
#   bash scripts/setup.sh lock   -> re-resolve constraints/*.txt to the newest releases pyproject.toml allows
#                                   (an upgrade on purpose: run the tests, then commit the new files)
# torch is installed with an exact pin, outside the constraints: an open range would pull several GB of CUDA
# packages onto a CPU machine. TORCH_SPEC picks another build; with uv, UV_TORCH_BACKEND=cpu (or cu128, ...)
# takes it from PyTorch's own index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
UV_SPEC=uv==0.13.9
export UV_FIND_LINKS=${UV_FIND_LINKS:-${PIP_FIND_LINKS:-}}  # a local wheel folder pip is told about (a CPU torch)
[ -n "$UV_FIND_LINKS" ] || unset UV_FIND_LINKS

if command -v uv >/dev/null 2>&1; then
  uv() { command uv "$@"; }
else
  "$PYTHON" -m uv --version >/dev/null 2>&1 || "$PYTHON" -m pip install -q --disable-pip-version-check "$UV_SPEC" \
    2> >(grep -v "^WARNING: \(Location\|Running pip as\)" >&2)
  uv() { "$PYTHON" -m uv "$@"; }
fi

overrides() {  # the keras environment drops tensorflow-text's "tensorflow" requirement (it has tensorflow-cpu)
  [ "$1" != keras ] || echo "--override constraints/keras-overrides.txt"
}

make_env() {  # DIR EXTRAS PINS [torch]: torch only where the extras need it (the keras environment has none)
  local dir=$1 extras=$2 pins=$3 torch=${4-$TORCH_SPEC}
  [ -x "$dir/bin/python" ] || uv venv -q --python "$PYTHON" "$dir"
  echo "[setup] $dir: ${torch:+$torch and }clm[$extras] at the versions in $pins"
  # shellcheck disable=SC2046
  uv pip install -q --python "$dir/bin/python" -c "$pins" $(overrides "${extras%%,*}") $torch -e ".[$extras]"
}

lock() {  # constraints/NAME.txt: every package the extras pull in, exactly; torch stays TORCH_SPEC's
  local name=$1 extras=$2 args=()
  for e in ${extras//,/ }; do args+=(--extra "$e"); done
  if [ "$name" = keras ]; then : > constraints/.torch.in; else echo "$TORCH_SPEC" > constraints/.torch.in; fi
  # shellcheck disable=SC2046
  uv pip compile -q pyproject.toml constraints/.torch.in "${args[@]}" --python-version 3.11 --no-header \
    --no-annotate $(overrides "$name") | grep -v '^torch==' > "constraints/$name.txt"
  rm constraints/.torch.in
  echo "[setup] constraints/$name.txt: $(wc -l < "constraints/$name.txt") packages"
}

case "${1:-pt}" in
  pt)    make_env .venv pt,test constraints/pt.txt ;;
  tf)    make_env .venv-tf pt,tf,test constraints/tf.txt ;;
  keras) make_env .venv-keras keras,test constraints/keras.txt "" ;;
  all)   make_env .venv pt,test constraints/pt.txt & first=$!
         make_env .venv-tf pt,tf,test constraints/tf.txt & second=$!
         make_env .venv-keras keras,test constraints/keras.txt "" & third=$!
         wait "$first"; wait "$second"; wait "$third" ;;
  lock)  lock pt pt,test; lock tf pt,tf,test; lock keras keras,test ;;
  *)     echo "usage: bash scripts/setup.sh [pt|tf|keras|all|lock]" >&2; exit 2 ;;
esac
