#!/usr/bin/env python3
"""The operator at scale: 1,000 MinecraftServers reconciled by one `atlas-runner operator` against
the bare API server (etcd + kube-apiserver from the test bed; no nodes), with a peer measured in the
same run.

Measures, in this order:

  * ours: from the operator's start (release build, leader election on, 1,000 servers already
    created) until every one of the 1,000 StatefulSets exists. Each server gets seven objects
    (ServiceAccount, Role, RoleBinding, two Services, the RCON Secret, the StatefulSet) and a status
    write. Target (issue 12): under 60 s.
  * the peer, in the same run: `kubectl apply --server-side` of the same 1,000 StatefulSets (those
    the operator rendered, owner references and server-set fields dropped) into another namespace.
    Printed with the ratio ours / peer. The peer writes one object per server, we write eight.
  * the operator's peak RSS (VmHWM) over the run. Target: at most 100 MiB.
  * API writes during one idle resync (--resync-seconds, default 30): the API server's own
    apiserver_request_total for POST/PUT/PATCH/DELETE on the kinds the operator writes, between the
    moment the operator's writes settled and the end of a full resync of all 1,000 servers, and the
    operator's own count. Target: zero. (The leader Lease's renewals, one PUT every 2 s, and the API
    server's own upkeep are shown apart.)
  * API reads, from the same apiserver_request_total (GET, LIST, WATCH on resources; the bench's
    own polls taken out): ours from the start until the writes settle and during the idle resync,
    and the peer's kubectl apply, each per server; with the operator's own count of the reads it
    makes outside its watch caches (atlas_operator_api_reads_total).

    bench/operator.py [--servers 1000] [--resync-seconds 30] [--concurrency 16]

Starts a bed (target/debug/atlas-testbed run --no-s3, with a /16 Service range: 1,000 game
Services need more than a /24) unless ATLAS_TEST_KUBECONFIG is set. Needs `make testbed`. Nothing
leaves loopback.
"""

import argparse
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
BIN = os.environ.get("ATLAS_TEST_BIN", os.path.expanduser("~/.cache/atlas-runner/test-bin"))
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE")
READ_VERBS = ("GET", "LIST", "WATCH")
# What the operator writes (besides its leader Lease).
OPERATOR_WRITES = {"statefulsets", "services", "serviceaccounts", "roles", "rolebindings", "secrets",
                   "minecraftservers", "events", "pods", "persistentvolumeclaims", "podmonitors"}


class Api:
    """The API server, with the admin client certificate of the bed's kubeconfig."""

    def __init__(self, kubeconfig):
        config = json.loads(subprocess.run([os.path.join(BIN, "kubectl"), "--kubeconfig", kubeconfig,
                                            "config", "view", "--raw", "-o", "json"],
                                           check=True, capture_output=True, text=True).stdout)
        cluster = config["clusters"][0]["cluster"]
        user = config["users"][0]["user"]
        self.server = cluster["server"]
        self.context = ssl.create_default_context(cafile=cluster["certificate-authority"])
        self.context.load_cert_chain(user["client-certificate"], user["client-key"])
        # The LISTs this bench sent itself (count()), to take out of the API server's read counts.
        self.own_lists = 0

    def get(self, path):
        with urllib.request.urlopen(self.server + path, context=self.context, timeout=30) as r:
            return r.read().decode()

    def count(self, path):
        """Objects at a list path, by one small consistent list (limit=1 + remainingItemCount)."""
        self.own_lists += 1
        body = json.loads(self.get(path + "?limit=1"))
        return len(body["items"]) + int(body["metadata"].get("remainingItemCount") or 0)

    def writes(self):
        """apiserver_request_total of the write verbs, by resource."""
        return self.requests(WRITE_VERBS)

    def reads(self):
        """apiserver_request_total of the read verbs on resources (not /metrics, discovery), by
        resource, with this bench's own LISTs taken out (they are all of StatefulSets)."""
        out = self.requests(READ_VERBS)
        out.pop("", None)
        out["statefulsets"] = out.get("statefulsets", 0) - self.own_lists
        return out

    def requests(self, verbs):
        """apiserver_request_total of `verbs`, by resource."""
        out = {}
        for line in self.get("/metrics").splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels, value = line.rsplit(" ", 1)
            fields = dict(kv.split("=", 1) for kv in labels[len("apiserver_request_total{"):-1].split(","))
            verb = fields.get("verb", "").strip('"')
            if verb in verbs:
                resource = fields.get("resource", "").strip('"')
                out[resource] = out.get(resource, 0) + float(value)
        return out


