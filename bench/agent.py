#!/usr/bin/env python3
"""The in-pod agent's figures (issue 11), against the test bed's real kube-apiserver.

Runs `atlas-runner agent` (release build) with a ServiceAccount token bound to the contract's Role,
keeping a MinecraftServer whose server is the test suite's fake Java server, and measures:

  * status writes per minute at steady state while players join and leave every 1-4 s (the agent's
    own counter, atlas_agent_status_writes_total, and, as the API server sees them, the
    MODIFIED events of a watch on the object);                                     target <= 6
  * the time from applying a changed property to the restarted server being Ready in the status
    (seen on a watch), minus the server's own start time (spawn to `Done (`, from the agent's log);
                                                                                   target < 2 s
  * the agent's RSS beside the JVM, and the standalone runner's on the same spec in the same run
    (the peer: the same reconciler without the Kubernetes client);               target <= 24 MiB

    bench/agent.py [--steady-seconds 180] [--restarts 5]

Needs: cargo, a JDK (javac/jar), the test bed (`make testbed`); started under `atlas-testbed run`
when ATLAS_TEST_KUBECONFIG is not set. Nothing leaves loopback.
"""

import argparse
import base64
import json
import os
import random
import re
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from procs import children, free_port, rss_kib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
NAME = "bench"


def build(tmp):
    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "atlas-runner"], cwd=REPO, check=True)
    classes = os.path.join(tmp, "classes")
    os.makedirs(classes)
    subprocess.run(["javac", "--release", "17", "-d", classes, os.path.join(REPO, "tests/fixtures/FakeServer.java")],
                   check=True)
    jar = os.path.join(tmp, "fake-server.jar")
    subprocess.run(["jar", "--create", "--file", jar, "--main-class", "FakeServer", "-C", classes, "."], check=True)
    return os.path.join(TARGET, "release", "atlas-runner"), jar


class Kube:
    """The admin's view of the API server: kubectl for setup, a client-certificate HTTPS client for
    watches (so the bench's own timing does not include a kubectl start)."""

    def __init__(self, kubeconfig):
        self.kubeconfig = kubeconfig
        self.kubectl = os.path.join(os.environ.get("ATLAS_TEST_BIN", os.path.expanduser("~/.cache/atlas-runner/test-bin")),
                                    "kubectl")
        view = json.loads(self.run("config", "view", "--raw", "-o", "json"))
        cluster = view["clusters"][0]["cluster"]
        user = view["users"][0]["user"]
        self.server = cluster["server"]
        self.ca = cluster["certificate-authority"]
        self.ssl = ssl.create_default_context(cafile=self.ca)
        self.ssl.load_cert_chain(user["client-certificate"], user["client-key"])

    def run(self, *args, stdin=None):
        out = subprocess.run([self.kubectl, "--kubeconfig", self.kubeconfig, *args], input=stdin, capture_output=True,
                             text=True)
        if out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr}")
        return out.stdout

    def apply(self, doc, ns=None):
        args = ["apply", "--server-side", "--force-conflicts", "-f", "-"] + (["-n", ns] if ns else [])
        return self.run(*args, stdin=json.dumps(doc))

    def watch(self, ns, on_event, stop):
        """Calls on_event(type, object, time) for every watch event of the bench's object until stop."""
        url = (f"{self.server}/apis/atlas.dev/v1alpha1/namespaces/{ns}/minecraftservers"
               f"?watch=1&fieldSelector=metadata.name%3D{NAME}&allowWatchBookmarks=false")
        while not stop.is_set():
            try:
                with urllib.request.urlopen(url, context=self.ssl, timeout=300) as stream:
                    for line in stream:
                        event = json.loads(line)
                        on_event(event["type"], event["object"], time.monotonic())
                        if stop.is_set():
                            return
            except Exception:
                time.sleep(0.2)


