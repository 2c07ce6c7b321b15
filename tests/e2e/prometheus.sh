#!/usr/bin/env bash
# /metrics against the real tools: a release build (--workers 2, admin listener on) under wrk's
# load must give a scrape that `promtool check metrics` passes with no error and no lint
# warning; a real Prometheus server (its own config and data dir, 1 s scrape interval, nothing
# but this one job, no remote write, no alerting) scraping the admin /metrics must see every
# scrape succeed, and, after exactly N = 2,000 more requests (keep-alive and new connections
# mixed, every one a 200), must come to report up == 1 and sum(greenlight_requests_total) equal
# to what greenlight counted before them plus N, within 30 s.
# Needs: Debian's prometheus (it brings promtool; its own service is neither needed nor
# touched: this script starts a prometheus of its own on a free loopback port) and wrk, and
# python3 (installed here with apt-get if missing, which needs root); no root otherwise. Talks
# only to 127.0.0.1. Takes about 20 seconds.
set -euo pipefail
cd "$(dirname "$0")/../.."

need=()
{ command -v prometheus && command -v promtool; } >/dev/null || need+=(prometheus)
command -v wrk >/dev/null || need+=(wrk)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cargo build --release --locked --quiet

N=2000                  # requests of the exact phase
LOAD_SECONDS=5          # wrk's -d
CONNS=8                 # wrk's -c
WAIT_SECONDS=30         # how long Prometheus may take to show the final figures

work=$(mktemp -d /tmp/greenlight-prometheus.XXXXXX)
# The binary this run uses, even if target/ is rebuilt meanwhile.
cp target/release/greenlight "$work/greenlight"
server_pid=""; prom_pid=""; wrk_pid=""
cleanup() {
  set +e
  for pid in "$wrk_pid" "$prom_pid" "$server_pid"; do
    [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
  done
  wait 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; echo "prometheus: FAILED"; exit 1; }

# ------------------------------------------------------------------------------ helpers
# `scrape.py PORT`: the admin listener's /metrics on stdout (fails unless 200 and 0.0.4 text).
cat >"$work/scrape.py" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5) as r:
    ctype = r.headers.get("Content-Type", "")
    if r.status != 200 or not ctype.startswith("text/plain; version=0.0.4"):
        sys.exit(f"/metrics answered {r.status} with Content-Type {ctype!r}")
    sys.stdout.write(r.read().decode())
PY
# `query.py PORT PROMQL`: an instant query on Prometheus' HTTP API; prints one line per series,
# "{labels} value", or "(no data)"; fails on an API error.
cat >"$work/query.py" <<'PY'
import json, sys, urllib.parse, urllib.request
port, q = sys.argv[1], sys.argv[2]
url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
with urllib.request.urlopen(url, timeout=5) as r:
    body = json.load(r)
if body.get("status") != "success":
    sys.exit(f"query {q!r}: {body}")
result = body["data"]["result"]
if not result:
    print("(no data)")
for series in result:
    labels = ",".join(f'{k}="{v}"' for k, v in sorted(series["metric"].items()))
    print(f"{{{labels}}} {series['value'][1]}")
PY
# The exact client: `exact.py PORT N` sends exactly N GET /v1/healthcheck from 4 threads, each
# alternating runs of 25 requests on one keep-alive connection (the last one closing it) with
# runs of 25 requests each on a new connection (Connection: close); prints
# "ok non200 errors connections"; the first failures go to stderr.
cat >"$work/exact.py" <<'PY'
import socket, sys, threading
port, total = int(sys.argv[1]), int(sys.argv[2])
THREADS, RUN = 4, 25
lock = threading.Lock()
tally = {"ok": 0, "non200": 0, "errors": 0, "connections": 0}

def note(key, what=None):
    with lock:
        tally[key] += 1
        if what and tally["non200"] + tally["errors"] <= 10:
            print(what, file=sys.stderr)

