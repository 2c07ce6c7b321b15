#!/usr/bin/env python3
"""greenlight against nginx, and greenlight against itself at other worker counts, interleaved,
on this machine: see docs/benchmarks.md.

Modes:
  compare (default)  (a)-(e) greenlight against nginx, each pinned to CPU 0 with wrk (one thread)
                     on CPU 1; (w) greenlight --workers 2 against --workers 1 on the same CPUs;
                     start-up and drain exit. Writes bench/out/results.md.
  scaling            req/s and CPU per request for --workers 1..cores, wrk on CPUs of its own
                     where there are enough (bench/out/scaling.md, scaling.tsv).
  latency            latency percentiles of greenlight and nginx from a wrk done() hook
                     (bench/out/latency.md, latency-*.tsv), for bench/plot.gp.

Every figure is a median over rounds that run A B A B ..., because a shared machine is noisy and
only a ratio measured in the same run means anything. Every load is bounded: wrk runs for a fixed
time under a subprocess timeout, and every server is killed if it does not stop in time.
"""
import argparse
import atexit
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
OUT = os.path.join(BENCH, "out")
GREENLIGHT = os.path.join(ROOT, "target", "release", "greenlight")
SOURCE = "unknown commit"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_CPU = "0"
CLIENT_CPU = "1"
REQUEST = b"GET /v1/healthcheck HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
SOCKET_TIMEOUT = 10.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """utime + stime of the whole process (every thread), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def context_switches(pid):
    """Voluntary + involuntary context switches of every thread of the process."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def wait_for_port(port, proc, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError("server did not start")


def stop_process(proc, timeout=60):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def server_env():
    """The environment without GREENLIGHT_* settings: only the flags given here apply."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GREENLIGHT_")}


def pinned(cpus, cmd):
    return (["taskset", "-c", cpus] if cpus else []) + cmd


def cpu_ranges(cpus):
    """[0, 1, 2, 5] -> '0-2,5'"""
    parts, start = [], None
    cpus = sorted(cpus)
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            parts.append(f"{start}-{c}" if c != start else f"{c}")
            start = None
    return ",".join(parts)


def max_connections():
    """30,000, or fewer if the descriptor limit greenlight inherits is lower (it would warn)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 30_000 if soft == resource.RLIM_INFINITY else min(30_000, soft - 100)


def read_until_started(proc):
    """The `starting server` line; warnings before it (say, --max-connections lowered to fit a
    descriptor limit) are passed on."""
    for _ in range(20):
        line = proc.stderr.readline()
        if b"starting server" in line:
            return line
        if not line:
            break
        print(f"greenlight: {line.decode(errors='replace').strip()}", file=sys.stderr)
    stop_process(proc, 10)
    raise RuntimeError("greenlight did not start")


class Greenlight:
    """greenlight with `--workers <workers>` (None: the flag left out, so the default `auto`),
    pinned to `cpus` (None: not pinned)."""

    def __init__(self, workers=1, cpus=SERVER_CPU, name=None, binary=None):
        self.workers = workers
        self.cpus = cpus
        self.name = name or "greenlight"
        self.binary = binary

    def start(self, extra=()):
        self.port = free_port()
        cmd = [self.binary or GREENLIGHT, "--host", "127.0.0.1", "--port", str(self.port), "--log-format", "json",
               "--max-connections", str(max_connections()), *extra]
        if self.workers is not None:
            cmd += ["--workers", str(self.workers)]
        self.proc = subprocess.Popen(pinned(self.cpus, cmd), stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, env=server_env())
        line = read_until_started(self.proc)
        self.started_workers = json.loads(line).get("workers")
        self.pid = self.proc.pid
        return self

    def stop(self):
        stop_process(self.proc)
        self.proc.stderr.close()


class Nginx:
    name = "nginx"

    def __init__(self, body, cpus=SERVER_CPU):
        self.body = body
        self.cpus = cpus

    def start(self):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="greenlight-bench-nginx-")
        escaped = self.body.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        with open(os.path.join(BENCH, "nginx.conf.in")) as f:
            conf = f.read().replace("@DIR@", self.dir).replace("@PORT@", str(self.port)).replace("@BODY@", escaped)
        path = os.path.join(self.dir, "nginx.conf")
        with open(path, "w") as f:
            f.write(conf)
        self.proc = subprocess.Popen(pinned(self.cpus, ["nginx", "-c", path, "-p", self.dir]),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.proc)
        self.pid = self.proc.pid
        return self

    def stop(self):
        stop_process(self.proc)
        shutil.rmtree(self.dir, True)


