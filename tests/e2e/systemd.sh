#!/usr/bin/env bash
# greenlight under a REAL systemd user manager, fenced in: its own mount and PID namespace
# (everything dies with this script, even on SIGKILL), its own cgroup, the console masked.
# Checks: socket-activated start and READY=1; stop during a slow request; restart under load
# with zero failed requests; the watchdog; SIGQUIT -> failure -> restart; SIGTERM drain shown
# as deactivating with a draining status. Also verifies the shipped units in docs/systemd/.
# Needs: root, util-linux (unshare), systemd, iproute2 (ss), curl, python3 (installed with
# apt-get if missing). Talks only to 127.0.0.1. Takes about a minute.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)

if [ "${GREENLIGHT_E2E_FENCED:-}" != 1 ]; then
  [ "$(id -u)" = 0 ] || { echo "systemd e2e: needs root"; exit 1; }
  need=()
  [ -x /lib/systemd/systemd ] && command -v systemctl >/dev/null || need+=(systemd)
  command -v ss >/dev/null || need+=(iproute2)
  command -v curl >/dev/null || need+=(curl)
  command -v unshare >/dev/null || need+=(util-linux)
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  cargo build --release --locked --quiet
  exec unshare --mount --pid --fork --mount-proc --kill-child env GREENLIGHT_E2E_FENCED=1 bash "$0" "$@"
fi

# ---------------------------------------------------------------- inside the fence
bin="$root/target/release/greenlight"
name="greenlight-e2e-$(date +%s%N)"
work=$(mktemp -d /tmp/greenlight-e2e.XXXXXX)
runtime="$work/runtime"; home="$work/home"; units="$runtime/systemd/user"
log="$work/greenlight.log"; envfile="$work/greenlight.env"
mkdir -p "$runtime" "$home"; chmod 0700 "$runtime"
export XDG_RUNTIME_DIR="$runtime"
# shellcheck source=tests/e2e/lib/fence.bash
source "$root/tests/e2e/lib/fence.bash"
fence_cgroups "$name"
passed=0; failed=0

cleanup() {
  fence_leave greenlight.service greenlight.socket
  rm -rf "$work"
}
trap cleanup EXIT

sc() { timeout 40 systemctl --user "$@"; }
prop() { sc show -p "$2" --value "$1"; }
ok() { echo "ok   $1"; passed=$((passed + 1)); }
bad() { echo "FAIL $1"; failed=$((failed + 1)); }
# Waits, at most $1 seconds, until the shell condition $2 holds.
until_true() {
  local end=$((SECONDS + $1))
  until eval "$2"; do
    [ "$SECONDS" -ge "$end" ] && return 1
    sleep 0.05
  done
}
in_flight() { [ "$(ss -Htn state established "( sport = :$port )" | wc -l)" -ge 1 ]; }

fence_enter

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$units"
cat >"$units/greenlight.socket" <<UNIT
[Socket]
ListenStream=127.0.0.1:$port
Backlog=4096
NoDelay=true
UNIT
# The shipped unit's behaviour settings; its sandboxing needs a system manager.
cat >"$units/greenlight.service" <<UNIT
[Unit]
Requires=greenlight.socket
After=greenlight.socket
[Service]
Type=notify
NotifyAccess=main
EnvironmentFile=$envfile
ExecStart=$bin --log-format json
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec=35
WatchdogSec=3
Restart=on-failure
RestartSec=500ms
StandardError=append:$log
UNIT
echo "GREENLIGHT_HEALTHCHECK_DELAY=2s" >"$envfile"

fence_start_manager "$home" "$runtime"
until_true 20 "systemctl --user is-system-running >/dev/null 2>&1" || { echo "the user manager did not start"; exit 1; }

# The shipped units verify (with ExecStart pointed at this build).
verify="$work/verify"; mkdir -p "$verify"
cp docs/systemd/greenlight.socket docs/systemd/greenlight-admin.socket "$verify/"
sed "s|^ExecStart=/usr/local/bin/greenlight|ExecStart=$bin|" docs/systemd/greenlight.service >"$verify/greenlight.service"
if (cd "$verify" && systemd-analyze verify --man=no ./greenlight.socket ./greenlight-admin.socket ./greenlight.service); then
  exposure=$(cd "$verify" && systemd-analyze security --offline=true ./greenlight.service 2>/dev/null | grep -o 'exposure level for greenlight.service: .*' || true)
  ok "docs/systemd units pass systemd-analyze verify ($exposure)"
