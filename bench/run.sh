#!/usr/bin/env bash
# greenlight against nginx, and against itself at other worker counts, on this machine (see
# docs/benchmarks.md). Writes bench/out/.
# Needs: root or the packages wrk, nginx-light, python3 (gnuplot-nox for --plot); installed here
# if missing. 2+ CPUs.
#
# Usage: bench/run.sh [--quick] [--scaling] [--plot] [extra bench.py flags, e.g. --rounds 5 --seconds 15]
#   (no mode)   (a)-(e) against nginx, (w) --workers 2 against --workers 1, start-up, drain exit
#               -> bench/out/results.md
#   --scaling   req/s and CPU/request for --workers 1..CPUs, wrk on CPUs of its own where there
#               are enough -> bench/out/scaling.md, scaling.tsv
#   --plot      the latency distribution of greenlight and nginx (bench/out/latency.md), then the
#               SVGs of docs/benchmarks/ from it and from bench/out/scaling.tsv (running the
#               scaling mode first if that file is missing, or if --scaling is given too)
#   --against BIN  this build against an earlier greenlight binary BIN ((a) keep-alive CPU per
#               request, (c) pipelined throughput), both --workers 1 on CPU 0
#               -> bench/out/against.md (what a change cost; e.g. build the commit before it in a
#               git worktree: git worktree add /tmp/base REV && (cd /tmp/base && cargo build --release))
#   --quick     1 round x 3 s (2,000 idle connections): a smoke check; combines with the above
# Every load runs for a fixed time. Not part of cargo test or CI's pass/fail.
set -euo pipefail
cd "$(dirname "$0")/.."

scaling=0 plot=0 against=""
args=()
for arg in "$@"; do
  case "$arg" in
    --quick) args+=(--rounds 1 --seconds 3 --idle 2000) ;;
    --scaling) scaling=1 ;;
    --plot) plot=1 ;;
    --against) against=next ;;
    *)
      if [ "$against" = next ]; then against=$arg; else args+=("$arg"); fi ;;
  esac
done

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx-light)
if [ "$plot" = 1 ] && ! command -v gnuplot >/dev/null; then need+=(gnuplot-nox); fi
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --locked --quiet
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

if [ "$scaling" = 0 ] && [ "$plot" = 0 ] && [ -z "$against" ]; then
  exec python3 bench/bench.py "${args[@]}"
fi
# --idle only applies to the default mode.
mode_args=()
skip=0
for arg in "${args[@]}"; do
  if [ "$skip" = 1 ]; then skip=0; continue; fi
  if [ "$arg" = "--idle" ]; then skip=1; continue; fi
  mode_args+=("$arg")
done
if [ -n "$against" ]; then
  exec python3 bench/bench.py --mode against --against "$against" "${mode_args[@]}"
fi
if [ "$scaling" = 1 ] || { [ "$plot" = 1 ] && [ ! -f bench/out/scaling.tsv ]; }; then
  python3 bench/bench.py --mode scaling "${mode_args[@]}"
fi
if [ "$plot" = 1 ]; then
  python3 bench/bench.py --mode latency "${mode_args[@]}"
  mkdir -p docs/benchmarks
  gnuplot -e "data='bench/out'; out='docs/benchmarks'" bench/plot.gp
  echo "wrote docs/benchmarks/{scaling-rps,scaling-cpu,latency-keepalive,latency-close}.svg"
fi