def kubectl(kubeconfig, *args, stdin=None):
    out = subprocess.run([os.path.join(BIN, "kubectl"), "--kubeconfig", kubeconfig, *args], input=stdin,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr.strip()[-2000:]}")
    return out.stdout


def metric(addr, name):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        total = 0.0
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total


def vm(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def server(name, i):
    # A spread of shapes: some with backups to S3, some with a hub pack, all with resources.
    spec = {"eula": True, "server": {"type": "paper" if i % 2 else "vanilla", "version": "1.21.4"},
            "jvm": {"heapPercent": 70}, "storage": {"size": "10Gi"},
            "resources": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}},
            "properties": {"motd": f"server {i}", "max-players": "20"}}
    return {"apiVersion": "atlas.dev/v1alpha1", "kind": "MinecraftServer", "metadata": {"name": name}, "spec": spec}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", type=int, default=1000)
    p.add_argument("--resync-seconds", type=int, default=30)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()

    if "ATLAS_TEST_KUBECONFIG" not in os.environ:
        subprocess.run(["cargo", "build", "--locked", "-p", "atlas-testbed"], cwd=REPO, check=True)
        testbed = os.path.join(TARGET, "debug", "atlas-testbed")
        env = dict(os.environ, ATLAS_TEST_SERVICE_CIDR="10.0.0.0/16")
        os.execve(testbed, [testbed, "run", "--no-s3", "--", sys.executable] + sys.argv, env)
    kubeconfig = os.environ["ATLAS_TEST_KUBECONFIG"]
    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "atlas-runner"], cwd=REPO, check=True)
    binary = os.path.join(TARGET, "release", "atlas-runner")
    api = Api(kubeconfig)

    kubectl(kubeconfig, "apply", "--server-side", "-f", os.path.join(REPO, "crds", "minecraftservers.atlas.dev.yaml"))
    kubectl(kubeconfig, "wait", "--for=condition=Established", "crd/minecraftservers.atlas.dev")
    suffix = f"{os.getpid()}-{int(time.time())}"
    ours, peer = f"bench-ours-{suffix}", f"bench-peer-{suffix}"
    for ns in (ours, peer):
        kubectl(kubeconfig, "create", "namespace", ns)

    print(f"creating {args.servers} MinecraftServers in {ours} ...", flush=True)
    items = [server(f"mc-{i:04d}", i) for i in range(args.servers)]
    for start in range(0, len(items), 250):
        doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": items[start:start + 250]})
        kubectl(kubeconfig, "apply", "--server-side", "-n", ours, "-f", "-", stdin=doc)

    sts_path = f"/apis/apps/v1/namespaces/{ours}/statefulsets"
    metrics_addr = "127.0.0.1:18089"
    with tempfile.TemporaryDirectory() as tmp:
        log = open(os.path.join(tmp, "operator.log"), "w")
        env = dict(os.environ, KUBECONFIG=kubeconfig, RUST_LOG="warn")
        env.pop("POD_NAMESPACE", None)
        reads_before = api.reads()
        started = time.perf_counter()
        proc = subprocess.Popen([binary, "--log-format", "json", "operator", "--agent-image", "atlas-runner:bench",
                                 "--watch-namespace", ours, "--lease-namespace", ours,
                                 "--metrics-addr", metrics_addr, "--resync-seconds", str(args.resync_seconds),
                                 "--concurrency", str(args.concurrency)],
                                stdout=subprocess.DEVNULL, stderr=log, env=env)
        try:
            peak = 0.0
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the operator exited with {proc.returncode}; see its log")
                peak = max(peak, vm(proc.pid, "VmHWM"))
                if api.count(sts_path) >= args.servers:
                    break
                if time.perf_counter() - started > 600:
                    raise RuntimeError("the StatefulSets were not all there after 10 minutes")
                time.sleep(0.25)
            ours_seconds = time.perf_counter() - started
            print(f"ours: {args.servers} StatefulSets (and their other children) in {ours_seconds:.1f} s", flush=True)

            # Wait for the operator's own writes to stop (status rounds, the last children).
            settled = metric(metrics_addr, "atlas_operator_api_writes_total")
            while True:
                time.sleep(3)
                now = metric(metrics_addr, "atlas_operator_api_writes_total")
                if now == settled:
                    break
                settled = now
            print(f"ours: {int(settled)} writes in all, settled", flush=True)
            reads_settled = api.reads()
            own_reads_settled = metric(metrics_addr, "atlas_operator_api_reads_total")

            # One idle resync: every server reconciled once more, with nothing changed.
            before = api.writes()
            reconciles = metric(metrics_addr, "atlas_operator_reconciles_total")
            resync_started = time.perf_counter()
            while metric(metrics_addr, "atlas_operator_reconciles_total") < reconciles + args.servers:
                if time.perf_counter() - resync_started > 4 * args.resync_seconds + 120:
                    raise RuntimeError("no full resync happened")
                time.sleep(1)
            after = api.writes()
            reads_after = api.reads()
            own_reads_after = metric(metrics_addr, "atlas_operator_api_reads_total")
            resync_seconds = time.perf_counter() - resync_started
            own_after = metric(metrics_addr, "atlas_operator_api_writes_total")
            peak = max(peak, vm(proc.pid, "VmHWM"))
            rss = vm(proc.pid, "VmRSS")
            delta = {r: after.get(r, 0) - before.get(r, 0) for r in after if after.get(r, 0) != before.get(r, 0)}
            # apiserver_request_total has no namespace or user label: the kinds the operator writes
            # are counted as its writes; the rest in the window is the API server's own upkeep (the
            # `kubernetes` Service's endpoints, its identity Lease) and the operator's Lease renewals.
            others = {r: delta.pop(r) for r in list(delta) if r not in OPERATOR_WRITES}
            reconciled = metric(metrics_addr, "atlas_operator_reconciles_total") - reconciles
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()

    # The peer: the same StatefulSets, rendered by us, applied by kubectl into another namespace.
    listing = json.loads(api.get(sts_path))
    for sts in listing["items"]:
        meta = sts["metadata"]
        # A list's items carry no apiVersion and kind; a document to apply must.
        sts["apiVersion"], sts["kind"] = "apps/v1", "StatefulSet"
        sts["metadata"] = {"name": meta["name"], "namespace": peer, "labels": meta.get("labels", {}),
                           "annotations": meta.get("annotations", {})}
        sts.pop("status", None)
    listing = {"apiVersion": "v1", "kind": "List", "items": listing["items"]}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(listing, f)
        path = f.name
    peer_reads_before = api.reads()
    started = time.perf_counter()
    kubectl(kubeconfig, "apply", "--server-side", "-f", path)
    peer_seconds = time.perf_counter() - started
    peer_reads = diff(api.reads(), peer_reads_before)
    os.unlink(path)
    count = api.count(f"/apis/apps/v1/namespaces/{peer}/statefulsets")
    if count != args.servers:
        raise RuntimeError(f"the peer made {count} StatefulSets")
    print(f"peer: kubectl apply --server-side of the same {args.servers} StatefulSets in {peer_seconds:.1f} s")

    print()
    print(f"time until every StatefulSet exists: {ours_seconds:.1f} s (target < 60 s); "
          f"peer {peer_seconds:.1f} s; ratio ours/peer {ours_seconds / peer_seconds:.2f} "
          f"(we write 8 objects per server, the peer 1)")
    print(f"operator peak RSS (VmHWM): {peak:.1f} MiB (target <= 100 MiB); RSS after the resync {rss:.1f} MiB")
    print(f"idle resync ({int(reconciled)} reconciles in {resync_seconds:.0f} s): API writes to what the operator "
          f"manages {int(sum(delta.values()))} {delta or ''} (target 0); the operator's own count "
          f"{int(own_after - settled)}; other writes in the window {others or 0} (leases: the operator's "
          f"renewals every 2 s and the API server's own)")
    print(f"ours wrote {int(settled)} objects and statuses for {args.servers} servers "
          f"({settled / ours_seconds:.0f} writes/s); the peer {args.servers / peer_seconds:.0f} writes/s")
    first_reads = diff(reads_settled, reads_before)
    resync_reads = diff(reads_after, reads_settled)
    peer_total = sum(peer_reads.values())
    print(f"API reads until settled (the API server's count): ours {int(sum(first_reads.values()))} "
          f"({sum(first_reads.values()) / args.servers:.2f} per server) {first_reads}; the operator's own count "
          f"outside its caches {int(own_reads_settled)}")
    print(f"API reads during the idle resync: {int(sum(resync_reads.values()))} "
          f"({sum(resync_reads.values()) / args.servers:.2f} per server) {resync_reads or ''}; the operator's own "
          f"count {int(own_reads_after - own_reads_settled)}")
    print(f"peer (kubectl apply --server-side of {args.servers} StatefulSets): {int(peer_total)} API reads "
          f"({peer_total / args.servers:.2f} per server) {peer_reads or ''}")


def diff(after, before):
    """The non-zero differences of two counts by resource."""
    out = {r: int(after.get(r, 0) - before.get(r, 0)) for r in set(after) | set(before)}
    return {r: n for r, n in sorted(out.items()) if n}


if __name__ == "__main__":
    main()
