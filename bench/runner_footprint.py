#!/usr/bin/env python3
"""Footprint of the standalone runner beside a peer daemon, measured in the same run.

Runs `atlas-runner run` (release build) supervising the test suite's fake Java server, and
Prometheus' node_exporter as the peer (a small, well-tuned Go exporter doing the comparable job of
serving /metrics while idle). For each it measures, over several rounds:

  * resident memory (VmRSS of the daemon itself; for us not the JVM it supervises),
  * idle CPU over a window (utime+stime from /proc, as % of one core),
  * /metrics latency under a steady 50 requests/s (p50, p99), from a client on loopback.

and prints medians and our/peer ratios. Targets (issue 4): RSS <= 20 MiB, idle CPU < 1 % of a core,
/metrics p99 <= 5 ms.

    bench/runner_footprint.py [--rounds 3] [--idle-seconds 60] [--load-seconds 20]

Needs: cargo, a JDK (javac/jar), node_exporter (apt-get install prometheus-node-exporter; the
script installs it when run as root). Nothing leaves loopback.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from procs import cpu_seconds, free_port, rss_kib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_http(url, timeout=60, want=200):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == want:
                    return
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer {want} within {timeout}s")


def load(url, rate, seconds):
    """Sends `rate` GETs a second on one keep-alive connection; returns latencies in ms."""
    import http.client

    host, port = url.split("/")[2].split(":")
    path = "/" + url.split("/", 3)[3]
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    latencies = []
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        due = start + i / rate
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        t0 = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        latencies.append((time.perf_counter() - t0) * 1000)
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}")
    conn.close()
    return latencies


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def measure(name, pid, url, idle_seconds, load_seconds):
    rss_idle = rss_kib(pid)
    c0 = cpu_seconds(pid)
    time.sleep(idle_seconds)
    cpu_pct = (cpu_seconds(pid) - c0) / idle_seconds * 100
    lat = load(url, 50, load_seconds)
    rss_after = rss_kib(pid)
    return {
        "name": name,
        "rss_mib": max(rss_idle, rss_after) / 1024,
        "idle_cpu_pct": cpu_pct,
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
    }


def build(tmp):
    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "atlas-runner"], cwd=REPO, check=True)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
    binary = os.path.join(target, "release", "atlas-runner")
    classes = os.path.join(tmp, "classes")
    os.makedirs(classes)
    subprocess.run(["javac", "--release", "17", "-d", classes, os.path.join(REPO, "tests/fixtures/FakeServer.java")], check=True)
    jar = os.path.join(tmp, "fake-server.jar")
    subprocess.run(["jar", "--create", "--file", jar, "--main-class", "FakeServer", "-C", classes, "."], check=True)
    return binary, jar


def node_exporter():
    path = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus-node-exporter"],
                       check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        return shutil.which("prometheus-node-exporter")
    sys.exit("node_exporter is missing: apt-get install prometheus-node-exporter")


def one_round(binary, jar, exporter, args, tmp, n):
    data = os.path.join(tmp, f"data{n}")
    os.makedirs(data)
    shutil.copy(jar, os.path.join(data, "fake-server.jar"))
    spec = os.path.join(tmp, f"server{n}.yaml")
    rcon, game, ours, peer = free_port(), free_port(), free_port(), free_port()
    with open(spec, "w") as f:
        f.write(f"""apiVersion: atlas.dev/v1alpha1
kind: MinecraftServer
metadata: {{name: bench}}
spec:
  eula: true
  server: {{type: custom, version: "1.21.4", jar: fake-server.jar}}
  jvm: {{heap: 256M, flags: none}}
  rcon: {{port: {rcon}}}
  properties: {{server-port: "{game}"}}
""")
    runner = subprocess.Popen(
        [binary, "run", "--spec", spec, "--data", data, "--metrics-addr", f"127.0.0.1:{ours}",
         "--mojang-manifest-url", f"http://127.0.0.1:{free_port()}/m.json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    exp = subprocess.Popen(
        [exporter, f"--web.listen-address=127.0.0.1:{peer}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{ours}/readyz")
        wait_http(f"http://127.0.0.1:{peer}/metrics")
        time.sleep(5)  # let both settle after start-up
        return (measure("atlas-runner", runner.pid, f"http://127.0.0.1:{ours}/metrics", args.idle_seconds, args.load_seconds),
                measure("node_exporter", exp.pid, f"http://127.0.0.1:{peer}/metrics", args.idle_seconds, args.load_seconds))
    finally:
        for p in (runner, exp):
            p.send_signal(signal.SIGTERM)
        for p in (runner, exp):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle-seconds", type=float, default=60)
    ap.add_argument("--load-seconds", type=float, default=20)
    args = ap.parse_args()
    exporter = node_exporter()
    with tempfile.TemporaryDirectory(prefix="atlas-bench-") as tmp:
        binary, jar = build(tmp)
        rounds = [one_round(binary, jar, exporter, args, tmp, n) for n in range(args.rounds)]
    ours = [r[0] for r in rounds]
    peer = [r[1] for r in rounds]
    print(f"{'metric':<14}{'atlas-runner':>14}{'node_exporter':>15}{'ratio':>8}   (medians of {args.rounds} rounds)")
    summary = {}
    for key, label in [("rss_mib", "RSS MiB"), ("idle_cpu_pct", "idle CPU %"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")]:
        a = statistics.median(r[key] for r in ours)
        b = statistics.median(r[key] for r in peer)
        ratio = a / b if b else float("inf")
        summary[key] = {"ours": a, "peer": b, "ratio": ratio}
        print(f"{label:<14}{a:>14.3f}{b:>15.3f}{ratio:>8.2f}")
    print(json.dumps({"rounds": rounds, "summary": summary}))


if __name__ == "__main__":
    main()
