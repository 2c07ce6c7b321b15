#!/usr/bin/env bash
# Slow clients against a release build: slowhttptest in each mode (-H slowloris, -B slow body,
# -X slow read) holds 1,000 connections while a normal client probes the healthcheck; the
# probe's p99 must stay under 100 ms, the slow heads and bodies must get their 408 at the read
# timeout (20 s here, so the connections are really held while the probe runs), and
# greenlight must still be serving afterwards.
# Needs: Debian's slowhttptest and python3 (installed here with apt-get if missing, which
# needs root); no root otherwise. Talks only to 127.0.0.1. Takes about two minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v slowhttptest >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slowhttptest >/dev/null
fi
cargo build --release --locked --quiet
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

work=$(mktemp -d)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill -KILL "$server_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
./target/release/greenlight --host 127.0.0.1 --port "$port" --log-format json --read-timeout 20s \
  2>"$work/server.log" &
server_pid=$!
timeout 10 bash -c "until grep -q 'starting server' '$work/server.log'; do sleep 0.05; done"
url="http://127.0.0.1:$port/v1/healthcheck"

# The probe: one fresh connection per healthcheck, every 20 ms, for as long as told; prints p99 in ms.
probe() {
  python3 - "$port" "$1" <<'PY'
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
request = b"GET /v1/healthcheck HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"
latencies, failures = [], 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    start = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(request)
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        if not data.startswith(b"HTTP/1.1 200 "):
            failures += 1
        latencies.append((time.monotonic() - start) * 1000)
    except OSError:
        failures += 1
    time.sleep(0.02)
latencies.sort()
p99 = latencies[int(len(latencies) * 0.99) - 1] if latencies else float("inf")
print(f"{p99:.2f} {len(latencies)} {failures}")
PY
}

status=0
for mode in H B X; do
  case $mode in
    H) args=(-H -i 3 -x 24) ;;
    B) args=(-B -i 3 -x 24 -s 8192 -t POST) ;;
    X) args=(-X -k 3 -w 1 -y 2 -n 3 -z 32) ;;
  esac
  timeouts_before=$(grep -c '"status":408' "$work/server.log" || true)
  slowhttptest -c 1000 -r 500 -l 30 -p 3 "${args[@]}" -u "$url" >"$work/slow-$mode.raw" 2>&1 &
  attack=$!
  # Probe once the attack holds its connections (slowhttptest reports them every second).
  connected() { sed 's/\x1b\[[0-9;]*[A-Za-z]//g' "$work/slow-$mode.raw" | grep -o 'connected: *[0-9]*' | awk '{print $2}' | sort -n | tail -1; }
  for _ in $(seq 100); do [ "$(connected)" -ge 900 ] 2>/dev/null && break; sleep 0.2; done
  read -r p99 probes failures < <(probe 12)
  wait "$attack" || true
  peak=$(connected)
  timeouts=$(( $(grep -c '"status":408' "$work/server.log" || true) - timeouts_before ))
  echo "slowhttptest -$mode: peak connected ${peak:-?}; probe p99 ${p99} ms over ${probes} requests, ${failures} failed; ${timeouts} answered 408"
  if ! awk -v p="$p99" 'BEGIN { exit !(p < 100) }' || [ "$failures" -ne 0 ]; then
    echo "FAIL: -$mode: the probe's p99 must stay under 100 ms with no failures"
    status=1
  fi
  if [ "${peak:-0}" -lt 900 ]; then
    echo "FAIL: -$mode: slowhttptest held only ${peak:-0} connections (want ~1000)"
    status=1
  fi
  if [ "$mode" != X ] && [ "$timeouts" -lt 900 ]; then
    echo "FAIL: -$mode: only $timeouts slow requests were answered 408 at the read timeout"
    status=1
  fi
done

if ! kill -0 "$server_pid" 2>/dev/null; then
  echo "FAIL: greenlight died"; cat "$work/server.log"; exit 1
fi
python3 - "$port" <<'PY'
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as s:
    s.sendall(b"GET /v1/healthcheck HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 200 "), "still serving"
PY
kill -TERM "$server_pid"
wait "$server_pid" || { echo "FAIL: exit status $?"; status=1; }
server_pid=""
[ "$status" -eq 0 ] && echo "slow_clients: 3 passed, 0 failed" || echo "slow_clients: FAILED"
exit "$status"