else
  bad "docs/systemd units fail systemd-analyze verify"
fi

count() { grep -c "\"msg\":\"$1\"" "$log" 2>/dev/null || true; }
response() { grep -i "$2" "$1" >/dev/null; }

# 1. Socket-activated start: the first connection starts the service; active only after READY=1.
sc start greenlight.socket
before=$(prop greenlight.service ActiveState)
out="$work/1.txt"
curl -s -i --max-time 20 "http://127.0.0.1:$port/v1/healthcheck" >"$out" || true
active_at=$(prop greenlight.service ActiveEnterTimestampMonotonic)
ready_line=$(grep -m1 '"msg":"starting server"' "$log" || true)
if [ "$before" = inactive ] && response "$out" "^HTTP/1.1 200" && [ "$(prop greenlight.service ActiveState)" = active ] \
   && grep -q 'using the listening socket passed by systemd' "$log" && [ -n "$ready_line" ] \
   && [ "$(prop greenlight.service StatusText)" = "serving on 127.0.0.1:$port" ] && [ "$active_at" -gt 0 ]; then
  # systemctl start of a Type=notify unit returns only after READY=1: the line precedes it.
  sc stop greenlight.service
  starts=$(count "starting server")
  sc start greenlight.service
  if [ "$(count "starting server")" -gt "$starts" ]; then
    ok "1 socket activation: inactive -> curl 200 -> active; start returned after the starting-server line (READY=1)"
  else
    bad "1 start returned before greenlight was ready"
  fi
else
  bad "1 socket activation (before=$before, status=$(prop greenlight.service StatusText))"; cat "$out"
fi

# 2. systemctl stop during a slow request: it completes with Connection: close; clean stop.
out="$work/2.txt"
curl -s -i --max-time 20 "http://127.0.0.1:$port/v1/healthcheck" >"$out" &
client=$!
until_true 10 in_flight
stops=$(count "stopped server")
sc stop greenlight.service
wait "$client" || true
result=$(prop greenlight.service Result); status=$(prop greenlight.service ExecMainStatus)
if response "$out" "^HTTP/1.1 200" && response "$out" "^Connection: close" && [ "$result" = success ] \
   && [ "$status" = 0 ] && [ "$(count "stopped server")" -gt "$stops" ] && grep -q '"msg":"shutting down server"' "$log"; then
  ok "2 stop during a slow request: 200 with Connection: close, Result=success, exit 0, shutting down/stopped logged"
else
  bad "2 stop during a slow request (Result=$result ExecMainStatus=$status)"; cat "$out"
fi

# 3. systemctl restart while a client loop sends requests continuously: zero failures.
echo "GREENLIGHT_HEALTHCHECK_DELAY=0s" >"$envfile"
sc start greenlight.service
old_pid=$(prop greenlight.service MainPID)
python3 - "$port" 6 >"$work/3.txt" 2>"$work/3.err" <<'PY' &
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
ok = failed = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /v1/healthcheck HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 200 ") and body.endswith(b"}\n"):
            ok += 1
        else:
            failed += 1
            print(f"bad response {data[:80]!r}", file=sys.stderr)
    except OSError as e:
        failed += 1
        print(f"request failed: {e!r}", file=sys.stderr)
print(ok, failed)
PY
client=$!
sleep 2   # load already flowing when the restart lands
sc restart greenlight.service
wait "$client" || true
read -r done_ok done_failed <"$work/3.txt"
new_pid=$(prop greenlight.service MainPID)
if [ "$done_failed" = 0 ] && [ "$done_ok" -gt 100 ] && [ "$new_pid" != "$old_pid" ]; then
  ok "3 restart under load: $done_ok requests, 0 failed, MainPID $old_pid -> $new_pid"
