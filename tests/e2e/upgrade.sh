#!/usr/bin/env bash
# Upgrade in place (SIGHUP), end to end, fenced in like systemd.sh: its own mount and PID
# namespace (everything dies with this script, even on SIGKILL), its own cgroup, console masked.
# A. Plain: a release greenlight (--workers 2, admin listener, JSON log) run from a copy of the
#    binary under a tiny subreaper that records every generation's exit status; 25 upgrades in a
#    row, a fresh copy of the binary installed over the path before each, under wrk (-t1 -c8)
#    and a new-connection-per-request client. Checks: 0 socket errors, 0 non-2xx, 0 failed
#    requests, every process exits 0 within 1 s of its `stopped server` line, each new process
#    runs the newly installed file, and no descriptor is left behind (every generation's
#    descriptors, connections aside, are the first one's).
# B. A real systemd user manager: a Type=notify unit with the shipped unit's behaviour settings
#    (no sandboxing, no socket unit: greenlight binds its own port), 5 x `systemctl reload`
#    under a keep-alive and a new-connection client: MainPID moves on each time, ActiveState
#    (polled throughout) is only ever active or reloading, 0 failed requests; then a stop of an
#    upgraded main process with a slow request in flight is graceful (200, Result=success).
# Needs: root, util-linux (unshare), systemd, iproute2 (ss), curl, wrk, python3 (Debian
# packages installed with apt-get if missing). Talks only to 127.0.0.1. Takes about 1.5 minutes;
# bounded: a watchdog inside the fence stops it (cleaning up) at 6 minutes, `timeout` kills the
# whole fence at 7. GREENLIGHT_E2E_KEEP=DIR keeps the logs in DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)

UPGRADES=25        # part A
RELOADS=5          # part B

if [ "${GREENLIGHT_E2E_FENCED:-}" != 1 ]; then
  [ "$(id -u)" = 0 ] || { echo "upgrade e2e: needs root"; exit 1; }
  need=()
  [ -x /lib/systemd/systemd ] && command -v systemctl >/dev/null || need+=(systemd)
  command -v ss >/dev/null || need+=(iproute2)
  command -v curl >/dev/null || need+=(curl)
  command -v wrk >/dev/null || need+=(wrk)
  command -v unshare >/dev/null || need+=(util-linux)
  command -v python3 >/dev/null || need+=(python3)
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  cargo build --release --locked --quiet
  # Made out here so that whatever a killed fence leaves behind is removed out here too.
  work=$(mktemp -d /tmp/greenlight-upgrade-e2e.XXXXXX)
  name="greenlight-upgrade-e2e-$(date +%s%N)"
  outer_cleanup() {
    set +e
    for cg in /sys/fs/cgroup/unified/"$name" /sys/fs/cgroup/systemd/"$name" /sys/fs/cgroup/"$name"; do
      for _ in $(seq 50); do
        [ -d "$cg" ] || break
        find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null
        sleep 0.1
      done
    done
    rm -rf "$work"
  }
  trap outer_cleanup EXIT
  # The real python, not a version manager's shim (PATH inside systemd is minimal anyway).
  python=$(python3 -c 'import sys; print(sys.executable)')
  timeout -k 120 420 unshare --mount --pid --fork --mount-proc --kill-child \
    env GREENLIGHT_E2E_FENCED=1 GREENLIGHT_E2E_WORK="$work" GREENLIGHT_E2E_NAME="$name" \
    GREENLIGHT_E2E_PYTHON="$python" bash "$0" "$@" &
  fence=$!
  # Interrupted: timeout passes SIGTERM to unshare, whose death SIGKILLs the whole fence.
  trap 'kill -TERM "$fence" 2>/dev/null' TERM INT
  rc=0; wait "$fence" || rc=$?
  while kill -0 "$fence" 2>/dev/null; do rc=0; wait "$fence" || rc=$?; done
  [ "$rc" = 124 ] && echo "FAIL upgrade e2e: timed out"
  exit "$rc"
fi

# ---------------------------------------------------------------- inside the fence (we are PID 1)
work="$GREENLIGHT_E2E_WORK"; name="$GREENLIGHT_E2E_NAME"; py="$GREENLIGHT_E2E_PYTHON"
bin="$root/target/release/greenlight"
passed=0; failed=0
pids=()        # background processes this script started (killed by PID at cleanup)
# shellcheck source=tests/e2e/lib/fence.bash
source "$root/tests/e2e/lib/fence.bash"
fence_cgroups "$name"

