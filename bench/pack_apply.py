#!/usr/bin/env python3
"""Cold pack apply and a small update, beside `curl | zstd -d | tar -x` of the same blob, in one run.

Generates a pack of about --size-mib MiB in --files files (jar-like incompressible files and
config-like text), builds it with `atlas-runner pack build`, serves it from loopback HTTP, and per
round measures:

  * cold: `atlas-runner pack apply` (every digest verified, data fsynced) into an empty data dir, and
    `curl -s URL | zstd -d | tar -x` into another empty dir (the peer; it verifies nothing and
    leaves its data in the page cache), taking turns going first;
  * update: a second pack version where 5 of the jars changed, applied over the first, reporting wall
    time, the files staging wrote, and the swap: from the log line "pack staged and verified;
    swapping it in" (the journal is about to be written) to "pack swapped in" (state.json replaced),
    the part during which a server must be stopped.

Peak RSS comes from /usr/bin/time. Prints medians and ratios. Issue 3's targets: cold apply at most
1.15x the pipeline, peak RSS at most 64 MiB, the update's swap at most 200 ms.

    bench/pack_apply.py [--size-mib 1024] [--files 20000] [--rounds 3] [--warmup 1] [--workdir DIR]

Keep --workdir off the repo: it holds the generated data (about 3 + 2 x (--rounds + --warmup) times --size-mib).
On ext4 without a journal, file creation skips inodes deleted in the last minutes (fs/ext4/ialloc.c
`recently_deleted`), which slows both sides unevenly: wait a few minutes after deleting a large
tree (such as an earlier run's work dir) before measuring.
"""