else
  bad "3 restart under load: $done_ok ok, $done_failed failed, MainPID $old_pid -> $new_pid"; cat "$work/3.err"
fi

# 4. The watchdog: pings keep the service up; a stopped loop is killed and restarted.
first=$(prop greenlight.service WatchdogTimestampMonotonic)
pid=$(prop greenlight.service MainPID); restarts=$(prop greenlight.service NRestarts)
until_true 10 "[ \"\$(prop greenlight.service WatchdogTimestampMonotonic)\" != '$first' ]" || true
second=$(prop greenlight.service WatchdogTimestampMonotonic)
sleep 4   # more than WatchdogSec: a missing ping would have killed it by now
if [ "$second" != "$first" ] && [ "$(prop greenlight.service MainPID)" = "$pid" ] \
   && [ "$(prop greenlight.service NRestarts)" = "$restarts" ]; then
  kill -STOP "$pid"
  until_true 30 "[ \"\$(prop greenlight.service NRestarts)\" -gt $restarts ]" || true
  until_true 20 "[ \"\$(prop greenlight.service ActiveState)\" = active ]" || true
  if [ "$(prop greenlight.service NRestarts)" -gt "$restarts" ] && [ "$(prop greenlight.service MainPID)" != "$pid" ]; then
    ok "4 watchdog: pings seen ($first -> $second), up past WatchdogSec; a stopped loop was restarted"
  else
    bad "4 watchdog did not restart a stopped loop"
  fi
else
  bad "4 watchdog: timestamps $first -> $second, MainPID $(prop greenlight.service MainPID) (was $pid)"
fi

# 5. SIGQUIT: exit 2 is a failure, and Restart=on-failure brings the service back.
pid=$(prop greenlight.service MainPID); restarts=$(prop greenlight.service NRestarts)
sc kill -s SIGQUIT greenlight.service
until_true 20 "[ \"\$(prop greenlight.service NRestarts)\" -gt $restarts ]" || true
until_true 20 "[ \"\$(prop greenlight.service ActiveState)\" = active ]" || true
new_pid=$(prop greenlight.service MainPID)
if [ "$(prop greenlight.service NRestarts)" -gt "$restarts" ] && [ "$new_pid" != "$pid" ] && [ "$new_pid" != 0 ] \
   && grep -q 'dumping connection table' "$log"; then
  ok "5 SIGQUIT: connection table dumped, exit 2 counted as failure, restarted (MainPID $pid -> $new_pid)"
else
  bad "5 SIGQUIT restart (NRestarts=$(prop greenlight.service NRestarts), MainPID $new_pid)"
fi

# 6. systemctl kill -s SIGTERM during a slow request: deactivating while draining, a draining
#    status, the request completes, and the clean exit is not restarted.
echo "GREENLIGHT_HEALTHCHECK_DELAY=2s" >"$envfile"
sc restart greenlight.service
restarts=$(prop greenlight.service NRestarts)
out="$work/6.txt"
curl -s -i --max-time 20 "http://127.0.0.1:$port/v1/healthcheck" >"$out" &
client=$!
until_true 10 in_flight
sc kill -s SIGTERM greenlight.service
until_true 5 "[ \"\$(prop greenlight.service ActiveState)\" = deactivating ]" || true
state=$(prop greenlight.service ActiveState); status_text=$(prop greenlight.service StatusText)
wait "$client" || true
until_true 20 "[ \"\$(prop greenlight.service ActiveState)\" = inactive ]" || true
final=$(prop greenlight.service ActiveState); result=$(prop greenlight.service Result)
if [ "$state" = deactivating ] && [ "$status_text" = "draining 1 connection" ] && response "$out" "^HTTP/1.1 200" \
   && response "$out" "^Connection: close" && [ "$final" = inactive ] && [ "$result" = success ] \
   && [ "$(prop greenlight.service NRestarts)" = "$restarts" ]; then
  ok "6 SIGTERM: deactivating with status '$status_text', request answered with Connection: close, exit 0 not restarted"
else
  bad "6 SIGTERM drain (state=$state status='$status_text' final=$final result=$result)"; cat "$out"
fi

echo "systemd: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
