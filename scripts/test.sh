#!/usr/bin/env bash
# Runs every test: unit tests and the end-to-end tests against real varnishd.
# Installs varnish + varnish-modules first when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# Every crate's modules import downwards only, without cycles (ARCHITECTURE.md's layers).
python3 scripts/module-graph.py
cargo build --workspace --bins --locked
cargo test --workspace --locked -- --test-threads "${TEST_THREADS:-2}"
