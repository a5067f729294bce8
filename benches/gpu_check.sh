#!/usr/bin/env bash
# benches/gpu_check.py on a GPU machine that has PyTorch, transformers and PEFT but cannot download:
# installs the wheels in dist/ (the denselora wheel, and any package the machine lacks; docs/gpu.md
# says how to make them) into a fresh folder, without pip reaching an index or changing the
# machine's environment, then runs the check with the arguments given (e.g. --out PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
wheels="${DENSELORA_WHEELS:-dist}"

shopt -s nullglob
all=("$wheels"/*.whl)
ours=("$wheels"/denselora-*.whl)
if [[ ${#ours[@]} -ne 1 ]]; then
    echo "gpu_check.sh: expected one denselora wheel in $wheels/, found ${#ours[@]} (build it with: maturin build --release --locked --out dist)" >&2
    exit 2
fi

site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${all[@]}"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c 'import sys, denselora._core; print(f"denselora {denselora.__version__} from {denselora.__file__} on Python {sys.version.split()[0]}")'
python3 benches/gpu_check.py "$@"
