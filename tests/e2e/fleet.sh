#!/usr/bin/env bash
# A fleet behind HAProxy: docs/deploy/haproxy.cfg (addresses rewritten to loopback) in front of
# three greenlight instances (release build, --workers 2, each with its own API and admin
# port), HAProxy checking each instance's admin /readyz every 200 ms (fall 1, rise 2) and
# keeping connections to them alive (http-reuse safe). Under client load through HAProxy for the
# whole run (wrk's keep-alive connections plus a client opening a new connection per request),
# every instance is restarted in turn, three times over: SIGTERM, wait for the exit (status 0),
# start it again on the same ports, wait until HAProxy's stats say UP, then the next.
#   1. --drain-delay 1s, checks on /readyz: must lose nothing. PASS only with 0 non-2xx and 0
#      socket errors in wrk, 0 failures in the new-connection client, HAProxy's backend eresp,
#      econ and hrsp_5xx all 0 (and no retry or redispatch: a refused connection that a retry
#      saved shows only there), HAProxy seeing each stopping instance DOWN before it exits, and
#      every exit 0.
#   2. The "before" setup, --drain-delay 0 and checks on the API's /v1/healthcheck: the same
#      restarts, REPORTED (what it loses is the reason for the delay; docs/deploy.md shows it),
#      not judged.
# Needs: Debian's haproxy (2.6) and wrk, python3 (installed here with apt-get if missing, which
# needs root), cargo. Talks only to 127.0.0.1. Takes about two and a half minutes.
# Knobs: FLEET_BIN=path (a binary built elsewhere; no build), FLEET_KEEP=1 (keep the logs:
# HAProxy's, each instance's, wrk's), FLEET_LOAD_SECONDS (default 60: nine restarts under load took 20 to 35 s here).
set -euo pipefail
cd "$(dirname "$0")/../.."

need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v wrk >/dev/null || need+=(wrk)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# FLEET_BIN=path runs a binary built elsewhere instead of building this tree.
if [ -z "${FLEET_BIN:-}" ]; then
  cargo build --release --locked --quiet
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

work=$(mktemp -d /tmp/greenlight-fleet.XXXXXX)
# The binary every start of this run uses, even if target/ is rebuilt meanwhile.
cp "${FLEET_BIN:-target/release/greenlight}" "$work/greenlight"
LOAD_SECONDS=${FLEET_LOAD_SECONDS:-60}   # wrk's -d and the new-connection client's duration
ROUNDS=3
declare -a pids=("" "" "" "")            # greenlight instance i (1..3)
haproxy_pid=""; wrk_pid=""; client_pid=""

