#!/usr/bin/env bash
# Install denselora with its test extras and run the whole suite: Rust (cargo test) and Python (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet -e '.[test]'
cargo test --workspace --quiet
# pytest exits 5 when it collects nothing; that fails here like any other non-zero status.
python3 -m pytest -q tests