def setup(kube, ns, tmp, binary):
    crd = subprocess.run([binary, "crd"], capture_output=True, text=True, check=True).stdout
    kube.run("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=crd)
    kube.run("wait", "--for=condition=Established", "crd/minecraftservers.atlas.dev", "--timeout=60s")
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    agent = f"{NAME}-agent"
    kube.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": agent}}, ns)
    kube.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": agent}, "rules": [
        {"apiGroups": ["atlas.dev"], "resources": ["minecraftservers"], "resourceNames": [NAME],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["atlas.dev"], "resources": ["minecraftservers/status"], "resourceNames": [NAME],
         "verbs": ["patch"]},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]}]}, ns)
    kube.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": agent},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": agent},
                "subjects": [{"kind": "ServiceAccount", "name": agent, "namespace": ns}]}, ns)
    token = kube.run("create", "token", agent, "-n", ns, "--duration", "2h").strip()
    config = os.path.join(tmp, "agent-kubeconfig")
    with open(config, "w") as f:
        f.write(f"""apiVersion: v1
kind: Config
clusters: [{{name: bed, cluster: {{server: "{kube.server}", certificate-authority: "{kube.ca}"}}}}]
users: [{{name: agent, user: {{token: "{token}"}}}}]
contexts: [{{name: agent, context: {{cluster: bed, user: agent, namespace: {ns}}}}}]
current-context: agent
""")
    secrets = os.path.join(tmp, "secrets")
    os.makedirs(os.path.join(secrets, f"{NAME}-rcon"))
    with open(os.path.join(secrets, f"{NAME}-rcon", "password"), "w") as f:
        f.write(base64.b32encode(os.urandom(15)).decode())
    return config, secrets


def spec(rcon, game, motd):
    return {"eula": True, "server": {"type": "custom", "version": "1.21.4", "jar": "fake-server.jar"},
            "jvm": {"heap": "256M", "flags": "none"}, "rcon": {"port": rcon},
            "properties": {"server-port": str(game), "motd": motd}}