cleanup() {
  set +e
  for pid in "${pids[@]}" "$haproxy_pid" "$wrk_pid" "$client_pid"; do
    [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
  done
  wait 2>/dev/null
  if [ -n "${FLEET_KEEP:-}" ]; then echo "logs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# ------------------------------------------------------------------------------ helpers
cat >"$work/stats.py" <<'PY'
# HAProxy's stats socket: `field SOCK PROXY SERVER NAME` prints one counter or state;
# `table SOCK` prints the counters this test judges, per server, backend and frontend.
import csv, socket, sys

def show_stat(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return list(csv.DictReader(data.decode().lstrip("# ").splitlines()))

mode, path = sys.argv[1], sys.argv[2]
rows = show_stat(path)
if mode == "field":
    proxy, server, name = sys.argv[3:6]
    print(next(r[name] for r in rows if r["pxname"] == proxy and r["svname"] == server))
else:
    cols = ["status", "stot", "econ", "eresp", "hrsp_5xx", "wretr", "wredis", "chkdown", "cli_abrt", "srv_abrt"]
    print(f"    {'':16}" + "".join(f"{c:>10}" for c in cols))
    for r in rows:
        if r["pxname"] in ("api", "greenlight") and r["svname"] != "stats":
            name = f"{r['pxname']}/{r['svname']}"
            print(f"    {name:16}" + "".join(f"{(r.get(c) or '-'):>10}" for c in cols))
PY

# The new-connection client: one request per new connection, for $2 seconds; prints
# "ok non2xx errors"; the first failures go to stderr.
cat >"$work/fresh.py" <<'PY'
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
request = b"GET /v1/healthcheck HTTP/1.1\r\nHost: fleet\r\nConnection: close\r\n\r\n"
ok = non2xx = errors = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(request)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 2") and body.endswith(b"}\n"):
            ok += 1
        else:
            non2xx += 1
            if non2xx + errors <= 20:
                print(f"{time.strftime('%H:%M:%S')} bad response {data[:120]!r}", file=sys.stderr)
    except OSError as e:
        errors += 1
        if non2xx + errors <= 20:
            print(f"{time.strftime('%H:%M:%S')} request failed: {e!r}", file=sys.stderr)
print(ok, non2xx, errors)
PY

stat_field() { python3 "$work/stats.py" field "$work/haproxy.sock" "$@"; }
server_status() { stat_field greenlight "app$1" status 2>/dev/null || echo "?"; }
# Seconds (decimal) since the script started.
now() { date +%s.%N | awk -v t0="$T0" '{ printf "%.2f", $1 - t0 }'; }
T0=$(date +%s.%N)

# Distinct free loopback ports: 3 API, 3 admin, 1 frontend, 1 stats page. Taken below the
# kernel's ephemeral range, so that no client or HAProxy connection (thousands a second here)
# can hold an instance's port as its local port in the moment the instance is restarting.
read -r -a ports < <(python3 - <<'PY'
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
ports = []
for port in random.sample(range(10000, max(low, 10100)), k=max(low, 10100) - 10000):
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    except OSError:
        continue
    ports.append(port)
    if len(ports) == 8:
        break
print(" ".join(map(str, ports)))
PY
)
[ ${#ports[@]} -eq 8 ] || { echo "FAIL: no 8 free loopback ports below the ephemeral range"; exit 1; }
api=("" "${ports[0]}" "${ports[1]}" "${ports[2]}")
admin=("" "${ports[3]}" "${ports[4]}" "${ports[5]}")
front=${ports[6]}; stats_port=${ports[7]}

# Starts instance $1 with --drain-delay $2; returns once it logs `starting server`.
start_instance() {
  local i=$1 delay=$2 log="$work/$phase-app$1.log" before
  touch "$log"
  before=$(grep -c '"msg":"starting server"' "$log" || true)
  "$work/greenlight" --host 127.0.0.1 --port "${api[$i]}" --admin-addr "127.0.0.1:${admin[$i]}" \
    --workers 2 --drain-delay "$delay" --shutdown-timeout 10s --log-format json 2>>"$log" &
  pids[i]=$!
  local end=$((SECONDS + 10))
  until [ "$(grep -c '"msg":"starting server"' "$log" || true)" -gt "$before" ]; do
    if ! kill -0 "${pids[$i]}" 2>/dev/null || [ "$SECONDS" -ge "$end" ]; then
      echo "FAIL: app$i did not start"; tail -5 "$log"; exit 1
    fi
    sleep 0.02
  done
}

# SIGTERM to instance $1; waits for its exit (at most 20 s, then SIGKILL); sets r_status.
stop_instance() {
  local i=$1 pid=${pids[$1]} end=$((SECONDS + 20))
  kill -TERM "$pid"
  while [ -e "/proc/$pid" ] && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]; do
    [ "$SECONDS" -ge "$end" ] && kill -KILL "$pid" 2>/dev/null
    sleep 0.01
  done
  r_status=0
  wait "$pid" || r_status=$?
  pids[i]=""
}

# Waits until HAProxy's stats say app$1 is UP (at most 15 s).
wait_up() {
  local end=$((SECONDS + 15))
  until [ "$(server_status "$1")" = UP ]; do
    [ "$SECONDS" -ge "$end" ] && { echo "FAIL: HAProxy never reported app$1 UP ($(server_status "$1"))"; exit 1; }
    sleep 0.05
  done
}

# HAProxy's config for this run, from docs/deploy/haproxy.cfg: the servers on loopback, the
# stats socket in $work, logs (errors only) to stdout, in the foreground, maxconn 4096.
# $1 = the check path (/readyz on the admin port, or /v1/healthcheck on the API port).
write_haproxy_cfg() {
  python3 - docs/deploy/haproxy.cfg "$work/haproxy-$phase.cfg" "$1" "$work/haproxy.sock" "$front" "$stats_port" \
    "${api[1]}" "${admin[1]}" "${api[2]}" "${admin[2]}" "${api[3]}" "${admin[3]}" <<'PY'
import re, sys
src, dst, check, sock, front, stats = sys.argv[1:7]
servers = {f"app{n}": (sys.argv[5 + 2 * n], sys.argv[6 + 2 * n]) for n in (1, 2, 3)}
out, hits = [], {"socket": 0, "front": 0, "stats": 0, "check": 0, "servers": 0}
section = None
for line in open(src):
    s = line.strip()
    if re.match(r"^\S", line):
        section = line.split()[0] + " " + (line.split() + [""])[1]
    if section.startswith("global") and re.match(r"(log|chroot|user|group|daemon)\b", s):
        continue
    if section.startswith("global") and s.startswith("maxconn "):
        line = "    maxconn 4096\n"   # within this machine's descriptor limit
    if s.startswith("stats socket "):
        line = f"    stats socket {sock} mode 600 level admin\n    log stdout format raw local0\n"; hits["socket"] += 1
    elif section == "frontend api" and s.startswith("bind "):
        line = f"    bind 127.0.0.1:{front}\n"; hits["front"] += 1
    elif section == "listen stats" and s.startswith("bind "):
        line = f"    bind 127.0.0.1:{stats}\n"; hits["stats"] += 1
    elif s == "option httpchk GET /readyz":
        line = f"    option httpchk GET {check}\n"; hits["check"] += 1
    elif s.startswith("option dontlognull"):
        line += "    option dontlog-normal\n"
    elif m := re.match(r"server (app\d) \S+ check port \d+$", s):
        port, admin = servers[m.group(1)]
        tail = f" port {admin}" if check == "/readyz" else ""
        line = f"    server {m.group(1)} 127.0.0.1:{port} check{tail}\n"; hits["servers"] += 1
    out.append(line)
want = {"socket": 1, "front": 1, "stats": 1, "check": 1, "servers": 3}
if hits != want:
    sys.exit(f"docs/deploy/haproxy.cfg no longer has the lines this test rewrites: {hits} != {want}")
open(dst, "w").writelines(out)
PY
  haproxy -c -q -f "$work/haproxy-$phase.cfg"
}

# ------------------------------------------------------------------------------ one run
# run_phase NAME DRAIN_DELAY CHECK_PATH: sets the r_* results.
run_phase() {
  phase=$1; local delay=$2 check=$3 i round
  echo "== $phase: --drain-delay $delay, HAProxy checks $check; $ROUNDS rolling restarts under ${LOAD_SECONDS}s of load"
  for i in 1 2 3; do start_instance "$i" "$delay"; done
  write_haproxy_cfg "$check"
  rm -f "$work/haproxy.sock"
  haproxy -db -f "$work/haproxy-$phase.cfg" >"$work/haproxy-$phase.log" 2>&1 &
  haproxy_pid=$!
  local end=$((SECONDS + 10))
  until [ -S "$work/haproxy.sock" ] && [ "$(server_status 1)$(server_status 2)$(server_status 3)" = UPUPUP ]; do
    [ "$SECONDS" -ge "$end" ] && { echo "FAIL: HAProxy did not see the fleet UP"; cat "$work/haproxy-$phase.log"; exit 1; }
    sleep 0.05
  done

  wrk -t1 -c16 -d"${LOAD_SECONDS}s" --timeout 5s "http://127.0.0.1:$front/v1/healthcheck" >"$work/wrk-$phase.txt" 2>&1 &
  wrk_pid=$!
  python3 "$work/fresh.py" "$front" "$LOAD_SECONDS" >"$work/fresh-$phase.txt" 2>"$work/fresh-$phase.err" &
  client_pid=$!
  local load_started; load_started=$(now)
  sleep 2   # load flowing before the first SIGTERM

  r_exits=(); r_noticed=0
  for round in $(seq "$ROUNDS"); do
    for i in 1 2 3; do
      local down_before t_term t_exit t_up status
      down_before=$(stat_field greenlight "app$i" chkdown)
      t_term=$(now)
      stop_instance "$i"; status=$r_status
      t_exit=$(now)
      r_exits+=("$status")
      [ "$(stat_field greenlight "app$i" chkdown)" -gt "$down_before" ] && r_noticed=$((r_noticed + 1))
      start_instance "$i" "$delay"
      if [ "$check" = /readyz ]; then
        # HAProxy saw the 503 during the lame duck: the UP that follows is the new process's.
        wait_up "$i"
      else
        # HAProxy may not have noticed the stop at all; give it two check intervals to.
        sleep 0.4; wait_up "$i"
      fi
      t_up=$(now)
      printf '   round %d app%d: SIGTERM at %6ss, exit %s after %.2fs, UP again %.2fs later\n' \
        "$round" "$i" "$t_term" "$status" "$(awk -v a="$t_exit" -v b="$t_term" 'BEGIN{print a-b}')" \
        "$(awk -v a="$t_up" -v b="$t_exit" 'BEGIN{print a-b}')"
    done
  done
  local restarts_done; restarts_done=$(now)

  wait "$wrk_pid" || true; wrk_pid=""
  wait "$client_pid" || true; client_pid=""
  local load_ended; load_ended=$(now)
  r_covered=$(awk -v d="$restarts_done" -v e="$load_ended" 'BEGIN{print (e - d >= 1) ? 1 : 0}')

  # wrk
  r_wrk_requests=$(awk '/requests in/ {print $1}' "$work/wrk-$phase.txt")
  r_wrk_non2xx=$(grep -o 'Non-2xx or 3xx responses: [0-9]*' "$work/wrk-$phase.txt" | awk '{print $NF}' || true)
  r_wrk_non2xx=${r_wrk_non2xx:-0}
  r_wrk_sockerr=$(grep -o 'Socket errors:.*' "$work/wrk-$phase.txt" || true)
  r_wrk_sockerr_sum=$(echo "$r_wrk_sockerr" | { grep -o '[0-9]\+' || true; } | awk '{s += $1} END {print s + 0}')
  # the new-connection client
  read -r r_fresh_ok r_fresh_non2xx r_fresh_err <"$work/fresh-$phase.txt" || true
  # HAProxy
  r_econ=$(stat_field greenlight BACKEND econ); r_eresp=$(stat_field greenlight BACKEND eresp)
  r_5xx=$(stat_field greenlight BACKEND hrsp_5xx); r_wretr=$(stat_field greenlight BACKEND wretr)
  r_wredis=$(stat_field greenlight BACKEND wredis); r_fe5xx=$(stat_field api FRONTEND hrsp_5xx)
  python3 "$work/stats.py" table "$work/haproxy.sock" >"$work/stats-$phase.txt"

  # Stop the fleet: these exits count too.
  for i in 1 2 3; do stop_instance "$i"; r_exits+=("$r_status"); done
  kill -TERM "$haproxy_pid" 2>/dev/null || true; wait "$haproxy_pid" 2>/dev/null || true; haproxy_pid=""
  r_bad_exits=$(printf '%s\n' "${r_exits[@]}" | grep -vc '^0$' || true)
  # With dontlog-normal HAProxy logs only the requests that went wrong (and server state changes).
  grep -E '^[0-9.]+:[0-9]+ \[' "$work/haproxy-$phase.log" >"$work/abnormal-$phase.log" || true
  r_abnormal=$(wc -l <"$work/abnormal-$phase.log")

  echo "   load from ${load_started}s to ${load_ended}s; restarts done at ${restarts_done}s"
  echo "   wrk (keep-alive, 16 connections): ${r_wrk_requests:-?} requests, non-2xx ${r_wrk_non2xx}, ${r_wrk_sockerr:-Socket errors: none}"
  echo "   new-connection client: ${r_fresh_ok:-?} ok, ${r_fresh_non2xx:-?} non-2xx, ${r_fresh_err:-?} errors"
  echo "   HAProxy backend: econ $r_econ, eresp $r_eresp, hrsp_5xx $r_5xx (retries $r_wretr, redispatches $r_wredis); frontend hrsp_5xx $r_fe5xx"
  cat "$work/stats-$phase.txt"
  echo "   HAProxy had marked the stopped instance DOWN before it was started again in $r_noticed of $((ROUNDS * 3)) restarts"
  echo "   exit statuses: ${r_exits[*]}"
  # Fields after "backend/server": timers, status, bytes, 2 cookies, termination state, then
  # actconn/feconn/beconn/srv_conn/retries ("+N": N retries, the last on another server).
  awk '{ for (f = 1; f <= NF; f++) if ($f ~ /^(api|greenlight)\//) {
           split($(f + 7), c, "/"); print $(f + 2), $(f + 6), (c[5] == "0" ? "no-retry" : "retried" c[5]); break } }' \
    "$work/abnormal-$phase.log" | sort | uniq -c >"$work/abnormal-$phase.summary"
  echo "   HAProxy logged $r_abnormal requests as abnormal$(awk '{ printf "%s %s with status %s, state %s, %s", NR == 1 ? ":" : ";", $1, $2, $3, $4 }' "$work/abnormal-$phase.summary")"
  if grep -qv ' 200 ---- retried' "$work/abnormal-$phase.summary"; then
    echo "   abnormal requests in HAProxy's log, other than 200s after a retry (first 8):"
    # awk reads the whole log (no `head`: under pipefail its early exit is a SIGPIPE failure).
    awk '{ for (f = 1; f <= NF; f++) if ($f ~ /^(api|greenlight)\//) {
             split($(f + 7), c, "/")
             if (!($(f + 2) == 200 && $(f + 6) == "----" && c[5] != "0") && ++shown <= 8) print "     " $0
             break } }' "$work/abnormal-$phase.log"
  fi
  if [ "$r_eresp" != 0 ]; then
    echo "   (the $r_eresp eresp are not in HAProxy's log: a request sent on a reused keep-alive connection that"
    echo "   the server closed is answered by closing the client's connection, unlogged, counted in eresp and srv_abrt)"
  fi
  if [ -s "$work/fresh-$phase.err" ]; then
    echo "   new-connection client failures (first 8):"; head -8 "$work/fresh-$phase.err" | sed 's/^/     /'
  fi
}

