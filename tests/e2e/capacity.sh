#!/usr/bin/env bash
# Capacity out of the box: started from a shell whose soft descriptor limit is 1024 (the hard
# limit left as the machine allows), greenlight must raise its own soft limit and hold the hard
# limit minus 2,000 idle keep-alive connections (clients spread over several loopback source
# addresses), every one of them, at <= 0.5 KiB of RSS each; while they are held a fresh-
# connection healthcheck every 20 ms for 10 s must have p99 < 5 ms; then SIGTERM must close
# them all and the process exit 0 within 1 s.
# Needs: python3 and a hard RLIMIT_NOFILE of at least 4,000 (no root). Talks only to
# 127.0.0.0/8. Takes about a minute.
set -euo pipefail
cd "$(dirname "$0")/../.."

cargo build --release --locked --quiet
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ]; then hard=$(cat /proc/sys/fs/nr_open); fi
if [ "$hard" -lt 4000 ]; then
  echo "capacity: hard descriptor limit $hard is under 4,000; nothing meaningful to check" >&2
  exit 1
fi
held=$((hard - 2000))

work=$(mktemp -d)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill -KILL "$server_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# The usual shell default: soft 1024. The idle timeout is long enough for the whole run.
(ulimit -Sn 1024; exec ./target/release/greenlight --host 127.0.0.1 --port "$port" \
  --log-format json --idle-timeout 10m 2>"$work/server.log") &
server_pid=$!
timeout 10 bash -c "until grep -q 'starting server' '$work/server.log'; do sleep 0.05; done"
grep 'starting server' "$work/server.log"

# The client raises its own soft limit to the hard one (it holds as many sockets as the server).
python3 - "$port" "$server_pid" "$held" "$hard" "$work/server.log" <<'PY'
import json, os, resource, select, signal, socket, statistics, sys, time

port, pid, count, hard, log_path = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                    int(sys.argv[4]), sys.argv[5])
soft, hard_limit = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard_limit, hard_limit))
REQUEST = b"GET /v1/healthcheck HTTP/1.1\r\nHost: capacity\r\n\r\n"
SOURCES = [f"127.0.0.{i}" for i in range(2, 10)]
failures = []

def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

with open(log_path) as f:
    started = json.loads(f.readline())
print(f"starting server: max_fds={started.get('max_fds')} max_connections={started.get('max_connections')}")
if started.get("max_fds") != hard:
    failures.append(f"max_fds {started.get('max_fds')} is not the hard limit {hard}")

def exchange_all(socks):
    """Sends one request on every socket and reads one whole response on each (epoll)."""
    ep = select.epoll()
    pending, buffers = {}, {}
    for s in socks:
        s.send(REQUEST)
        pending[s.fileno()] = s
        buffers[s.fileno()] = b""
        ep.register(s.fileno(), select.EPOLLIN)
    deadline = time.monotonic() + 120
    bad = 0
    while pending and time.monotonic() < deadline:
        for fd, _ in ep.poll(1.0):
            data = pending[fd].recv(65536)
            if not data:
                bad += 1
                ep.unregister(fd); del pending[fd]
                continue
            buffers[fd] += data
            head, sep, body = buffers[fd].partition(b"\r\n\r\n")
            if sep:
                length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0].split(b":")[1])
                if len(body) >= length:
                    if not head.startswith(b"HTTP/1.1 200"):
                        bad += 1
                    ep.unregister(fd); del pending[fd]
    ep.close()
    return bad + len(pending)

def wait_connected(batch):
    """Waits (bounded) until every non-blocking connect of the batch has completed."""
    ep = select.epoll()
    waiting = {s.fileno() for s in batch}
    for s in batch:
        ep.register(s.fileno(), select.EPOLLOUT)
    deadline = time.monotonic() + 30
    while waiting and time.monotonic() < deadline:
        for fd, _ in ep.poll(1.0):
            waiting.discard(fd)
            ep.unregister(fd)
    ep.close()

