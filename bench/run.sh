#!/usr/bin/env bash
# greenlight against nginx on this machine; writes bench/out/results.md (see docs/benchmarks.md).
# Needs: root or the packages wrk, nginx-light, python3 (installed here if missing); 2+ CPUs.
# Usage: bench/run.sh [--quick] [extra bench.py flags, e.g. --rounds 5 --seconds 15]
# Not part of cargo test or CI's pass/fail.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light >/dev/null
fi
cargo build --release --locked --quiet
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

args=()
for arg in "$@"; do
  if [ "$arg" = "--quick" ]; then
    args+=(--rounds 1 --seconds 3 --idle 2000)
  else
    args+=("$arg")
  fi
done
exec python3 bench/bench.py "${args[@]}"