import argparse
import functools
import hashlib
import json
import http.server
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generate(root, size_mib, files, jars_every=10):
    """Files of three kinds: 1 in `jars_every` a large incompressible jar, the rest small configs."""
    rng = random.Random(42)
    jars = max(1, files // jars_every)
    configs = files - jars
    jar_bytes = int(size_mib * 1024 * 1024 * 0.95) // jars
    cfg_bytes = max(64, int(size_mib * 1024 * 1024 * 0.05) // max(1, configs))
    names = []
    for i in range(jars):
        path = os.path.join(root, "mods", f"mod-{i:05d}.jar")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(rng.randbytes(jar_bytes))
        names.append(path)
    words = [b"enabled", b"true", b"false", b"distance", b"spawn", b"limit", b"= 16\n", b"# comment\n"]
    for i in range(configs):
        path = os.path.join(root, "config", f"group-{i % 200:03d}", f"cfg-{i:05d}.toml")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            out = bytearray()
            while len(out) < cfg_bytes:
                out += rng.choice(words) + b" "
            f.write(bytes(out[:cfg_bytes]))
    return [n for n in names]


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


log_stdout = []


def timed(cmd, **kw):
    """Wall time and peak RSS (KiB) of a command, via /usr/bin/time."""
    start = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M"] + cmd, check=True, stderr=subprocess.PIPE, text=True, **kw)
    wall = time.perf_counter() - start
    if p.stdout:
        log_stdout.append(p.stdout.strip().splitlines()[-1])
    rss = int(re.findall(r"MAXRSS (\d+)", p.stderr)[-1])
    return wall, rss, p.stderr


def serve(directory):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1,
                    help="rounds run first and not counted: the disk is still absorbing the generated data")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    run(["cargo", "build", "--release", "--locked", "--bin", "atlas-runner"], cwd=REPO)
    binary = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")), "release", "atlas-runner")
    need = (3 + 2 * (args.rounds + args.warmup)) * args.size_mib * 1024 * 1024
    free = shutil.disk_usage(args.workdir or tempfile.gettempdir()).free
    if free < need * 1.1:
        sys.exit(f"pack_apply.py: {need / 2**30:.1f} GiB needed in the work dir, {free / 2**30:.1f} GiB free; "
                 "pass --workdir on a larger filesystem or fewer --rounds")
    work = tempfile.mkdtemp(prefix="atlas-pack-bench-", dir=args.workdir)
    try:
        src = os.path.join(work, "src")
        jars = generate(src, args.size_mib, args.files)
        blobs = os.path.join(work, "blobs")
        os.makedirs(blobs)
        run([binary, "pack", "build", src, "-o", os.path.join(blobs, "v1.tar.zst"), "--version", "1.0.0"], stdout=subprocess.DEVNULL)
        rng = random.Random(7)
        for path in rng.sample(jars, min(5, len(jars))):
            with open(path, "r+b") as f:
                f.write(rng.randbytes(4096))
        run([binary, "pack", "build", src, "-o", os.path.join(blobs, "v2.tar.zst"), "--version", "2.0.0"], stdout=subprocess.DEVNULL)
        server = serve(blobs)
        base = f"http://127.0.0.1:{server.server_address[1]}"

        def spec(version):
            blob = os.path.join(blobs, f"v{version}.tar.zst")
            digest = hashlib.sha256(open(blob, "rb").read()).hexdigest()
            path = os.path.join(work, f"spec{version}.yaml")
            with open(path, "w") as f:
                f.write(f"eula: true\nserver: {{type: vanilla}}\npack:\n  source:\n    url: {{url: \"{base}/v{version}.tar.zst\", sha256: {digest}}}\n")
            return path

        spec1, spec2 = spec(1), spec(2)
        results = []
        for n in range(args.warmup + args.rounds):
            data = os.path.join(work, f"data{n}")
            peer = os.path.join(work, f"peer{n}")
            os.makedirs(peer)
            # Each measurement starts with nothing dirty in the page cache, so neither side pays for
            # the other's writeback. Nothing is deleted until the end: on ext4 without a journal,
            # creating files soon after deleting thousands scans past the recently deleted inodes,
            # which would tax whichever side runs after a deletion.
            # The two sides take turns going first: the disk of a VM drifts between a fast and a
            # slow state, and whichever runs second would otherwise always meet the later state.
            def ours_cold():
                run(["sync"])
                return timed([binary, "pack", "apply", "--spec", spec1, "--data", data], stdout=subprocess.DEVNULL)

            def peer_cold():
                run(["sync"])
                return timed(["sh", "-c", f"curl -s {base}/v1.tar.zst | zstd -d -q | tar -x -C {peer}"])

            if n % 2 == 0:
                ours_wall, ours_rss, _ = ours_cold()
                peer_wall, _, _ = peer_cold()
            else:
                peer_wall, _, _ = peer_cold()
                ours_wall, ours_rss, _ = ours_cold()
            run(["sync"])
            env = dict(os.environ, RUST_LOG="info")
            upd_wall, upd_rss, log = timed([binary, "pack", "apply", "--spec", spec2, "--data", data, "--json"], stdout=subprocess.PIPE, env=env)
            installed = json.loads(log_stdout.pop()).get("installed") if log_stdout else None
            # The swap: from "swapping it in" (journal about to be written) to "pack swapped in" (commit).
            stamps = {}
            for line in log.splitlines():
                m = re.match(r"(\S+Z)\s+INFO .*?(swapping it in|pack swapped in)", line)
                if m:
                    stamps[m.group(2)] = m.group(1)
            swap_ms = None
            if len(stamps) == 2:
                from datetime import datetime
                parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))
                swap_ms = (parse(stamps["pack swapped in"]) - parse(stamps["swapping it in"])).total_seconds() * 1000
            else:
                print(f"round {n}: swap log lines not found:\n{log}", file=sys.stderr)
            if n < args.warmup:
                print(f"warm-up round {n}: ours {ours_wall:.2f} s, pipeline {peer_wall:.2f} s (not counted)", file=sys.stderr)
                continue
            results.append({"ours": ours_wall, "ours_rss_mib": ours_rss / 1024, "peer": peer_wall,
                            "update": upd_wall, "update_rss_mib": upd_rss / 1024, "swap_ms": swap_ms,
                            "update_installed": installed})
            print(f"round {n}: {results[-1]}", file=sys.stderr)
        server.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = lambda k: statistics.median(r[k] for r in results if r[k] is not None)
    print(f"pack of {args.size_mib} MiB in {args.files} files, medians of {args.rounds} rounds after {args.warmup} warm-up")
    print(f"cold apply      {med('ours'):8.2f} s   curl|zstd|tar {med('peer'):8.2f} s   ratio {med('ours') / med('peer'):.2f}")
    ratios = [r["ours"] / r["peer"] for r in results]
    print(f"per-round ratios {', '.join(f'{x:.2f}' for x in ratios)}   median {statistics.median(ratios):.2f}"
          "   (each round's two runs are back to back: the steadier figure)")
    print(f"peak RSS        {max(r['ours_rss_mib'] for r in results):8.1f} MiB (cold), {max(r['update_rss_mib'] for r in results):.1f} MiB (update)")
    print(f"update (5 jars) {med('update'):8.2f} s   swap {med('swap_ms'):.1f} ms   "
          f"files written {max(r['update_installed'] or 0 for r in results)}")


if __name__ == "__main__":
    main()