def slab_kib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Slab:"):
                return int(line.split()[1])

# Warm up, then the baseline RSS.
warm = socket.create_connection(("127.0.0.1", port))
exchange_all([warm]); warm.close()
time.sleep(0.2)
rss_before = rss_kib()
slab_before = slab_kib()

# Connect in batches the listen backlog holds, each from one of several source addresses.
socks = []
t0 = time.monotonic()
for start in range(0, count, 1000):
    batch = []
    for i in range(start, min(count, start + 1000)):
        s = socket.socket()
        s.bind((SOURCES[i % len(SOURCES)], 0))
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        batch.append(s)
    wait_connected(batch)
    for s in batch:
        s.setblocking(True)
        s.settimeout(30)
    socks += batch
lost = exchange_all(socks)
print(f"{len(socks)} connections opened and answered in {time.monotonic() - t0:.1f} s; {lost} lost")
if lost:
    failures.append(f"{lost} of {count} connections were not served")
time.sleep(0.5)
rss_after = rss_kib()
# Both ends of each connection live in this kernel: half the slab growth is the server's side.
print(f"kernel slab grew {(slab_kib() - slab_before) / count / 2:.2f} KiB per connection end")
per_conn = (rss_after - rss_before) / count
print(f"RSS {rss_before} KiB -> {rss_after} KiB: {per_conn:.3f} KiB per idle connection")
if per_conn > 0.5:
    failures.append(f"{per_conn:.3f} KiB per idle connection is over 0.5")

# The probe: a fresh connection per healthcheck every 20 ms for 10 s.
latencies, probe_failures = [], 0
end = time.monotonic() + 10
while time.monotonic() < end:
    t = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as p:
            p.sendall(b"GET /v1/healthcheck HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = p.recv(65536)
                if not chunk:
                    break
                data += chunk
            if not data.startswith(b"HTTP/1.1 200"):
                probe_failures += 1
    except OSError:
        probe_failures += 1
    latencies.append((time.monotonic() - t) * 1000)
    time.sleep(max(0, 0.02 - (time.monotonic() - t)))
latencies.sort()
p99 = latencies[int(len(latencies) * 0.99) - 1]
print(f"probe: {len(latencies)} requests, p50 {statistics.median(latencies):.2f} ms, p99 {p99:.2f} ms, {probe_failures} failed")
if p99 >= 5 or probe_failures:
    failures.append(f"probe p99 {p99:.2f} ms (bar: < 5) with {probe_failures} failures")

# Still every one held: a second request on each is answered.
lost = exchange_all(socks)
print(f"second round on every held connection: {lost} lost")
if lost:
    failures.append(f"{lost} held connections were gone by the second round")

# SIGTERM: every idle connection closes, the process exits 0 within 1 s.
t = time.monotonic()
os.kill(pid, signal.SIGTERM)
while True:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        break
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
    except OSError:  # it exited between the two looks (ESRCH, ENOENT)
        break
    if time.monotonic() - t > 5:
        break
    time.sleep(0.005)
exit_s = time.monotonic() - t
print(f"exit {exit_s * 1000:.0f} ms after SIGTERM")
if exit_s > 1:
    failures.append(f"exit took {exit_s:.2f} s after SIGTERM (bar: 1 s)")
closed = 0
for s in socks:
    s.settimeout(2)
    try:
        if s.recv(1) == b"":
            closed += 1
    except OSError:
        closed += 1
if closed != count:
    failures.append(f"only {closed} of {count} connections were closed by the drain")
print(f"{closed} of {count} connections closed by the drain")
if failures:
    print("FAILED:\n  " + "\n  ".join(failures))
    sys.exit(1)
PY
wait "$server_pid" && status=0 || status=$?
server_pid=""
echo "greenlight exit status: $status"
grep -E '"(shutting down server|stopped server)"' "$work/server.log" | head -2
[ "$status" -eq 0 ] || { echo "capacity: expected exit 0" >&2; exit 1; }
echo "capacity: passed"