cleanup() {
  set +e
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  fence_leave greenlight-upgrade.service
  if [ -n "${GREENLIGHT_E2E_KEEP:-}" ]; then
    mkdir -p "$GREENLIGHT_E2E_KEEP"
    find "$work" \( -name '*.log' -o -name '*.txt' -o -name '*.json*' -o -name '*.service' \) -exec cp --parents {} "$GREENLIGHT_E2E_KEEP" \;
    echo "logs kept in $GREENLIGHT_E2E_KEEP$work"
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'echo "FAIL interrupted (signal or the 6-minute watchdog)"; exit 1' TERM INT
( sleep 360; kill -TERM 1 ) &
pids+=($!)

ok() { echo "PASS $1"; passed=$((passed + 1)); }
bad() { echo "FAIL $1"; failed=$((failed + 1)); }
# Waits, at most $1 seconds, until the shell condition $2 holds.
until_true() {
  local end=$((SECONDS + $1))
  until eval "$2"; do
    [ "$SECONDS" -ge "$end" ] && return 1
    sleep 0.02
  done
}
free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Installs a fresh copy of the build over $1 the way installers do (new file, then rename): the
# running process keeps its old, now unlinked, inode. Prints the new inode.
install_binary() {
  cp "$bin" "$1.new" && mv -f "$1.new" "$1" && stat -c %i "$1"
}
exe_inode() { stat -L -c %i "/proc/$1/exe" 2>/dev/null || echo none; }

# ---------------------------------------------------------------- helpers in python
q="$work/gl.py"
cat >"$q" <<'PY'
"""Helpers for upgrade.sh: log queries, a subreaper, an fd census, load clients."""
import collections, ctypes, json, os, signal, socket, sys, time
from datetime import datetime, timezone


def epoch(ts):
    """RFC 3339 (nanoseconds, Z) to Unix seconds."""
    ts = ts.replace("Z", "+00:00")
    main, frac = ts[:19], ""
    rest = ts[19:]
    if rest.startswith("."):
        i = 1
        while i < len(rest) and rest[i].isdigit():
            i += 1
        frac, rest = rest[1:i], rest[i:]
    dt = datetime.strptime(main, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return dt.timestamp() + (float("0." + frac) if frac else 0.0)


def lines(log, msg, filters):
    out = []
    with open(log, errors="replace") as f:
        for line in f:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if msg is not None and obj.get("msg") != msg:
                continue
            if all(str(obj.get(k)) == v for k, v in filters):
                out.append(obj)
    return out


def filters(args):
    return [tuple(a.split("=", 1)) for a in args]


def reaper(exits, log, argv):
    """PR_SET_CHILD_SUBREAPER: every generation is reparented here when its parent exits, so
    each one's exit status is recorded (pid, code, time)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:
        sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GREENLIGHT_", "LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    logfd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null = os.open("/dev/null", os.O_RDWR)
    out = open(exits, "a", buffering=1)
    pid = os.fork()
    if pid == 0:
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(logfd, 2)
        os.closerange(3, 1024)
        os.execve(argv[0], argv, env)
    os.close(logfd)
    os.close(null)
    out.write(json.dumps({"started": pid, "t": time.time()}) + "\n")
    while True:
        try:
            p, status = os.wait()
        except ChildProcessError:
            break
        out.write(json.dumps({"pid": p, "code": os.waitstatus_to_exitcode(status),
                              "t": time.time()}) + "\n")


def exit_of(exits, pid):
    with open(exits) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("pid") == pid:
                return rec
    return None


def socket_kinds():
    kinds = {}
    for name in ("tcp", "tcp6"):
        try:
            rows = open("/proc/net/" + name).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            port = int(f[1].rsplit(":", 1)[1], 16)
            kinds[f[9]] = f"tcp-listen:{port}" if f[3] == "0A" else "tcp-conn"
    for name, col in (("udp", 9), ("udp6", 9), ("unix", 6), ("netlink", 8)):
        try:
            rows = open("/proc/net/" + name).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > col:
                kinds[f[col]] = name
    return kinds


def census(pid):
    """The process's descriptors by kind; TCP connections counted apart (the load's)."""
    for _ in range(20):
        before = socket_kinds()
        fds = {}
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                fds[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                pass
        table = {**before, **socket_kinds()}
        kinds, conns, unknown = collections.Counter(), 0, 0
        for target in fds.values():
            if target.startswith("socket:["):
                kind = table.get(target[8:-1])
                if kind is None:
                    unknown += 1
                    kind = "socket-unknown"
                if kind == "tcp-conn":
                    conns += 1
                    continue
            elif target.startswith("pipe:"):
                kind = "pipe"
            elif target.startswith("anon_inode:"):
                kind = target
            else:
                kind = target
            kinds[kind] += 1
        if unknown == 0:
            break
    return {"total": len(fds), "conns": conns, "others": sum(kinds.values()),
            "kinds": dict(sorted(kinds.items()))}


def read_response(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ValueError(f"connection closed after {len(data)} bytes of the head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    head_lines = head.decode("latin-1").split("\r\n")
    status = int(head_lines[0].split()[1])
    headers = {}
    for line in head_lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip().lower()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ValueError(f"connection closed {len(body)}/{length} bytes into the body")
        body += chunk
    return status, headers.get("connection") == "close"


def load(mode, port, seconds, out):
    """fresh: one request per new connection; keepalive: reuse the connection until a
    response says close. Every failure (connect, write, read, short answer, non-200) counts."""
    stop = False

    def on_signal(*_):
        nonlocal stop
        stop = True
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    request = b"GET /v1/healthcheck HTTP/1.1\r\nHost: x\r\n"
    request += b"Connection: close\r\n\r\n" if mode == "fresh" else b"\r\n"
    ok = failed = connects = closes = 0
    max_latency = 0.0
    errors = []
    sock = None
    deadline = time.monotonic() + seconds
    while not stop and time.monotonic() < deadline:
        started = time.monotonic()
        step = "connect"
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                connects += 1
            step = "write"
            sock.sendall(request)
            step = "read"
            status, close = read_response(sock)
        except (OSError, ValueError) as e:
            failed += 1
            if len(errors) < 20:
                errors.append(f"{time.time():.6f} {step}: {e!r}")
            if sock is not None:
                sock.close()
                sock = None
            continue
        max_latency = max(max_latency, time.monotonic() - started)
        if status == 200:
            ok += 1
        else:
            failed += 1
            if len(errors) < 20:
                errors.append(f"{time.time():.6f} status {status}")
        if mode == "fresh" or close:
            closes += close
            sock.close()
            sock = None
    with open(out, "w") as f:
        json.dump({"mode": mode, "ok": ok, "failed": failed, "connections": connects,
                   "closes_seen": closes, "max_latency_ms": round(max_latency * 1000, 1),
                   "errors": errors}, f)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "count":        # LOG MSG [k=v ...]
        print(len(lines(args[0], args[1], filters(args[2:]))))
    elif cmd == "get":        # LOG MSG N KEY [k=v ...]: KEY of the N-th match (_epoch: its ts)
        found = lines(args[0], args[1], filters(args[4:]))
        n = int(args[2])
        if len(found) < n:
            sys.exit(1)
        obj = found[n - 1]
        print(f"{epoch(obj['ts']):.6f}" if args[3] == "_epoch" else obj.get(args[3]))
    elif cmd == "levels":     # LOG LEVEL...: the lines at those levels
        for line in lines(args[0], None, []):
            if line.get("level") in args[1:]:
                print(json.dumps(line))
    elif cmd == "reaper":     # EXITS LOG -- ARGV...
        reaper(args[0], args[1], args[3:])
    elif cmd == "exit":       # EXITS PID: "code time" once it has exited
        rec = exit_of(args[0], int(args[1]))
        if rec is None:
            sys.exit(1)
        print(rec["code"], f"{rec['t']:.6f}")
    elif cmd == "exits":      # EXITS: every recorded exit code
        with open(args[0]) as f:
            print(" ".join(str(json.loads(l)["code"]) for l in f if '"code"' in l))
    elif cmd == "census":     # PID: "total connections others {kinds}"
        c = census(int(args[0]))
        print(c["total"], c["conns"], c["others"], json.dumps(c["kinds"], separators=(",", ":")))
    elif cmd == "facts":      # LOG EXITS I OLD_PID T_HUP, once OLD_PID has exited
        # "code stopped_lines exit_after_stopped_ms handover_to_exit_ms hup_to_handover_ms"
        log, exits, i, old, t_hup = args[0], args[1], int(args[2]), int(args[3]), float(args[4])
        rec = exit_of(exits, old)
        handover = epoch(lines(log, "shutting down server", [("reason", "upgrade")])[i - 1]["ts"])
        stopped = lines(log, "stopped server", [])
        gap = round((rec["t"] - epoch(stopped[i - 1]["ts"])) * 1000) if len(stopped) >= i else "none"
        print(rec["code"], len(stopped), gap, round((rec["t"] - handover) * 1000),
              round((handover - t_hup) * 1000))
    elif cmd == "field":      # JSON KEY
        print(json.loads(args[0])[args[1]])
    elif cmd == "load":       # MODE PORT SECONDS OUT
        load(args[0], int(args[1]), float(args[2]), args[3])
    elif cmd == "calc":       # EXPR
        print(eval(args[0], {}, {}))
    else:
        sys.exit(f"unknown command {cmd}")


main()
PY
g() { "$py" "$q" "$@"; }
# Lines of log $1 with msg $2 (and containing $3): grep, not python, to poll cheaply under load.
count_log() { local n; n=$(grep -F "\"msg\":\"$2\"" "$1" | grep -cF -- "${3:-\"msg\"}") || true; echo "${n:-0}"; }   # (background jobs run "$py" "$q" directly: $! must be python's PID)
# "ok failed connections max_latency_ms" of a finished load client.
load_summary() { "$py" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["ok"], d["failed"], d["connections"], d["max_latency_ms"])' "$1"; }
load_errors() { "$py" -c 'import json,sys; print("\n".join(json.load(open(sys.argv[1]))["errors"]))' "$1"; }

# ================================================================ A. plain, 25 upgrades
echo "== A. plain: $UPGRADES upgrades in a row under wrk and a new-connection client"
a="$work/a"; mkdir -p "$a"
alog="$a/greenlight.log"; exits="$a/exits.jsonl"; abin="$a/greenlight"
: >"$alog"; : >"$exits"
install_binary "$abin" >/dev/null
port=$(free_port); admin_port=$(free_port)
"$py" "$q" reaper "$exits" "$alog" -- "$abin" --host 127.0.0.1 --port "$port" --workers 2 \
  --admin-addr "127.0.0.1:$admin_port" --log-format json &
reaper=$!; pids+=("$reaper")
if ! until_true 10 "[ \$(count_log '$alog' 'starting server') -ge 1 ]"; then
  bad "A: greenlight did not start"; cat "$alog"; exit 1
fi
main=$("$py" -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["started"])' "$exits")
first=$main
curl -sf --max-time 5 "http://127.0.0.1:$admin_port/readyz" >/dev/null || bad "A: /readyz not 200 at start"

wrk -t1 -c8 -d300s "http://127.0.0.1:$port/v1/healthcheck" >"$a/wrk.txt" 2>&1 &
wrk_pid=$!; pids+=("$wrk_pid")
"$py" "$q" load fresh "$port" 300 "$a/fresh.json" &
fresh_pid=$!; pids+=("$fresh_pid")
sleep 1   # the load is flowing before the first upgrade
read -r total_first conns_first others_first kinds_first <<<"$(g census "$main")"
echo "     generation 1 (PID $main): $total_first descriptors, $conns_first of them connections; the others: $kinds_first"

a_fail=0; a_started=$SECONDS
declare -a gaps lifetimes hup_latency
census_bad=0; exe_bad=0; exit_bad=0; late=0
for i in $(seq 1 "$UPGRADES"); do
  inode=$(install_binary "$abin")
  t_hup=$(date +%s.%N)
  kill -HUP "$main"
  if ! until_true 10 "[ \$(count_log '$alog' 'shutting down server' '\"reason\":\"upgrade\"') -ge $i ]"; then
    bad "A upgrade $i: no 'shutting down server' (reason upgrade) from PID $main within 10 s"
    a_fail=1; break
  fi
  new=$(grep -F '"msg":"shutting down server"' "$alog" | grep -F '"reason":"upgrade"' | sed -n "${i}p" \
        | grep -oE '"new_pid":[0-9]+' | cut -d: -f2)
  if [ -z "$new" ] || [ "$new" = "$main" ] || [ ! -d "/proc/$new" ]; then
    bad "A upgrade $i: new_pid '$new' is not a new live process"; a_fail=1; break
  fi
  if [ "$(exe_inode "$new")" != "$inode" ]; then
    exe_bad=$((exe_bad + 1))
    echo "     upgrade $i: PID $new runs inode $(exe_inode "$new"), the installed file is $inode"
  fi
  if ! until_true 15 "grep -qF '\"pid\": $main,' '$exits'"; then
    bad "A upgrade $i: old PID $main still running 15 s after the handover"; a_fail=1; break
  fi
  read -r code stopped gap lifetime hup_ms <<<"$(g facts "$alog" "$exits" "$i" "$main" "$t_hup")"
  hup_latency+=("$hup_ms"); lifetimes+=("$lifetime")
  if [ "$code" != 0 ] || [ "$stopped" != "$i" ]; then
    exit_bad=$((exit_bad + 1))
    echo "     upgrade $i: old PID $main exited $code; 'stopped server' lines: $stopped (expected $i)"
  fi
  if [ "$gap" != none ]; then
    gaps+=("$gap")
    [ "$gap" -ge 0 ] && [ "$gap" -lt 1000 ] || { late=$((late + 1)); echo "     upgrade $i: PID $main gone $gap ms after 'stopped server'"; }
  fi
  read -r total conns others kinds <<<"$(g census "$new")"
  if [ "$kinds" != "$kinds_first" ]; then
    census_bad=$((census_bad + 1))
    echo "     upgrade $i: generation $((i + 1)) (PID $new): $total descriptors, $conns connections, the others differ: $kinds"
  fi
  main=$new
done
read -r total_last conns_last others_last kinds_last <<<"$(g census "$main")"
echo "     $UPGRADES upgrades took $((SECONDS - a_started)) s"
echo "     generation $((${#lifetimes[@]} + 1)) (PID $main): $total_last descriptors, $conns_last of them connections; the others: $kinds_last"

kill -INT "$wrk_pid" 2>/dev/null || true
kill -TERM "$fresh_pid" 2>/dev/null || true
wait "$wrk_pid" || true
wait "$fresh_pid" || true
# The last generation stops as usual: SIGTERM, drain, exit 0.
kill -TERM "$main"
until_true 15 "! kill -0 $reaper 2>/dev/null" || bad "A: the last generation (PID $main) did not exit within 15 s of SIGTERM"
wait "$reaper" || true
last_exit=$(g exit "$exits" "$main" || echo "none")

# wrk's summary: "Socket errors" and "Non-2xx or 3xx responses" appear only when not zero.
wrk_requests=$(grep -oE '^ *[0-9]+ requests in' "$a/wrk.txt" | grep -oE '[0-9]+' || echo 0)
wrk_errors=$(grep -E 'Socket errors' "$a/wrk.txt" || true)
wrk_non2xx=$(grep -E 'Non-2xx' "$a/wrk.txt" || true)
wrk_max=$(awk '/Latency/ {print $4}' "$a/wrk.txt")
read -r f_ok f_failed f_conns f_max < <(load_summary "$a/fresh.json")
all_exits=$(g exits "$exits")
n_exits=$(wc -w <<<"$all_exits")
nonzero=$(tr ' ' '\n' <<<"$all_exits" | grep -vcx 0 || true)
errors=$(g levels "$alog" ERROR CRITICAL)
warnings=$(g levels "$alog" WARNING)
upgraded=$(g count "$alog" 'shutting down server' reason=upgrade)
max_of() { printf '%s\n' "$@" | sort -n | tail -1; }

if [ "$a_fail" = 0 ] && [ "$upgraded" = "$UPGRADES" ]; then
  ok "A upgrades: $UPGRADES in a row, each new process runs the newly installed file ($exe_bad did not); SIGHUP -> handover max $(max_of "${hup_latency[@]}") ms; handover -> old exits max $(max_of "${lifetimes[@]}") ms"
  [ "$exe_bad" = 0 ] || bad "A: $exe_bad new processes did not run the newly installed binary"
else
  bad "A upgrades: $upgraded of $UPGRADES handed over"
fi
if [ -z "$wrk_errors" ] && [ -z "$wrk_non2xx" ] && [ "$wrk_requests" -gt 0 ]; then
  ok "A wrk -t1 -c8: $wrk_requests requests, 0 socket errors, 0 non-2xx (max latency $wrk_max)"
else
  bad "A wrk: $wrk_requests requests; ${wrk_errors:-no socket errors}; ${wrk_non2xx:-no non-2xx}"; cat "$a/wrk.txt"
fi
if [ "$f_failed" = 0 ] && [ "$f_ok" -gt 0 ]; then
  ok "A new-connection client: $f_ok requests on $f_conns connections, 0 failed (max latency $f_max ms)"
else
  bad "A new-connection client: $f_ok ok, $f_failed failed"; load_errors "$a/fresh.json"
fi
if [ "$n_exits" = $((UPGRADES + 1)) ] && [ "$nonzero" = 0 ] && [ "$exit_bad" = 0 ] && [ "${last_exit%% *}" = 0 ]; then
  ok "A exit status (recorded by the subreaper): all $n_exits generations exited 0, one 'stopped server' each"
else
  bad "A exit status: $n_exits exits recorded: $all_exits (last: $last_exit)"
fi
if [ "$late" = 0 ] && [ ${#gaps[@]} = "$UPGRADES" ]; then
  ok "A old process gone after its 'stopped server' line (its last connection closed) within $(max_of "${gaps[@]}") ms (max of $UPGRADES; bound 1000 ms)"
else
  bad "A $late old processes outlived their 'stopped server' line by 1 s or more (gaps ms: ${gaps[*]})"
fi
if [ "$census_bad" = 0 ] && [ "$kinds_last" = "$kinds_first" ]; then
  ok "A descriptors: generation 1 $total_first fds ($conns_first connections), generation $((UPGRADES + 1)) $total_last fds ($conns_last connections); without the connections $others_first = $others_last, the same kinds in all $((UPGRADES + 1)) generations"
else
  bad "A descriptors: $census_bad generations differ from the first ($kinds_first)"
fi
if [ -z "$errors" ]; then
  ok "A log: no ERROR or CRITICAL line ($(wc -l <"$alog") lines, $(grep -c . <<<"$warnings" || true) WARNING)"
else
  bad "A log has ERROR/CRITICAL lines:"; echo "$errors"
fi
[ -z "$warnings" ] || { echo "     WARNING lines:"; sed -n 1,5p <<<"$warnings"; }

# ================================================================ B. under systemd
echo "== B. under a systemd user manager: $RELOADS x systemctl reload under load, then stop"
b="$work/b"; mkdir -p "$b"
runtime="$work/runtime"; home="$work/home"; units="$runtime/systemd/user"
blog="$b/greenlight.log"; envfile="$b/greenlight.env"; bbin="$b/greenlight"
unit=greenlight-upgrade.service
mkdir -p "$runtime" "$home" "$units"; chmod 0700 "$runtime"
export XDG_RUNTIME_DIR="$runtime"
sc() { timeout 40 systemctl --user "$@"; }
prop() { sc show -p "$2" --value "$1"; }

fence_enter

install_binary "$bbin" >/dev/null
bport=$(free_port)
: >"$blog"
echo "GREENLIGHT_HEALTHCHECK_DELAY=0s" >"$envfile"
# The shipped unit's behaviour settings, read from it; its sandboxing needs a system manager,
# and its Sockets=/Requires= the socket unit this test does without (greenlight binds its port).
shipped=docs/systemd/greenlight.service
args=$(sed -n 's|^ExecStart=[^ ]*greenlight||p' "$shipped")
{
  printf '[Unit]\nDescription=greenlight upgrade e2e\n[Service]\n'
  for key in Type NotifyAccess ExecReload KillSignal KillMode TimeoutStopSec WatchdogSec Restart RestartSec LimitNOFILE Environment; do
    grep -E "^$key=" "$shipped" || true
  done
  echo "EnvironmentFile=$envfile"
  echo "ExecStart=$bbin$args --host 127.0.0.1 --port $bport --workers 2"
  echo "StandardError=append:$blog"
} >"$units/$unit"
for need in 'Type=notify' 'NotifyAccess=all' 'ExecReload=/bin/kill -HUP $MAINPID'; do
  grep -qxF "$need" "$units/$unit" || bad "B: the shipped unit has no '$need'"
done
echo "     unit: $(grep -v '^\[' "$units/$unit" | grep -v Description | tr '\n' ' ')"

fence_start_manager "$home" "$runtime"
until_true 20 "systemctl --user is-system-running >/dev/null 2>&1" || { bad "B: the user manager did not start"; exit 1; }

sc start "$unit"
if [ "$(prop "$unit" ActiveState)" != active ]; then
  bad "B: $unit did not start ($(prop "$unit" ActiveState))"; cat "$blog"; exit 1
fi
mainpid=$(prop "$unit" MainPID)

# ActiveState, SubState and MainPID, sampled throughout the reloads.
(
  end=$((SECONDS + 120))
  while [ ! -e "$b/stop-polling" ] && [ "$SECONDS" -lt "$end" ]; do
    echo "$(date +%s.%N) $(systemctl --user show -p ActiveState -p SubState -p MainPID "$unit" 2>&1 | sort | tr '\n' ' ')"
    sleep 0.02
  done
) >"$b/states.txt" &
poller=$!; pids+=("$poller")
"$py" "$q" load fresh "$bport" 120 "$b/fresh.json" &
bfresh=$!; pids+=("$bfresh")
"$py" "$q" load keepalive "$bport" 120 "$b/keepalive.json" &
bka=$!; pids+=("$bka")
sleep 1

b_fail=0; reload_info=(); declare -A parent_at_handover
for i in $(seq 1 "$RELOADS"); do
  inode=$(install_binary "$bbin")
  old=$mainpid
  t0=$(date +%s%N)
  if ! sc reload "$unit"; then bad "B reload $i: systemctl reload failed"; b_fail=1; break; fi
  t1=$(date +%s%N)
  if ! until_true 15 "[ \"\$(prop $unit MainPID)\" != $old ] && [ \"\$(prop $unit ActiveState)\" = active ]"; then
    bad "B reload $i: MainPID still $(prop "$unit" MainPID) / ActiveState $(prop "$unit" ActiveState) 15 s on"
    b_fail=1; break
  fi
  t2=$(date +%s%N)
  mainpid=$(prop "$unit" MainPID)
  parent_at_handover[$mainpid]=$(ps -o ppid= -p "$mainpid" | tr -d ' ')
  logged=$(g get "$blog" 'shutting down server' "$i" new_pid reason=upgrade || echo none)
  [ "$logged" = "$mainpid" ] || { bad "B reload $i: MainPID $mainpid, but the old process handed over to $logged"; b_fail=1; }
  [ "$(exe_inode "$mainpid")" = "$inode" ] || { bad "B reload $i: MainPID $mainpid does not run the newly installed binary"; b_fail=1; }
  if ! until_true 15 "[ ! -d /proc/$old ]"; then
    bad "B reload $i: the old process $old is still there 15 s on"; b_fail=1
  fi
  t3=$(date +%s%N)
  [ "$(g count "$blog" 'stopped server')" = "$i" ] || { bad "B reload $i: 'stopped server' lines $(g count "$blog" 'stopped server'), expected $i"; b_fail=1; }
  reload_info+=("$old->$mainpid (reload returned $(((t1 - t0) / 1000000)) ms, MainPID moved +$(((t2 - t1) / 1000000)) ms, old gone +$(((t3 - t2) / 1000000)) ms)")
done
sleep 0.5   # some load on the last generation alone
kill -TERM "$bfresh" "$bka" 2>/dev/null || true
wait "$bfresh" || true
wait "$bka" || true
touch "$b/stop-polling"; wait "$poller" || true

read -r bf_ok bf_failed bf_conns bf_max < <(load_summary "$b/fresh.json")
read -r bk_ok bk_failed bk_conns bk_max < <(load_summary "$b/keepalive.json")
if [ "$b_fail" = 0 ] && [ ${#reload_info[@]} = "$RELOADS" ]; then
  ok "B reloads: $RELOADS x systemctl reload, MainPID moved each time to the process the old one named: ${reload_info[*]}"
else
  bad "B reloads: ${#reload_info[@]} of $RELOADS done (${reload_info[*]:-})"
fi
if [ "$bf_failed" = 0 ] && [ "$bk_failed" = 0 ] && [ "$bf_ok" -gt 0 ] && [ "$bk_ok" -gt 0 ]; then
  ok "B load: new-connection client $bf_ok ok (max $bf_max ms), keep-alive client $bk_ok ok on $bk_conns connections (max $bk_max ms), 0 failed"
else
  bad "B load: new-connection $bf_ok ok / $bf_failed failed, keep-alive $bk_ok ok / $bk_failed failed"
  load_errors "$b/fresh.json"; load_errors "$b/keepalive.json"
fi
samples=$(wc -l <"$b/states.txt")
states=$(grep -oE 'ActiveState=[a-z-]+' "$b/states.txt" | sort | uniq -c | awk '{printf "%s %s, ", $2, $1}')
wrong=$(grep -vE 'ActiveState=(active|reloading) ' "$b/states.txt" || true)
zero=$(grep -E 'MainPID=0 ' "$b/states.txt" || true)
pid_seq=$(grep -oE 'MainPID=[0-9]+' "$b/states.txt" | uniq | cut -d= -f2 | tr '\n' ' ')
if [ -z "$wrong" ] && [ -z "$zero" ] && [ "$samples" -gt 20 ]; then
  ok "B ActiveState polled $samples times during the reloads: ${states%, }; never anything else; MainPID never 0 ($pid_seq)"
else
  bad "B ActiveState/MainPID during the reloads: ${states%, }"; sed -n 1,10p <<<"$wrong$zero"
fi
nrestarts=$(prop "$unit" NRestarts)
[ "$nrestarts" = 0 ] || bad "B: NRestarts=$nrestarts after the reloads"

# Checks a `systemctl stop` of MainPID $2 (one an upgrade started) that took $3 ms, as $1.
stop_outcome() {
  local what=$1 pid=$2 took=$3 state result code status exec_pid
  state=$(prop "$unit" ActiveState); result=$(prop "$unit" Result)
  code=$(prop "$unit" ExecMainCode); status=$(prop "$unit" ExecMainStatus); exec_pid=$(prop "$unit" ExecMainPID)
  # systemd records ExecMain* only for a main process it started itself; one it adopted through
  # MAINPID= (reparented to it by the upgrade's double fork) shows ExecMainPID=0. Result=success
  # then says it exited 0: a signal or another status would make it 'signal' or 'exit-code'.
  local exec_ok=0
  if [ "$exec_pid" = "$pid" ] && [ "$code" = 1 ] && [ "$status" = 0 ]; then exec_ok=1; fi
  if [ "$exec_pid" = 0 ] && [ "$code" = 0 ]; then exec_ok=1; fi
  if [ "$state" = inactive ] && [ "$result" = success ] && [ "$exec_ok" = 1 ] \
     && [ "$(count_log "$blog" 'stopped server')" -gt "$stops" ]; then
    ok "$what: stop took $took ms, 'stopped server' logged, inactive, Result=success, ExecMainPID=$exec_pid exited 0"
  else
    # ExecMainCode: 1 exited, 2 killed (ExecMainStatus is then the signal).
    bad "$what: stop took $took ms; ActiveState=$state Result=$result ExecMainPID=$exec_pid ExecMainCode=$code ExecMainStatus=$status; 'stopped server' lines $stops -> $(count_log "$blog" 'stopped server')"
    echo "     the log's last lines:"; tail -4 "$blog" | sed 's/^/     /'
    if [ "$code" = 2 ] && [ "$status" = 9 ] && [ "$took" -lt 1000 ]; then
      echo "     PID $pid was SIGKILLed at once. When it became MainPID (MAINPID= from the old process) its"
      echo "     parent was PID ${parent_at_handover[$pid]:-?}, not the manager ($manager): systemd then calls the main PID"
      echo "     'alien' (service_set_main_pid: pid_is_my_child() is false) and on stop sends SIGTERM without"
      echo "     waiting for it, then SIGKILL to the whole cgroup."
    fi
  fi
}

# Stopping the upgraded main process (the last reload's) with nothing in flight.
stops=$(count_log "$blog" 'stopped server')
t0=$(date +%s%N); sc stop "$unit"; t1=$(date +%s%N)
stop_outcome "B stop of the upgraded main process PID $mainpid, idle" "$mainpid" $(((t1 - t0) / 1000000))

# Stopping with a slow request in flight, the main process again one an upgrade started. The
# delay must be in the environment greenlight starts with (an upgrade passes its own on), so:
# a new EnvironmentFile, a start, one more reload, then the stop.
echo "GREENLIGHT_HEALTHCHECK_DELAY=2s" >"$envfile"
sc start "$unit"
old=$(prop "$unit" MainPID)
inode=$(install_binary "$bbin")
sc reload "$unit"
until_true 15 "[ \"\$(prop $unit MainPID)\" != $old ] && [ \"\$(prop $unit ActiveState)\" = active ]" || true
upgraded=$(prop "$unit" MainPID)
parent_at_handover[$upgraded]=$(ps -o ppid= -p "$upgraded" | tr -d ' ')
until_true 15 "[ ! -d /proc/$old ]" || true
if [ "$upgraded" != "$old" ] && [ "$(exe_inode "$upgraded")" = "$inode" ] && [ ! -d "/proc/$old" ]; then
  out="$b/slow.txt"
  curl -s -i --max-time 20 "http://127.0.0.1:$bport/v1/healthcheck" >"$out" 2>&1 &
  client=$!; pids+=("$client")
  until_true 10 "[ \"\$(ss -Htn state established '( sport = :$bport )' | wc -l)\" -ge 1 ]" || true
  stops=$(count_log "$blog" 'stopped server')
  t0=$(date +%s%N); sc stop "$unit"; t1=$(date +%s%N)
  wait "$client" || true
  if grep -q '^HTTP/1.1 200' "$out" && grep -qi '^Connection: close' "$out"; then
    ok "B the 2 s request in flight at the stop got 200 with Connection: close"
  else
    bad "B the 2 s request in flight at the stop: $(head -c 300 "$out" | head -1)$( [ -s "$out" ] || echo 'no answer at all (connection closed)')"
  fi
  stop_outcome "B stop of the upgraded main process PID $upgraded ($old -> $upgraded by reload) with a 2 s request in flight" "$upgraded" $(((t1 - t0) / 1000000))
else
  bad "B: the reload before the slow stop: MainPID $old -> $upgraded, old gone: $([ -d "/proc/$old" ] && echo no || echo yes)"
fi
[ "$(prop "$unit" NRestarts)" = 0 ] || bad "B: NRestarts=$(prop "$unit" NRestarts)"
berrors=$(g levels "$blog" ERROR CRITICAL)
if [ -z "$berrors" ]; then
  ok "B log: no ERROR or CRITICAL line ($(wc -l <"$blog") lines; $(g count "$blog" 'starting server') starts, $(g count "$blog" 'stopped server') clean stops)"
else
  bad "B log has ERROR/CRITICAL lines:"; echo "$berrors"
fi

echo "upgrade: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
