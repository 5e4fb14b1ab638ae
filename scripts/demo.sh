#!/usr/bin/env bash
# The local demo: a sample Magento-like origin, 3 regions (varnishd + edge-agent each)
# and a coordinator on 127.0.0.1. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --demo
# The two programs the demo runs (not the benchmark binaries of the tests crate).
cargo build --release --locked -p coordinator-cli -p edge-agent
exec target/release/coordinator demo --regions "${REGIONS:-3}" --base-port "${BASE_PORT:-7000}" \
  --state-dir "${STATE_DIR:-/tmp/varnish-coordinator-demo}" "$@"