def read_response(sock, buf):
    """One response from sock (buf: bytes already read); returns (status, rest of buf)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise OSError(f"connection closed mid-head after {buf[:80]!r}")
        buf += chunk
    head, _, buf = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(buf) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise OSError("connection closed mid-body")
        buf += chunk
    return status, buf[length:]

def request(close):
    return (b"GET /v1/healthcheck HTTP/1.1\r\nHost: exact\r\n"
            + (b"Connection: close\r\n" if close else b"") + b"\r\n")

def worker(count):
    keepalive = True
    while count > 0:
        run = min(RUN, count)
        count -= run
        if keepalive:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    note("connections")
                    buf = b""
                    for i in range(run):
                        s.sendall(request(i == run - 1))
                        status, buf = read_response(s, buf)
                        note("ok") if status == 200 else note("non200", f"keep-alive: status {status}")
            except (OSError, ValueError, IndexError) as e:
                note("errors", f"keep-alive run failed: {e!r}")
        else:
            for _ in range(run):
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                        note("connections")
                        s.sendall(request(True))
                        status, _ = read_response(s, b"")
                        note("ok") if status == 200 else note("non200", f"new connection: status {status}")
                except (OSError, ValueError, IndexError) as e:
                    note("errors", f"new-connection request failed: {e!r}")
        keepalive = not keepalive

shares = [total // THREADS + (1 if i < total % THREADS else 0) for i in range(THREADS)]
threads = [threading.Thread(target=worker, args=(n,)) for n in shares]
for t in threads: t.start()
for t in threads: t.join()
print(tally["ok"], tally["non200"], tally["errors"], tally["connections"])
PY

# metric FILE NAME: the sum of every sample of NAME (any labels) in the exposition FILE.
metric() { awk -v n="$2" '$1 == n || index($1, n "{") == 1 { s += $2 } END { printf "%d\n", s }' "$1"; }
# query PROMQL: Prometheus' answer (see query.py); value PROMQL: the single value, or "none".
query() { python3 "$work/query.py" "$prom_port" "$1"; }
value() { query "$1" 2>/dev/null | awk 'NR == 1 && $1 != "(no" { v = $NF } END { print (v == "" ? "none" : v) }'; }
# lint FILE LABEL: promtool check metrics on FILE; fails on any error or lint warning.
lint() {
  local out rc=0
  out=$(timeout 30 promtool check metrics <"$1" 2>&1) || rc=$?
  if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
    echo "   promtool check metrics ($2 scrape) exited $rc:"; echo "$out" | sed 's/^/     /'
    fail "promtool check metrics complained about the $2 scrape"
  fi
  echo "   promtool check metrics ($2 scrape, $(grep -c '^[a-z]' "$1") samples in $(grep -c '^# TYPE' "$1") families): no error, no warning"
}

# ------------------------------------------------------------------------------ greenlight
"$work/greenlight" --host 127.0.0.1 --port 0 --admin-addr 127.0.0.1:0 --workers 2 \
  --log-format json 2>"$work/server.log" &
server_pid=$!
timeout 10 bash -c "until grep -q '\"msg\":\"starting server\"' '$work/server.log'; do sleep 0.05; done" \
  || { cat "$work/server.log"; fail "greenlight did not start"; }
start_line=$(grep -m1 '"msg":"starting server"' "$work/server.log")
api_port=$(echo "$start_line" | grep -o '"addr":"127.0.0.1:[0-9]*"' | grep -o '[0-9]*"$' | tr -d '"')
admin_port=$(echo "$start_line" | grep -o '"admin_addr":"127.0.0.1:[0-9]*"' | grep -o '[0-9]*"$' | tr -d '"')
[ -n "$api_port" ] && [ -n "$admin_port" ] || fail "no addr/admin_addr in: $start_line"
echo "== greenlight $("$work/greenlight" --version | awk '{print $NF}'): API 127.0.0.1:$api_port, admin 127.0.0.1:$admin_port, 2 workers"

# ------------------------------------------------------------------------------ Prometheus
prom_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# Only this job: no rule files, no alertmanagers, no remote read or write.
cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: greenlight
    metrics_path: /metrics
    scheme: http
    static_configs:
      - targets: ["127.0.0.1:$admin_port"]
EOF
promtool check config "$work/prometheus.yml" >"$work/check-config.txt" 2>&1 \
  || { cat "$work/check-config.txt"; fail "promtool check config"; }
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
  --web.listen-address="127.0.0.1:$prom_port" >"$work/prometheus.log" 2>&1 &
prom_pid=$!
end=$((SECONDS + 20))
until python3 -c "import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:$prom_port/-/ready', timeout=2)" 2>/dev/null; do
  if ! kill -0 "$prom_pid" 2>/dev/null || [ "$SECONDS" -ge "$end" ]; then
    tail -20 "$work/prometheus.log"; fail "Prometheus did not become ready on 127.0.0.1:$prom_port"
  fi
  sleep 0.2
done
# Ready is not yet scraping: Prometheus hands new targets to its scrape loops every 5 s.
t0=$SECONDS; end=$((SECONDS + 20))
until [ "$(value 'up{job="greenlight"}')" = 1 ]; do
  [ "$SECONDS" -ge "$end" ] && { tail -20 "$work/prometheus.log"; fail "Prometheus did not scrape greenlight within 20s"; }
  sleep 0.2
done
echo "== Prometheus $(prometheus --version 2>&1 | awk 'NR == 1 {print $3}') on 127.0.0.1:$prom_port, scraping 127.0.0.1:$admin_port/metrics every 1s (first scrape up after $((SECONDS - t0))s)"

# ------------------------------------------------------------------------------ load
echo "== load: wrk -t1 -c$CONNS -d${LOAD_SECONDS}s, a scrape checked by promtool in the middle"
wrk -t1 -c"$CONNS" -d"${LOAD_SECONDS}s" --timeout 5s "http://127.0.0.1:$api_port/v1/healthcheck" >"$work/wrk.txt" 2>&1 &
wrk_pid=$!
sleep 2
python3 "$work/scrape.py" "$admin_port" >"$work/under-load.prom" || fail "scrape under load"
open_under_load=$(metric "$work/under-load.prom" greenlight_connections_open)
echo "   scrape under load: greenlight_requests_total $(metric "$work/under-load.prom" greenlight_requests_total), connections open $open_under_load"
[ "$open_under_load" -gt 0 ] || fail "the scrape under load shows no open connection: was wrk running?"
lint "$work/under-load.prom" "under-load"
wrk_status=0; wait "$wrk_pid" || wrk_status=$?; wrk_pid=""
[ "$wrk_status" -eq 0 ] || { cat "$work/wrk.txt"; fail "wrk exited $wrk_status"; }
wrk_requests=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
wrk_non2xx=$(grep -o 'Non-2xx or 3xx responses: [0-9]*' "$work/wrk.txt" | awk '{print $NF}' || true)
wrk_sockerr=$(grep -o 'Socket errors:.*' "$work/wrk.txt" || true)
wrk_sockerr_sum=$(echo "$wrk_sockerr" | { grep -o '[0-9]\+' || true; } | awk '{s += $1} END {print s + 0}')
echo "   wrk: ${wrk_requests:-?} requests completed, non-2xx ${wrk_non2xx:-0}, ${wrk_sockerr:-socket errors: none}"
[ -n "$wrk_requests" ] && [ "$wrk_requests" -gt 0 ] || { cat "$work/wrk.txt"; fail "wrk completed no request"; }
[ "${wrk_non2xx:-0}" -eq 0 ] || fail "wrk saw $wrk_non2xx non-2xx responses"

# ------------------------------------------------------------------------------ baseline
# Once wrk's connections are all closed and nothing is in flight, greenlight's count is final.
end=$((SECONDS + 10)); prev=""
while :; do
  python3 "$work/scrape.py" "$admin_port" >"$work/baseline.prom" || fail "baseline scrape"
  now="$(metric "$work/baseline.prom" greenlight_requests_total)"
  if [ "$(metric "$work/baseline.prom" greenlight_connections_open)" -eq 0 ] \
     && [ "$(metric "$work/baseline.prom" greenlight_requests_in_flight)" -eq 0 ] && [ "$now" = "$prev" ]; then
    break
  fi
  [ "$SECONDS" -ge "$end" ] && fail "greenlight's counters did not settle after wrk (connections open $(metric "$work/baseline.prom" greenlight_connections_open))"
  prev=$now; sleep 0.2
done
base_total=$now
base_received=$(metric "$work/baseline.prom" greenlight_requests_received_total)
base_accepted=$(metric "$work/baseline.prom" greenlight_connections_accepted_total)
cut=$((base_total - wrk_requests))
echo "   baseline (direct scrape, no load): sum(greenlight_requests_total) $base_total, received $base_received, connections accepted $base_accepted"
echo "   = wrk's $wrk_requests completed + $cut answered but cut off by wrk's end (at most one per connection: $CONNS)"
# Every API request so far was wrk's: one per connection may have been answered after wrk stopped reading.
[ "$cut" -ge 0 ] && [ "$cut" -le $((CONNS + wrk_sockerr_sum)) ] \
  || fail "greenlight counted $base_total responses, wrk completed $wrk_requests: more than $CONNS apart"
lint "$work/baseline.prom" "after-load"

# ------------------------------------------------------------------------------ exact phase
echo "== exact phase: $N requests, keep-alive and new connections mixed"
read -r ok non200 errors conns < <(python3 "$work/exact.py" "$api_port" "$N" 2>"$work/exact.err") || true
echo "   client: ${ok:-?} answered 200, ${non200:-?} other statuses, ${errors:-?} errors, over ${conns:-?} connections"
[ -s "$work/exact.err" ] && sed -n '1,10s/^/     /p' "$work/exact.err"
[ "${ok:-0}" = "$N" ] && [ "${non200:-x}" = 0 ] && [ "${errors:-x}" = 0 ] || fail "the exact client did not get $N 200s"
expected=$((base_total + N))
python3 "$work/scrape.py" "$admin_port" >"$work/final.prom" || fail "final scrape"
direct_total=$(metric "$work/final.prom" greenlight_requests_total)
direct_200=$(awk '$1 == "greenlight_requests_total{code=\"200\"}" {print $2}' "$work/final.prom")
direct_received=$(metric "$work/final.prom" greenlight_requests_received_total)
direct_accepted=$(metric "$work/final.prom" greenlight_connections_accepted_total)
echo "   direct scrape: sum(greenlight_requests_total) $direct_total (code 200: $direct_200), received $direct_received, connections accepted $direct_accepted"
[ "$direct_total" = "$expected" ] || fail "greenlight counted $direct_total responses, expected $base_total + $N = $expected"
[ "$direct_200" = "$direct_total" ] || fail "greenlight counted $((direct_total - direct_200)) non-200 responses"
[ "$direct_received" = $((base_received + N)) ] || fail "greenlight received $direct_received requests, expected $base_received + $N"
[ "$direct_accepted" = $((base_accepted + conns)) ] || fail "greenlight accepted $direct_accepted connections, expected $base_accepted + $conns"

# ------------------------------------------------------------------------------ Prometheus' view
echo "== Prometheus: waiting (at most ${WAIT_SECONDS}s) for up == 1 and sum(greenlight_requests_total) == $expected"
t0=$SECONDS; end=$((SECONDS + WAIT_SECONDS))
while :; do
  up=$(value 'up{job="greenlight"}')
  seen=$(value 'sum(greenlight_requests_total{job="greenlight"})')
  if [ "$up" = 1 ] && [ "$seen" != none ] && awk -v a="$seen" -v b="$expected" 'BEGIN { exit !(a == b) }'; then
    break
  fi
  if [ "$SECONDS" -ge "$end" ]; then
    echo "   Prometheus saw: up $up, sum(greenlight_requests_total) $seen (want 1 and $expected)"
    python3 -c "import json, urllib.request; print(json.dumps([{k: t[k] for k in ('scrapeUrl', 'health', 'lastError', 'lastScrape')} for t in json.load(urllib.request.urlopen('http://127.0.0.1:$prom_port/api/v1/targets', timeout=5))['data']['activeTargets']], indent=1))" | sed 's/^/     /' || true
    tail -10 "$work/prometheus.log" | sed 's/^/     /'
    fail "Prometheus did not show the expected figures within ${WAIT_SECONDS}s"
  fi
  sleep 0.5
done
echo "   after $((SECONDS - t0))s: up $up, sum(greenlight_requests_total) $seen"
scrapes=$(value 'count_over_time(up{job="greenlight"}[10m])')
min_up=$(value 'min_over_time(up{job="greenlight"}[10m])')
samples=$(value 'scrape_samples_scraped{job="greenlight"}')
slowest=$(value 'max_over_time(scrape_duration_seconds{job="greenlight"}[10m])')
peak_open=$(value 'max_over_time(sum(greenlight_connections_open{job="greenlight"})[10m:1s])')
echo "   $scrapes scrapes so far, lowest up $min_up, $samples samples each, slowest scrape ${slowest}s; peak connections open seen ${peak_open}"
echo "   by code: $(query 'sum by (code) (greenlight_requests_total{job="greenlight"}) > 0' | tr '\n' ' ')"
[ "$min_up" = 1 ] || fail "a scrape failed (up was $min_up)"
[ "$peak_open" != none ] && [ "${peak_open%%.*}" -gt 0 ] || fail "Prometheus never scraped during the load (peak connections open $peak_open)"
if grep -E 'level=(warn|error)' "$work/prometheus.log" >"$work/prometheus-warnings.log"; then
  echo "   Prometheus logged warnings or errors:"; sed -n '1,20s/^/     /p' "$work/prometheus-warnings.log"
  fail "Prometheus logged warnings or errors"
fi

# ------------------------------------------------------------------------------ stop
kill -TERM "$prom_pid"; wait "$prom_pid" 2>/dev/null || true; prom_pid=""
kill -TERM "$server_pid"
status=0; wait "$server_pid" || status=$?; server_pid=""
[ "$status" -eq 0 ] || { tail -5 "$work/server.log"; fail "greenlight exited $status after SIGTERM"; }
echo "== figures: wrk $wrk_requests completed (+$cut cut off) + exact $N = $expected; greenlight counted $direct_total; Prometheus shows $seen"
echo "prometheus: PASS"