def wrk(port, connections, seconds, script=None, close=False, cpus=CLIENT_CPU, threads=1):
    cmd = pinned(cpus, ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"])
    if script:
        cmd += ["-s", os.path.join(BENCH, script)]
    if close:
        cmd += ["-H", "Connection: close"]
    cmd.append(f"http://127.0.0.1:{port}/v1/healthcheck")
    # wrk's own CPU: the only child that ends (and is waited for) during the run.
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    result = {
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "errors": 0,
        "raw": out,
    }
    result["client_cpu_us"] = client_cpu * 1e6 / max(result["requests"], 1)
    scale = {"us": 1, "ms": 1000, "s": 1_000_000}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        result[f"p{pct}_us"] = float(m.group(1)) * scale[m.group(2)]
    m = re.search(r"Latency\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", out)
    result["avg_us"] = float(m.group(1)) * scale[m.group(2)]
    result["max_us"] = float(m.group(5)) * scale[m.group(6)]
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        result["errors"] = sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        result["errors"] += int(m.group(1))
    # bench/latency.lua's done() hook: "PCT <percentile> <microseconds>" lines.
    result["percentiles"] = {float(p): float(us) for p, us in re.findall(r"^PCT (\S+) (\d+)$", out, re.M)}
    return result


SCENARIOS = {
    "a": ("keep-alive -c50", dict(connections=50)),
    "b": ("keep-alive -c256", dict(connections=256)),
    "c": ("16-deep pipelining -c50", dict(connections=50, script="pipeline.lua")),
    "d": ("Connection: close -c50", dict(connections=50, close=True)),
}


def run_load(server, params, seconds, client_cpus=CLIENT_CPU, threads=1, script=None):
    """One fresh server, a 1 s warm-up, then a measured run: wrk's figures plus the server's CPU."""
    script = script or params.get("script")
    server.start()
    try:
        wrk(server.port, params["connections"], 1, script, params.get("close", False), client_cpus, threads)
        switches, before, start = context_switches(server.pid), cpu_seconds(server.pid), time.monotonic()
        result = wrk(server.port, params["connections"], seconds, script, params.get("close", False),
                     client_cpus, threads)
        cpu = cpu_seconds(server.pid) - before
        switches = context_switches(server.pid) - switches
        result["switches_per_kreq"] = switches * 1000 / max(result["requests"], 1)
        result["cpu_us"] = cpu * 1e6 / max(result["requests"], 1)
        result["cores_busy"] = cpu / (time.monotonic() - start)
        result["workers"] = getattr(server, "started_workers", None)
        return result
    finally:
        server.stop()


def read_one_response(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("closed before the response")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("closed inside the body")
        body += chunk


def run_idle(server, count):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 1000)), hard))
    server.start()
    socks = []
    try:
        warm = socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_TIMEOUT)
        warm.sendall(REQUEST)
        read_one_response(warm)
        warm.close()
        time.sleep(0.2)
        before = rss_kib(server.pid)
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_TIMEOUT)
            s.sendall(REQUEST)
            read_one_response(s)
            socks.append(s)
        time.sleep(0.2)
        after = rss_kib(server.pid)
        return {"kib_per_conn": (after - before) / count, "rss_before_kib": before, "rss_after_kib": after,
                "workers": getattr(server, "started_workers", None)}
    finally:
        for s in socks:
            s.close()
        server.stop()


