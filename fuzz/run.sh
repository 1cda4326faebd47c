#!/usr/bin/env bash
# Runs every cargo-fuzz target for a short, bounded time on the committed corpus (fuzz/corpus/<target>)
# and fails on the first crash, leak or failed invariant; the input that did it is left in
# fuzz/artifacts/<target>/ (replay: cd fuzz && cargo +nightly fuzz run <target> <artifact>).
#   FUZZ_SECONDS   seconds per target (default 20)
#   FUZZ_TARGETS   space-separated targets to run (default: all of them)
# New inputs a run finds go to a scratch directory, not into the committed corpus; to keep some, run
# `cargo +nightly fuzz run <target> corpus/<target>` and then `cargo +nightly fuzz cmin <target>`.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-20}"

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: cargo-fuzz needs a nightly toolchain and \`cargo +nightly\` does not work here" >&2
  echo "fuzz: install one with \`rustup toolchain install nightly\`" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

targets="${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}"
# One build of every target first, so the timings below are fuzzing only.
cargo +nightly fuzz build -O

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for t in $targets; do
  mkdir -p "corpus/$t" "$scratch/$t"
  echo "fuzz: $t for ${seconds}s"
  # The first corpus directory receives new inputs: the scratch one, so the committed seeds stay as they are.
  set +e
  cargo +nightly fuzz run -O "$t" "$scratch/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$scratch/$t.log" 2>&1
  status=$?
  set -e
  grep -E '^(INFO: seed corpus|Done [0-9]+ runs)|stat::number_of_executed_units|stat::new_units_added' "$scratch/$t.log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$scratch/$t.log" >&2
    echo "fuzz: $t FAILED (exit $status); the input is in fuzz/artifacts/$t/" >&2
    exit "$status"
  fi
done
echo "fuzz: all targets passed (${seconds}s each)"