def metric(url, name):
    with urllib.request.urlopen(url, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def duration_seconds(text):
    """A Rust Duration's Debug text ("205.43ms", "1.2s", "950µs") in seconds."""
    m = re.fullmatch(r"([0-9.]+)(ns|µs|us|ms|s)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]


class Agent:
    def __init__(self, binary, config, secrets, ns, data, metrics_port):
        self.ready_after = []
        self.proc = subprocess.Popen(
            [binary, "--log-format", "json", "agent", "--name", NAME, "--namespace", ns, "--data", data,
             "--secrets-dir", secrets, "--metrics-addr", f"127.0.0.1:{metrics_port}", "--server-output", "none",
             "--mojang-manifest-url", f"http://127.0.0.1:{free_port()}/m.json"],
            env=dict(os.environ, KUBECONFIG=config, RUST_LOG="info"),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("message") == "server is ready":
                self.ready_after.append(duration_seconds(entry["after"]))

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def console(binary, data, *command):
    subprocess.run([binary, "console", "--data", data, *command], capture_output=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steady-seconds", type=float, default=180)
    ap.add_argument("--restarts", type=int, default=5)
    args = ap.parse_args()
    if "ATLAS_TEST_KUBECONFIG" not in os.environ:
        subprocess.run(["cargo", "build", "--locked", "-p", "atlas-testbed"], cwd=REPO, check=True)
        testbed = os.path.join(TARGET, "debug", "atlas-testbed")
        os.execv(testbed, [testbed, "run", "--no-s3", "--", sys.executable] + sys.argv)
    kube = Kube(os.environ["ATLAS_TEST_KUBECONFIG"])
    ns = f"bench-agent-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="atlas-bench-agent-") as tmp:
        binary, jar = build(tmp)
        config, secrets = setup(kube, ns, tmp, binary)
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        shutil.copy(jar, os.path.join(data, "fake-server.jar"))
        rcon, game, port = free_port(), free_port(), free_port()
        kube.apply({"apiVersion": "atlas.dev/v1alpha1", "kind": "MinecraftServer", "metadata": {"name": NAME},
                    "spec": spec(rcon, game, "bench-0")}, ns)

        # Every change of the object the API server makes (status writes with a change included).
        events, stop = [], threading.Event()
        threading.Thread(target=kube.watch, args=(ns, lambda *e: events.append(e), stop), daemon=True).start()
        agent = Agent(binary, config, secrets, ns, data, port)
        metrics = f"http://127.0.0.1:{port}/metrics"
        try:
            deadline = time.time() + 120
            while not any(o.get("status", {}).get("phase") == "Running" for _, o, _ in events):
                if time.time() > deadline or agent.proc.poll() is not None:
                    raise RuntimeError("the server did not become Running")
                time.sleep(0.1)
            time.sleep(15)  # past the start's own writes

            # 1. Steady state with players joining and leaving.
            rng = random.Random(11)
            writes0, seen0 = metric(metrics, "atlas_agent_status_writes_total"), len(events)
            started = time.monotonic()
            online, joins, changes = set(), 0, 0
            while time.monotonic() - started < args.steady_seconds:
                if online and (rng.random() < 0.5 or len(online) > 5):
                    who = rng.choice(sorted(online))
                    console(binary, data, "fake-leave", who)
                    online.discard(who)
                else:
                    who = f"player{joins}"
                    joins += 1
                    console(binary, data, "fake-join", who)
                    online.add(who)
                changes += 1
                time.sleep(rng.uniform(1, 4))
            minutes = (time.monotonic() - started) / 60
            writes = metric(metrics, "atlas_agent_status_writes_total") - writes0
            modified = sum(1 for t, _, _ in events[seen0:] if t == "MODIFIED")
            agent_rss = rss_kib(agent.proc.pid) / 1024
            jvm = children(agent.proc.pid)
            jvm_rss = sum(rss_kib(p) for p in jvm) / 1024

            # 2. Apply a changed property -> Ready in the status, minus the server's own start.
            overheads, totals = [], []
            for i in range(1, args.restarts + 1):
                before = len(agent.ready_after)
                mark = len(events)
                t0 = time.monotonic()
                kube.apply({"apiVersion": "atlas.dev/v1alpha1", "kind": "MinecraftServer", "metadata": {"name": NAME},
                            "spec": spec(rcon, game, f"bench-{i}")}, ns)
                generation = int(kube.run("get", "mcs", NAME, "-n", ns, "-o", "jsonpath={.metadata.generation}"))
                ready_at = None
                deadline = time.time() + 120
                while ready_at is None:
                    for _, o, at in events[mark:]:
                        s = o.get("status", {})
                        if s.get("observedGeneration") == generation and s.get("phase") == "Running":
                            ready_at = at
                            break
                    if time.time() > deadline:
                        raise RuntimeError(f"generation {generation} not Ready in the status")
                    time.sleep(0.02)
                while len(agent.ready_after) <= before:
                    time.sleep(0.05)
                own = agent.ready_after[-1]
                totals.append(ready_at - t0)
                overheads.append(ready_at - t0 - own)
                time.sleep(3)

            # 3. The peer: the standalone runner on the same spec, its RSS in the same run.
            peer_data = os.path.join(tmp, "peer")
            os.makedirs(peer_data)
            shutil.copy(jar, os.path.join(peer_data, "fake-server.jar"))
            spec_file = os.path.join(tmp, "peer.yaml")
            with open(spec_file, "w") as f:
                json.dump({"apiVersion": "atlas.dev/v1alpha1", "kind": "MinecraftServer", "metadata": {"name": "peer"},
                           "spec": spec(free_port(), free_port(), "peer")}, f)
            peer_port = free_port()
            peer = subprocess.Popen([binary, "run", "--spec", spec_file, "--data", peer_data, "--metrics-addr",
                                     f"127.0.0.1:{peer_port}", "--mojang-manifest-url",
                                     f"http://127.0.0.1:{free_port()}/m.json"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                deadline = time.time() + 60
                while True:
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{peer_port}/readyz", timeout=2) as r:
                            if r.status == 200:
                                break
                    except Exception:
                        pass
                    if time.time() > deadline:
                        raise RuntimeError("the standalone runner did not become ready")
                    time.sleep(0.2)
                time.sleep(15)
                peer_rss = rss_kib(peer.pid) / 1024
                agent_rss = max(agent_rss, rss_kib(agent.proc.pid) / 1024)
            finally:
                peer.send_signal(signal.SIGTERM)
                peer.wait(timeout=60)
        finally:
            stop.set()
            agent.stop()
            try:
                kube.run("delete", "namespace", ns, "--wait=false")
            except RuntimeError:
                pass

    result = {
        "status_writes_per_minute": writes / minutes,
        "modified_events_per_minute": modified / minutes,
        "player_changes_per_minute": changes / minutes,
        "apply_to_ready_minus_server_start_s": {"median": statistics.median(overheads), "max": max(overheads)},
        "apply_to_ready_s": {"median": statistics.median(totals), "max": max(totals)},
        "server_start_s": statistics.median(agent.ready_after[-args.restarts:]),
        "agent_rss_mib": agent_rss,
        "jvm_rss_mib": jvm_rss,
        "standalone_runner_rss_mib": peer_rss,
    }
    print(f"status writes per minute      {result['status_writes_per_minute']:6.2f}  (API server saw "
          f"{result['modified_events_per_minute']:.2f} MODIFIED/min, with {result['player_changes_per_minute']:.1f} "
          "player joins/leaves a minute; target <= 6)")
    print(f"apply -> Ready minus start    {result['apply_to_ready_minus_server_start_s']['median']:6.2f} s median, "
          f"{result['apply_to_ready_minus_server_start_s']['max']:.2f} s max (server's own start "
          f"{result['server_start_s']:.2f} s; target < 2 s)")
    print(f"agent RSS                     {agent_rss:6.1f} MiB beside a {jvm_rss:.0f} MiB JVM; standalone runner "
          f"{peer_rss:.1f} MiB (ratio {agent_rss / peer_rss:.2f}; target <= 24 MiB)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