def startup_ms():
    """Spawn to the `starting server` line (every worker is up by then), with --workers auto."""
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen([GREENLIGHT, "--host", "127.0.0.1", "--port", str(port), "--log-format", "json",
                             "--workers", "auto"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            env=server_env())
    line = read_until_started(proc)
    elapsed = (time.perf_counter() - start) * 1000
    stop_process(proc, 10)
    proc.stderr.close()
    return elapsed, json.loads(line).get("workers")


def drain_exit_ms():
    """Time from the end of the last response (the last connection closes) to the exit."""
    port = free_port()
    proc = subprocess.Popen([GREENLIGHT, "--host", "127.0.0.1", "--port", str(port), "--log-format", "json",
                             "--workers", "auto", "--healthcheck-delay", "200ms"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=server_env())
    read_until_started(proc)
    s = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    s.sendall(REQUEST)
    proc.send_signal(signal.SIGTERM)
    read_one_response(s)
    done = time.perf_counter()
    s.close()
    proc.wait(timeout=10)
    elapsed = (time.perf_counter() - done) * 1000
    proc.stderr.close()
    return elapsed


def healthcheck_body():
    server = Greenlight().start()
    try:
        s = socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_TIMEOUT)
        s.sendall(REQUEST)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError("closed before the body")
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            if body and len(body) >= int(re.search(rb"Content-Length: (\d+)", head).group(1)):
                return body.decode()
    finally:
        server.stop()


def median(values):
    return statistics.median(values) if values else float("nan")


def ratio(a, b):
    return a / b if b else float("nan")


def machine_line():
    return (f"Machine: {os.uname().sysname} {os.uname().release}, {os.cpu_count()} CPUs ({cpu_model()}); "
            f"{len(os.sched_getaffinity(0))} usable here. greenlight: target/release/greenlight as this run began, "
            f"the tree then at {SOURCE}.")


def source_state():
    """The commit the binary was built from, and whether the working tree had changes."""
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "--", "src",
                                "Cargo.toml", "Cargo.lock"], capture_output=True, text=True, timeout=10).stdout
        return f"commit {commit}" + (" with uncommitted changes to src/" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"


def snapshot_binary():
    """A private copy of the release binary, so that a build running alongside cannot swap it
    in the middle of a run."""
    global GREENLIGHT, SOURCE
    SOURCE = source_state()
    directory = tempfile.mkdtemp(prefix="greenlight-bench-bin-")
    atexit.register(shutil.rmtree, directory, True)
    copy = os.path.join(directory, "greenlight")
    shutil.copy2(GREENLIGHT, copy)
    GREENLIGHT = copy


def write_report(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


# --- (w): --workers 2 against --workers 1 -------------------------------------------------------

WORKER_LOADS = {
    "keep-alive -c50": dict(connections=50),
    "Connection: close -c50": dict(connections=50, close=True),
}


def run_workers_section(args, log):
    """--workers 2 against --workers 1, both pinned to the same CPUs (args.workers_cpus) with wrk
    on CPU 1: the cost of the worker design per request, with the CPU budget held equal. The
    rounds alternate the order (1 2, 2 1, ...) so that drift over a round favours neither."""
    configs = [Greenlight(1, args.workers_cpus, "workers 1"), Greenlight(2, args.workers_cpus, "workers 2")]
    results = {}  # (load, config name) -> [result per round]
    for round_no in range(1, args.rounds + 1):
        for load, params in WORKER_LOADS.items():
            order = configs if round_no % 2 else configs[::-1]
            for server in order:
                r = run_load(server, params, args.seconds)
                log(f"round {round_no} (w) {load} {server.name}: {r['rps']:.0f} req/s, {r['cpu_us']:.2f} us/req, "
                    f"{r['switches_per_kreq']:.0f} context switches/1000 req, "
                    f"p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us, errors {r['errors']}")
                results.setdefault((load, server.name), []).append(r)

    rows, summary = [], {}
    for load in WORKER_LOADS:
        one, two = results[(load, "workers 1")], results[(load, "workers 2")]
        per_round = [ratio(b["cpu_us"], a["cpu_us"]) for a, b in zip(one, two)]
        for figure, field, target in (("server CPU us/request", "cpu_us", "<= 1.05x"), ("req/s", "rps", "-"),
                                      ("server context switches / 1000 requests", "switches_per_kreq", "-"),
                                      ("wrk CPU us/request", "client_cpu_us", "-"),
                                      ("p50 latency us", "p50_us", "-"), ("p99 latency us", "p99_us", "-"),
                                      ("socket errors + non-2xx", "errors", "0")):
            m1, m2 = median([r[field] for r in one]), median([r[field] for r in two])
            q = ratio(m2, m1)
            if field == "cpu_us":
                met = "yes" if q <= 1.05 else "NO"
                summary[load] = (q, per_round)
            elif field == "errors":
                met = "yes" if m1 == 0 and m2 == 0 else "NO"
            else:
                met = "-"
            rows.append(f"| {load} | {figure} | {m1:,.2f} | {m2:,.2f} | {q:.2f} | {target} | {met} |")
    lines = [
        f"(w) greenlight --workers 2 against --workers 1: both pinned to CPU {args.workers_cpus}, wrk -t1 on "
        f"CPU {CLIENT_CPU}; {args.rounds} x {args.seconds} s per load and worker count, interleaved "
        f"(order alternating by round); medians shown. CPU: utime + stime of the whole process.",
        "",
        "| load | figure | workers 1 | workers 2 | ratio 2/1 | target | met |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    for load, (q, per_round) in summary.items():
        lines.append(f"CPU per request, workers 2 / workers 1, {load}: {q:.3f} (median of each); "
                     f"per round: {' / '.join(f'{x:.3f}' for x in per_round)}.")
    return lines


# --- compare mode -------------------------------------------------------------------------------

def compare(args, log):
    body = healthcheck_body()
    servers = [Greenlight(1, SERVER_CPU), Nginx(body)]
    # (e) runs greenlight with its default worker count (auto: one per CPU), not pinned: idle
    # connections cost memory, not CPU, and this is the configuration people run.
    idle_servers = [Greenlight(None, None), Nginx(body)]
    results = {}  # (scenario, server) -> list of dicts
    load_keys = [k for k in args.scenarios if k in SCENARIOS or k == "e"]
    for round_no in range(1, args.rounds + 1):
        for key in load_keys:
            for server in (idle_servers if key == "e" else servers):
                if key == "e":
                    r = run_idle(server, args.idle)
                    log(f"round {round_no} (e) {server.name}: {r['kib_per_conn']:.3f} KiB/conn"
                        + (f" ({r['workers']} workers)" if r["workers"] else ""))
                else:
                    r = run_load(server, SCENARIOS[key][1], args.seconds)
                    log(f"round {round_no} ({key}) {server.name}: {r['rps']:.0f} req/s, "
                        f"{r['cpu_us']:.2f} us/req, p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us, "
                        f"errors {r['errors']}")
                results.setdefault((key, server.name), []).append(r)

    workers_lines = run_workers_section(args, log) if "w" in args.scenarios else []

    startups = [startup_ms() for _ in range(10)]
    startup_workers = startups[0][1]
    startups = [ms for ms, _ in startups]
    exits = [drain_exit_ms() for _ in range(10)]

    def med(key, name, field):
        return median([r[field] for r in results.get((key, name), [])])

    rows = []
    idle_workers = (results.get(("e", "greenlight")) or [{}])[0].get("workers")

    def row(key, figure, field, target, better):
        g, n = med(key, "greenlight", field), med(key, "nginx", field)
        q = ratio(g, n)
        met = better(q, g, n)
        label = SCENARIOS[key][0] if key in SCENARIOS else f"{args.idle:,} idle keep-alive"
        rows.append(f"| ({key}) {label} | {figure} | {g:,.2f} | {n:,.2f} | {q:.2f} | {target} | "
                    f"{'yes' if met else 'NO'} |")

    for key in "abcd":
        if key not in args.scenarios:
            continue
        row(key, "req/s", "rps", ">= 5x" if key == "c" else (">= 1x" if key == "d" else "-"),
            (lambda r, g, n: r >= 5) if key == "c" else ((lambda r, g, n: r >= 1) if key == "d" else (lambda r, g, n: True)))
        row(key, "server CPU us/request", "cpu_us", "<= 0.85x" if key == "a" else "-",
            (lambda r, g, n: r <= 0.85) if key == "a" else (lambda r, g, n: True))
        if key == "c":
            # wrk records one latency per pipelined batch and its percentiles past the sample
            # count read 0; the batch round-trip's mean and maximum are what it measures.
            row(key, "batch latency mean us", "avg_us", "<= 1x", lambda r, g, n: r <= 1.0)
            row(key, "batch latency max us", "max_us", "<= 1x", lambda r, g, n: r <= 1.0)
        else:
            row(key, "p50 latency us", "p50_us", "-", lambda r, g, n: True)
            row(key, "p99 latency us", "p99_us", "<= 1x", lambda r, g, n: r <= 1.0)
        row(key, "socket errors + non-2xx", "errors", "0", lambda r, g, n: g == 0)
    if "e" in args.scenarios:
        row("e", f"RSS KiB per idle connection (greenlight: default workers = {idle_workers})", "kib_per_conn",
            "<= 0.5 KiB and <= 1x", lambda r, g, n: g <= 0.5 and g <= n)

    lines = [
        machine_line(),
        f"(a)-(d): each server pinned to CPU {SERVER_CPU} (greenlight --workers 1), wrk -t1 on CPU {CLIENT_CPU}. "
        f"(e): greenlight with its default workers, not pinned.",
        f"Rounds: {args.rounds} x {args.seconds} s per scenario and server, interleaved; medians shown.",
        f"nginx: {nginx_version()}, one process, access_log off, same body via `return 200`.",
        "",
    ]
    if rows:
        lines += [
            "| scenario | figure | greenlight | nginx | ratio | target | met |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    lines += workers_lines + ([""] if workers_lines else [])
    lines += [
        "| greenlight alone | median of 10 | target | met |",
        "|---|---|---|---|",
        f"| start-up to `starting server`, --workers auto ({startup_workers} workers) | {median(startups):.2f} ms "
        f"| < 10 ms | {'yes' if median(startups) < 10 else 'NO'} |",
        f"| last response of a drain to exit | {median(exits):.2f} ms | < 5 ms | {'yes' if median(exits) < 5 else 'NO'} |",
    ]
    report = "\n".join(lines) + "\n"
    write_report(args.out or os.path.join(OUT, "results.md"), report)
    print()
    print(report)


# --- against mode: this build against an earlier one -------------------------------------------

def against(args, log):
    """This build against the binary at --against (an earlier build), interleaved, both
    `--workers 1` pinned to CPU 0: what a change cost per request. Scenarios (a) and (c)."""
    baseline = os.path.join(tempfile.mkdtemp(prefix="greenlight-bench-base-"), "greenlight")
    shutil.copy2(args.against, baseline)
    servers = [Greenlight(1, SERVER_CPU, "this build"), Greenlight(1, SERVER_CPU, "baseline", baseline)]
    keys = [k for k in args.scenarios if k in "ac"] or ["a", "c"]
    results = {}
    for round_no in range(1, args.rounds + 1):
        for key in keys:
            for server in servers:
                r = run_load(server, SCENARIOS[key][1], args.seconds)
                log(f"round {round_no} ({key}) {server.name}: {r['rps']:.0f} req/s, "
                    f"{r['cpu_us']:.3f} us/req, errors {r['errors']}")
                results.setdefault((key, server.name), []).append(r)
    lines = [
        machine_line(),
        f"This build ({SOURCE}) against {args.against}, both --workers 1 pinned to CPU {SERVER_CPU}, "
        f"wrk -t1 on CPU {CLIENT_CPU}; {args.rounds} x {args.seconds} s, interleaved; medians.",
        "",
        "| scenario | figure | this build | baseline | ratio | per-round ratios |",
        "|---|---|---|---|---|---|",
    ]
    for key in keys:
        for field, figure in (("cpu_us", "server CPU us/request"), ("rps", "req/s"), ("errors", "errors")):
            mine = [r[field] for r in results[(key, "this build")]]
            base = [r[field] for r in results[(key, "baseline")]]
            per_round = ", ".join(f"{ratio(a, b):.2f}" for a, b in zip(mine, base))
            lines.append(f"| ({key}) {SCENARIOS[key][0]} | {figure} | {median(mine):,.3f} | "
                         f"{median(base):,.3f} | {ratio(median(mine), median(base)):.2f} | {per_round} |")
    report = "\n".join(lines) + "\n"
    write_report(args.out or os.path.join(OUT, "against.md"), report)
    print()
    print(report)


# --- scaling mode -------------------------------------------------------------------------------

def scaling_plan(max_workers):
    """CPUs for wrk and for each worker count.

    The usable CPUs split in two: the lower half for the server, the upper half for wrk (one
    thread per CPU), as a client needs about as much CPU per request as the server. Worker count
    w gets the first w server CPUs; past the server's half it borrows wrk's CPUs, and such rows
    are marked shared. With 2 CPUs: wrk on CPU 1; 1 worker on CPU 0; 2 workers on CPUs 0-1,
    sharing CPU 1 with wrk.
    """
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        raise SystemExit("scaling needs at least 2 CPUs: one for the server, one for wrk")
    half = len(usable) // 2
    server_pool, client_pool = usable[:half], usable[half:]
    plan = []
    for w in range(1, max_workers + 1):
        if w <= len(server_pool):
            cpus, shared = server_pool[:w], False
        else:
            cpus, shared = (server_pool + client_pool)[:w], True
        plan.append((w, cpus, shared))
    return client_pool, plan


SCALING_LOADS = {
    "keep-alive": dict(close=False),
    "Connection: close": dict(close=True),
}


def scaling(args, log):
    usable = sorted(os.sched_getaffinity(0))
    max_workers = args.max_workers or len(usable)
    client_pool, plan = scaling_plan(max_workers)
    threads = len(client_pool)
    connections = 50 * threads
    client_cpus = cpu_ranges(client_pool)
    caveat = [
        f"Caveat: only {len(usable)} CPUs. wrk needs about as much CPU per request as the server, so wrk "
        f"gets CPU {client_cpus} and the server {len(usable) - len(client_pool)} CPU(s) of its own; rows "
        f"marked 'shared' run workers on wrk's CPUs too, where they and wrk take CPU from each other. "
        f"Those rows can show whether more workers cost more CPU per request; they cannot show how far "
        f"req/s scales with workers, as the load generator is starved in them. For that, run this on a "
        f"machine with twice as many CPUs as the largest worker count. And on a machine other jobs load, "
        f"a shared row also escapes them on the borrowed CPUs, which the rows before it cannot.",
    ] if any(shared for _, _, shared in plan) else []
    for line in caveat:
        log(line)

    results = {}  # (load, workers) -> [result per round]
    for round_no in range(1, args.rounds + 1):
        for load, params in SCALING_LOADS.items():
            order = plan if round_no % 2 else plan[::-1]
            for w, cpus, shared in order:
                server = Greenlight(w, cpu_ranges(cpus), f"workers {w}")
                r = run_load(server, dict(connections=connections, **params), args.seconds, client_cpus, threads)
                log(f"round {round_no} scaling {load} workers {w} (CPUs {cpu_ranges(cpus)}"
                    f"{', shared with wrk' if shared else ''}): {r['rps']:.0f} req/s, {r['cpu_us']:.2f} us/req, "
                    f"{r['cores_busy']:.2f} CPUs busy, wrk {r['client_cpu_us']:.2f} us/req, "
                    f"{r['switches_per_kreq']:.0f} context switches/1000 req, "
                    f"p99 {r['p99_us']:.0f} us, errors {r['errors']}")
                results.setdefault((load, w), []).append(r)

    def med(load, w, field):
        return median([r[field] for r in results[(load, w)]])

    rows, tsv = [], ["workers\tlabel\tka_rps\tka_cpu_us\tclose_rps\tclose_cpu_us\tka_cores\tclose_cores"]
    for load in SCALING_LOADS:
        for w, cpus, shared in plan:
            where = f"CPU {cpu_ranges(cpus)}" + (" (shared with wrk)" if shared else "")
            rps, cpu = med(load, w, "rps"), med(load, w, "cpu_us")
            rows.append(f"| {load} -c{connections} | {w} | {where} | {rps:,.0f} | {ratio(rps, med(load, 1, 'rps')):.2f} "
                        f"| {cpu:.2f} | {ratio(cpu, med(load, 1, 'cpu_us')):.2f} | {med(load, w, 'client_cpu_us'):.2f} "
                        f"| {med(load, w, 'cores_busy'):.2f} "
                        f"| {med(load, w, 'switches_per_kreq'):.0f} | {med(load, w, 'p99_us'):,.0f} "
                        f"| {med(load, w, 'errors'):.0f} |")
    for w, cpus, shared in plan:
        label = f"{w} worker{'s' if w > 1 else ''}\\nCPU {cpu_ranges(cpus)}" + ("\\nshared with wrk" if shared else "")
        tsv.append("\t".join([str(w), label] + [f"{med(load, w, f):.3f}" for load in SCALING_LOADS
                                                 for f in ("rps", "cpu_us")]
                             + [f"{med(load, w, 'cores_busy'):.3f}" for load in SCALING_LOADS]))
    lines = [
        machine_line(),
        f"wrk -t{threads} -c{connections} on CPU {client_cpus}; greenlight --workers N pinned as shown. "
        f"{args.rounds} x {args.seconds} s per load and worker count, interleaved; medians shown.",
        *caveat,
        "",
        "| load | workers | server CPUs | req/s | req/s vs 1 | server CPU us/request | CPU/request vs 1 "
        "| wrk CPU us/request | server CPUs busy | context switches / 1000 req | p99 us | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    for load in SCALING_LOADS:
        for w, _, _ in plan[1:]:
            per_round = [ratio(b["cpu_us"], a["cpu_us"]) for a, b in zip(results[(load, 1)], results[(load, w)])]
            lines.append(f"CPU per request, workers {w} / workers 1, {load}: "
                         f"{ratio(med(load, w, 'cpu_us'), med(load, 1, 'cpu_us')):.3f} (median of each); "
                         f"per round: {' / '.join(f'{x:.3f}' for x in per_round)}.")
    report = "\n".join(lines) + "\n"
    write_report(os.path.join(OUT, "scaling.md"), report)
    write_report(os.path.join(OUT, "scaling.tsv"), "\n".join(tsv) + "\n")
    print()
    print(report)


# --- latency mode -------------------------------------------------------------------------------

LATENCY_LOADS = {
    "keepalive": ("keep-alive -c50", dict(connections=50)),
    "close": ("Connection: close -c50", dict(connections=50, close=True)),
}


def latency(args, log):
    """Percentiles from bench/latency.lua's done() hook; each the median over the rounds."""
    body = healthcheck_body()
    servers = [Greenlight(1, SERVER_CPU), Nginx(body)]
    results = {}
    for round_no in range(1, args.rounds + 1):
        for key, (label, params) in LATENCY_LOADS.items():
            for server in servers:
                r = run_load(server, params, args.seconds, script="latency.lua")
                log(f"round {round_no} latency {label} {server.name}: {r['rps']:.0f} req/s, "
                    f"p50 {r['percentiles'][50.0]:.0f} us, p99 {r['percentiles'][99.0]:.0f} us, "
                    f"p99.9 {r['percentiles'][99.9]:.0f} us, max {r['percentiles'][100.0]:.0f} us, "
                    f"errors {r['errors']}")
                results.setdefault((key, server.name), []).append(r)

    lines = [
        machine_line(),
        f"Each server pinned to CPU {SERVER_CPU} (greenlight --workers 1, nginx one process), wrk -t1 on CPU "
        f"{CLIENT_CPU} with bench/latency.lua; {args.rounds} x {args.seconds} s per load and server, interleaved; "
        f"each percentile is the median over the rounds, in microseconds.",
        "",
    ]
    for key, (label, _) in LATENCY_LOADS.items():
        pcts = sorted(results[(key, "greenlight")][0]["percentiles"])
        g = {p: median([r["percentiles"][p] for r in results[(key, "greenlight")]]) for p in pcts}
        n = {p: median([r["percentiles"][p] for r in results[(key, "nginx")]]) for p in pcts}
        tsv = ["percentile\tgreenlight_us\tnginx_us"] + [f"{p:g}\t{g[p]:.0f}\t{n[p]:.0f}" for p in pcts if p < 100]
        write_report(os.path.join(OUT, f"latency-{key}.tsv"), "\n".join(tsv) + "\n")
        lines += [f"{label}:", "", "| percentile | greenlight us | nginx us | ratio |", "|---|---|---|---|"]
        lines += [f"| {'max' if p == 100 else f'{p:g}'} | {g[p]:,.0f} | {n[p]:,.0f} | {ratio(g[p], n[p]):.2f} |"
                  for p in pcts]
        lines.append("")
    report = "\n".join(lines)
    write_report(os.path.join(OUT, "latency.md"), report)
    print()
    print(report)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["compare", "scaling", "latency", "against"], default="compare")
    parser.add_argument("--against", default=None,
                        help="against mode: an earlier greenlight binary to compare this build with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--scenarios", default="abcdew",
                        help="compare mode: a-e against nginx, w for --workers 2 against --workers 1")
    parser.add_argument("--workers-cpus", default=SERVER_CPU,
                        help="compare mode (w): the CPUs both worker counts are pinned to")
    parser.add_argument("--max-workers", type=int, default=0,
                        help="scaling mode: largest worker count (default: the usable CPUs)")
    parser.add_argument("--out", default=None, help="compare mode: the report (bench/out/results.md)")
    args = parser.parse_args()

    def log(line):
        print(line, flush=True)

    snapshot_binary()
    {"compare": compare, "scaling": scaling, "latency": latency, "against": against}[args.mode](args, log)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def nginx_version():
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
    return (out.stderr or out.stdout).strip().replace("nginx version: ", "")


if __name__ == "__main__":
    sys.exit(main())
