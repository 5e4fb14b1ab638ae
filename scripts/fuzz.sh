#!/usr/bin/env bash
# Runs each fuzz target for SECONDS (default 60), growing the committed corpora in
# fuzz/corpus/<target>. A crash is saved under fuzz/artifacts/<target>/; copy it into
# fuzz/regressions/<target>/ and the corpus replay test (part of scripts/test.sh) keeps it
# fixed forever.
#
#   scripts/fuzz.sh 600                     # every target, 10 minutes each
#   scripts/fuzz.sh 3600 waf_compile        # one target for an hour
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(purge_request purge_pattern http_head waf_compile agent_message coordinator_message sitemap)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
# cargo-fuzz needs nightly flags (-Zsanitizer); the stable toolchain accepts them this way.
export RUSTC_BOOTSTRAP=1
cd fuzz
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  echo "== $t for ${seconds}s"
  cargo fuzz run -O "$t" "corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -timeout=10 \
    -artifact_prefix="artifacts/$t/" -print_final_stats=1
done
