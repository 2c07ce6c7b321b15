#!/usr/bin/env python3
"""greenlight against nginx, interleaved, on this machine: see docs/benchmarks.md.

Each server is pinned to CPU 0 and wrk (one thread) to CPU 1. Scenarios run A B A B ... for
several rounds; the report gives medians and the greenlight/nginx ratio of each figure, because
a shared machine is noisy and only a ratio measured in the same run means anything.
"""
import argparse
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
GREENLIGHT = os.path.join(ROOT, "target", "release", "greenlight")
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_CPU = "0"
CLIENT_CPU = "1"
REQUEST = b"GET /v1/healthcheck HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


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


class Greenlight:
    name = "greenlight"

    def start(self):
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, GREENLIGHT, "--host", "127.0.0.1", "--port", str(self.port),
             "--log-format", "json", "--max-connections", "30000"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        line = self.proc.stderr.readline()
        if b"starting server" not in line:
            raise RuntimeError(f"greenlight did not start: {line!r}")
        self.pid = self.proc.pid
        return self

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.proc.stderr.close()


class Nginx:
    name = "nginx"

    def __init__(self, body):
        self.body = body

    def start(self):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="greenlight-bench-nginx-")
        escaped = self.body.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        with open(os.path.join(BENCH, "nginx.conf.in")) as f:
            conf = f.read().replace("@DIR@", self.dir).replace("@PORT@", str(self.port)).replace("@BODY@", escaped)
        path = os.path.join(self.dir, "nginx.conf")
        with open(path, "w") as f:
            f.write(conf)
        self.proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, "nginx", "-c", path, "-p", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.proc)
        self.pid = self.proc.pid
        return self

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def wrk(port, connections, seconds, script=None, close=False):
    cmd = ["taskset", "-c", CLIENT_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if script:
        cmd += ["-s", os.path.join(BENCH, script)]
    if close:
        cmd += ["-H", "Connection: close"]
    cmd.append(f"http://127.0.0.1:{port}/v1/healthcheck")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = {
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "errors": 0,
        "raw": out,
    }
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
    return result


SCENARIOS = {
    "a": ("keep-alive -c50", dict(connections=50)),
    "b": ("keep-alive -c256", dict(connections=256)),
    "c": ("16-deep pipelining -c50", dict(connections=50, script="pipeline.lua")),
    "d": ("Connection: close -c50", dict(connections=50, close=True)),
}


def run_load(server, key, seconds):
    label, params = SCENARIOS[key]
    server.start()
    try:
        wrk(server.port, params["connections"], 1, params.get("script"), params.get("close", False))  # warm-up
        before = cpu_seconds(server.pid)
        result = wrk(server.port, params["connections"], seconds, params.get("script"), params.get("close", False))
        result["cpu_us"] = (cpu_seconds(server.pid) - before) * 1e6 / max(result["requests"], 1)
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
        body += sock.recv(4096)


def run_idle(server, count):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 1000)), hard))
    server.start()
    socks = []
    try:
        warm = socket.create_connection(("127.0.0.1", server.port))
        warm.sendall(REQUEST)
        read_one_response(warm)
        warm.close()
        time.sleep(0.2)
        before = rss_kib(server.pid)
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(REQUEST)
            read_one_response(s)
            socks.append(s)
        time.sleep(0.2)
        after = rss_kib(server.pid)
        return {"kib_per_conn": (after - before) / count, "rss_before_kib": before, "rss_after_kib": after}
    finally:
        for s in socks:
            s.close()
        server.stop()


def startup_ms():
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen([GREENLIGHT, "--host", "127.0.0.1", "--port", str(port), "--log-format", "json"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    proc.stderr.readline()
    elapsed = (time.perf_counter() - start) * 1000
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    proc.stderr.close()
    return elapsed


def drain_exit_ms():
    """Time from the end of the last response (the last connection closes) to the exit."""
    port = free_port()
    proc = subprocess.Popen([GREENLIGHT, "--host", "127.0.0.1", "--port", str(port), "--log-format", "json",
                             "--healthcheck-delay", "200ms"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    proc.stderr.readline()
    s = socket.create_connection(("127.0.0.1", port))
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
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(REQUEST)
        data = b""
        while True:
            chunk = s.recv(4096)
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            if body and len(body) >= int(re.search(rb"Content-Length: (\d+)", head).group(1)):
                return body.decode()
    finally:
        server.stop()


def median(values):
    return statistics.median(values) if values else float("nan")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--scenarios", default="abcde")
    parser.add_argument("--out", default=os.path.join(BENCH, "out", "results.md"))
    args = parser.parse_args()

    body = healthcheck_body()
    servers = [Greenlight(), Nginx(body)]
    results = {}  # (scenario, server) -> list of dicts
    for round_no in range(1, args.rounds + 1):
        for key in args.scenarios:
            for server in servers:
                if key == "e":
                    r = run_idle(server, args.idle)
                    print(f"round {round_no} (e) {server.name}: {r['kib_per_conn']:.3f} KiB/conn", flush=True)
                else:
                    r = run_load(server, key, args.seconds)
                    print(f"round {round_no} ({key}) {server.name}: {r['rps']:.0f} req/s, "
                          f"{r['cpu_us']:.2f} us/req, p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us, "
                          f"errors {r['errors']}", flush=True)
                results.setdefault((key, server.name), []).append(r)

    startups = [startup_ms() for _ in range(10)]
    exits = [drain_exit_ms() for _ in range(10)]

    def med(key, name, field):
        return median([r[field] for r in results.get((key, name), [])])

    rows = []

    def row(key, figure, field, target, better):
        g, n = med(key, "greenlight", field), med(key, "nginx", field)
        ratio = g / n if n else float("nan")
        met = better(ratio, g, n)
        rows.append(f"| ({key}) {SCENARIOS[key][0] if key in SCENARIOS else '10,000 idle keep-alive'} | {figure} "
                    f"| {g:,.2f} | {n:,.2f} | {ratio:.2f} | {target} | {'yes' if met else 'NO'} |")

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
        row("e", "RSS KiB per idle connection", "kib_per_conn", "<= 0.5 KiB and <= 1x",
            lambda r, g, n: g <= 0.5 and g <= n)

    lines = [
        f"Machine: {os.uname().sysname} {os.uname().release}, {os.cpu_count()} CPUs "
        f"({cpu_model()}); servers on CPU {SERVER_CPU}, wrk -t1 on CPU {CLIENT_CPU}.",
        f"Rounds: {args.rounds} x {args.seconds} s per scenario and server, interleaved; medians shown.",
        f"nginx: {nginx_version()}, one process, access_log off, same body via `return 200`.",
        "",
        "| scenario | figure | greenlight | nginx | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "| greenlight alone | median of 10 | target | met |",
        "|---|---|---|---|",
        f"| start-up to `starting server` | {median(startups):.2f} ms | < 10 ms | {'yes' if median(startups) < 10 else 'NO'} |",
        f"| last response of a drain to exit | {median(exits):.2f} ms | < 5 ms | {'yes' if median(exits) < 5 else 'NO'} |",
    ]
    report = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(report)
    print()
    print(report)


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