# ------------------------------------------------------------------------------ the runs
run_phase with-delay 1s /readyz
failures=()
[ "$r_wrk_non2xx" = 0 ] || failures+=("wrk saw $r_wrk_non2xx non-2xx responses")
[ "$r_wrk_sockerr_sum" = 0 ] || failures+=("wrk saw socket errors ($r_wrk_sockerr)")
[ -n "${r_wrk_requests:-}" ] && [ "$r_wrk_requests" -gt 0 ] || failures+=("wrk made no requests")
[ "${r_fresh_non2xx:-x}" = 0 ] && [ "${r_fresh_err:-x}" = 0 ] || failures+=("the new-connection client had ${r_fresh_non2xx:-?} non-2xx and ${r_fresh_err:-?} errors")
[ "${r_fresh_ok:-0}" -gt 0 ] || failures+=("the new-connection client made no requests")
[ "$r_econ" = 0 ] && [ "$r_eresp" = 0 ] && [ "$r_5xx" = 0 ] || failures+=("HAProxy backend econ $r_econ, eresp $r_eresp, hrsp_5xx $r_5xx")
# A refused connection that a retry saved shows only here (econ stays 0): none may happen either.
[ "$r_wretr" = 0 ] && [ "$r_wredis" = 0 ] || failures+=("HAProxy had to retry ($r_wretr) or redispatch ($r_wredis) requests: connections were refused")
[ "$r_bad_exits" = 0 ] || failures+=("$r_bad_exits exits were not 0: ${r_exits[*]}")
[ "$r_noticed" = $((ROUNDS * 3)) ] || failures+=("HAProxy marked only $r_noticed of $((ROUNDS * 3)) stopping instances DOWN during their lame duck")
[ "$r_covered" = 1 ] || failures+=("the load ended before the restarts did (raise FLEET_LOAD_SECONDS)")
with_delay="wrk ${r_wrk_requests:-?} requests / ${r_wrk_non2xx} non-2xx / socket errors ${r_wrk_sockerr_sum}; new-connection ${r_fresh_ok:-?} ok / ${r_fresh_non2xx:-?} non-2xx / ${r_fresh_err:-?} errors; backend econ ${r_econ} eresp ${r_eresp} hrsp_5xx ${r_5xx} wretr ${r_wretr} wredis ${r_wredis}; exits ${r_bad_exits} non-zero of ${#r_exits[@]}"

run_phase without-delay 0s /v1/healthcheck
without_delay="wrk ${r_wrk_requests:-?} requests / ${r_wrk_non2xx} non-2xx / socket errors ${r_wrk_sockerr_sum}; new-connection ${r_fresh_ok:-?} ok / ${r_fresh_non2xx:-?} non-2xx / ${r_fresh_err:-?} errors; backend econ ${r_econ} eresp ${r_eresp} hrsp_5xx ${r_5xx} wretr ${r_wretr} wredis ${r_wredis}; exits ${r_bad_exits} non-zero of ${#r_exits[@]}"

echo "== summary ($(nproc) cores, $(date -u +%Y-%m-%d))"
echo "   with    --drain-delay 1s, /readyz:         $with_delay"
echo "   without --drain-delay,    /v1/healthcheck: $without_delay (reported, not judged)"
if [ ${#failures[@]} -eq 0 ]; then
  echo "fleet: PASS (rolling restarts with the lame duck lost nothing)"
else
  printf 'FAIL: %s\n' "${failures[@]}"
  echo "fleet: FAILED"
  exit 1
fi
