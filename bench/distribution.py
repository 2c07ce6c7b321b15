#!/usr/bin/env python3
"""How a burst of keep-alive connections spreads over worker loops, three ways.

  reuseport  one SO_REUSEPORT listener per worker (the kernel hashes each connection)
  shared     one listener in every worker's epoll, each worker accepting until EAGAIN
  greenlight the real binary: its supervisor accepts and deals round-robin (counted from
             the SIGQUIT dump, which names each connection's worker)

Workers of the first two models are processes (no GIL), each with its own epoll, as
greenlight's are threads with their own epoll. Prints, per model, the smallest share any
worker got over the rounds, as a fraction of the mean share. The issue's bar: >= 0.5.

Usage: bench/distribution.py [--workers 4] [--connections 256] [--rounds 20]
Needs: target/release/greenlight (cargo build --release). Loopback only; bounded.
"""
import argparse
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def burst(addr, count):
    """Connects `count` clients as fast as possible (non-blocking, as wrk does)."""
    clients = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(addr)
        except BlockingIOError:
            pass
        clients.append(s)
    return clients


def worker_process(listener, report):
    """One model worker: epoll (edge-triggered) on `listener`, accept until EAGAIN, count."""
    ep = select.epoll()
    ep.register(listener.fileno(), select.EPOLLIN | select.EPOLLET)
    held = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not ep.poll(0.05):
            continue
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                break
            held.append(conn)
            os.write(report, b"x")
    os._exit(0)


def run_model(model, workers, connections):
    listeners = []
    if model == "reuseport":
        port = 0
        for _ in range(workers):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", port))
            port = s.getsockname()[1]
            s.listen(4096)
            s.setblocking(False)
            listeners.append(s)
    else:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(4096)
        s.setblocking(False)
        listeners = [s] * workers
    addr = listeners[0].getsockname()
    pipes, pids = [], []
    for i in range(workers):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            worker_process(listeners[i], w)
        os.close(w)
        pipes.append(r)
        pids.append(pid)
    time.sleep(0.2)  # the model workers reach epoll_wait (no event to await from outside)
    clients = burst(addr, connections)
    counts = [0] * workers
    deadline = time.monotonic() + 10
    while sum(counts) < connections and time.monotonic() < deadline:
        ready, _, _ = select.select(pipes, [], [], 0.5)
        for r in ready:
            counts[pipes.index(r)] += len(os.read(r, 4096))
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    for r in pipes:
        os.close(r)
    for c in clients:
        c.close()
    for s in set(listeners):
        s.close()
    return counts


def run_greenlight(workers, connections):
    binary = os.path.join(ROOT, "target", "release", "greenlight")
    proc = subprocess.Popen(
        [binary, "--host", "127.0.0.1", "--port", "0", "--log-format", "json",
         "--workers", str(workers)],
        stderr=subprocess.PIPE, text=True)
    started = json.loads(proc.stderr.readline())
    host, port = started["addr"].rsplit(":", 1)
    clients = burst((host, int(port)), connections)
    request = b"GET /v1/healthcheck HTTP/1.1\r\nHost: x\r\n\r\n"
    for c in clients:
        c.setblocking(True)
        c.settimeout(10)
        c.sendall(request)
    for c in clients:  # answered = adopted by its worker
        if not c.recv(65536).startswith(b"HTTP/1.1 200"):
            raise SystemExit("greenlight did not answer")
    proc.send_signal(signal.SIGQUIT)
    counts = [0] * workers
    for line in proc.stderr:
        row = json.loads(line)
        if row.get("msg") == "connection":
            counts[row["worker"]] += 1
    proc.wait(10)
    for c in clients:
        c.close()
    return counts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    mean = args.connections / args.workers
    print(f"{args.connections} connections in a burst, {args.workers} workers, "
          f"{args.rounds} rounds; mean share {mean:.0f}")
    print("| design | smallest share seen (min/mean) | largest share seen (max/mean) | rounds under 0.5 |")
    print("|---|---|---|---|")
    for model in ["reuseport", "shared", "greenlight"]:
        lows, highs, under = [], [], 0
        for _ in range(args.rounds):
            if model == "greenlight":
                counts = run_greenlight(args.workers, args.connections)
            else:
                counts = run_model(model, args.workers, args.connections)
            lows.append(min(counts) / mean)
            highs.append(max(counts) / mean)
            under += min(counts) < mean / 2
        print(f"| {model} | {min(lows):.2f} | {max(highs):.2f} | {under} of {args.rounds} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
