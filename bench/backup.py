#!/usr/bin/env python3
"""A world backup to SeaweedFS S3, beside restic and `tar | zstd -T0 | rclone rcat`, in one run.

Generates a world of about --size-mib MiB in --files region-like files (a 8 KiB header of chunk offsets
and timestamps, then chunks of incompressible deflate-like bytes padded with zeros to 4 KiB sectors, as
Anvil region files are: zstd takes about a quarter off), then per round, in a rotating order so no tool
always reads a warm or a cold page cache:

  * ours: `atlas-runner backup create --spec S --data D` with no server running (an offline capture:
    copy into the mirror, tar + zstd, multipart upload, manifest), from a cold mirror every round;
  * restic: `restic backup` of the world into a fresh repository (compression auto) on the same S3;
  * pipeline: `tar -c world | zstd -T0 -3 | rclone rcat s3:...` (`env -u AWS_CA_BUNDLE`), verifying nothing.

Then the save-off window: `atlas-runner run` supervising the fake test server (tests/fixtures, built with
javac) on that world, and `atlas-runner backup create` through the runner (RCON save-off, save-all flush,
capture, save-on) --rounds times: the first from a cold mirror, the rest warm. The window is the manifest's
saveOffMs.

Wall time is measured here; peak RSS comes from /usr/bin/time. Prints medians and ratios. Issue 5's
targets: wall time no worse than the faster peer, peak RSS at most 128 MiB, the save-off window at most 3 s.

    bench/backup.py [--size-mib 2048] [--files 4000] [--rounds 3] [--workdir DIR]

Needs restic, rclone, zstd, GNU time and a JDK (Debian: apt-get install restic rclone zstd time). S3 is
SeaweedFS from the test bed: run it with the bed's variables set, or let it start one
(`target/debug/atlas-testbed run -- ...`, which `make testbed` and a debug build provide). Keep --workdir
off the repo: it holds the generated world twice over.
"""

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from procs import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
SECTOR = 4096


def region_file(rng, path, chunks):
    """An Anvil-like region file: offsets + timestamps header, then `chunks` sector-padded chunks."""
    header = bytearray(2 * SECTOR)
    body = bytearray()
    sector = 2
    now = int(time.time())
    for slot in rng.sample(range(1024), chunks):
        length = rng.randint(1200, 12000)
        payload = length.to_bytes(4, "big") + b"\x02" + rng.randbytes(length - 1)
        sectors = (len(payload) + SECTOR - 1) // SECTOR
        header[slot * 4:slot * 4 + 4] = ((sector << 8) | sectors).to_bytes(4, "big")
        header[SECTOR + slot * 4:SECTOR + slot * 4 + 4] = (now - rng.randint(0, 10**6)).to_bytes(4, "big")
        body += payload + bytes(sectors * SECTOR - len(payload))
        sector += sectors
    with open(path, "wb") as f:
        f.write(header)
        f.write(body)
    return len(header) + len(body)


def generate(world, size_mib, files):
    rng = random.Random(42)
    target = size_mib * 1024 * 1024
    # About 8.6 KiB per chunk on average (2.1 sectors); chunk counts vary per file like a real world's.
    mean_chunks = max(1, int((target / files - 2 * SECTOR) / 8800))
    total = 0
    dims = [("region", 0.8), ("DIM-1/region", 0.12), ("DIM1/region", 0.08)]
    n = 0
    for dim, share in dims:
        os.makedirs(os.path.join(world, dim), exist_ok=True)
        count = files - n if dim == dims[-1][0] else int(files * share)
        for i in range(count):
            chunks = min(1024, max(1, int(rng.expovariate(1 / mean_chunks))))
            x, z = i % 64 - 32, i // 64 - 32
            total += region_file(rng, os.path.join(world, dim, f"r.{x}.{z}.mca"), chunks)
        n += count
    os.makedirs(os.path.join(world, "playerdata"), exist_ok=True)
    with open(os.path.join(world, "level.dat"), "wb") as f:
        f.write(rng.randbytes(2048))
    return total


def timed(cmd, env=None):
    """Wall seconds and peak RSS (MiB) of a command, via GNU time."""
    start = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M"] + cmd, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - start
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    rss = int(re.findall(r"MAXRSS (\d+)", p.stderr)[-1]) / 1024
    return wall, rss


def build_fake_server(work):
    classes = os.path.join(work, "classes")
    os.makedirs(classes, exist_ok=True)
    subprocess.run(["javac", "--release", "17", "-d", classes, os.path.join(REPO, "tests/fixtures/FakeServer.java")],
                   check=True)
    manifest = os.path.join(work, "manifest.txt")
    with open(manifest, "w") as f:
        f.write("Main-Class: FakeServer\n")
    jar = os.path.join(work, "fake-server.jar")
    subprocess.run(["jar", "--create", "--file", jar, "--manifest", manifest, "-C", classes, "."], check=True)
    return jar


def write_spec(path, endpoint, bucket, prefix, server=None):
    text = "apiVersion: atlas.dev/v1alpha1\nkind: MinecraftServer\nmetadata: {name: bench}\nspec:\n  eula: true\n"
    if server:
        text += ("  server: {type: custom, version: \"1.21.4\", jar: fake-server.jar}\n"
                 "  jvm: {heap: 256M, flags: none}\n"
                 f"  rcon: {{port: {server['rcon']}}}\n"
                 f"  properties: {{server-port: \"{server['game']}\"}}\n")
    else:
        text += "  server: {type: vanilla}\n"
    text += (f"  backup:\n    store:\n      s3: {{bucket: {bucket}, prefix: {prefix}, endpoint: \"{endpoint}\", "
             "region: us-east-1, pathStyle: true}\n")
    with open(path, "w") as f:
        f.write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--files", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    missing = [t for t in ("restic", "rclone", "zstd", "javac", "jar") if not shutil.which(t)]
    if missing or not os.path.exists("/usr/bin/time"):
        sys.exit(f"missing {' '.join(missing) or '/usr/bin/time'}: apt-get install restic rclone zstd time (and a JDK)")
    if "ATLAS_TEST_S3_ENDPOINT" not in os.environ:
        subprocess.run(["cargo", "build", "--locked", "-p", "atlas-testbed"], cwd=REPO, check=True)
        testbed = os.path.join(TARGET, "debug", "atlas-testbed")
        os.execv(testbed, [testbed, "run", "--", sys.executable] + sys.argv)
    endpoint = os.environ["ATLAS_TEST_S3_ENDPOINT"]
    s3_env = dict(os.environ, AWS_ACCESS_KEY_ID=os.environ["ATLAS_TEST_S3_ACCESS_KEY"],
                  AWS_SECRET_ACCESS_KEY=os.environ["ATLAS_TEST_S3_SECRET_KEY"], RESTIC_PASSWORD="bench")
    s3_env.pop("AWS_CA_BUNDLE", None)  # rclone refuses an empty or foreign CA bundle; the issue asks for env -u
    s3_env.update({"RCLONE_CONFIG_BED_TYPE": "s3", "RCLONE_CONFIG_BED_PROVIDER": "Other",
                   "RCLONE_CONFIG_BED_ENDPOINT": endpoint, "RCLONE_CONFIG_BED_ENV_AUTH": "true",
                   "RCLONE_CONFIG_BED_REGION": "us-east-1", "RCLONE_CONFIG_BED_FORCE_PATH_STYLE": "true"})

    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "atlas-runner"], cwd=REPO, check=True)
    binary = os.path.join(TARGET, "release", "atlas-runner")
    work = tempfile.mkdtemp(prefix="atlas-backup-bench-", dir=args.workdir)
    runner = None
    try:
        data = os.path.join(work, "data")
        world = os.path.join(data, "world")
        raw = generate(world, args.size_mib, args.files)
        print(f"world: {raw / 2**20:.0f} MiB in {args.files} region files", file=sys.stderr)
        bucket = f"bench-{int(time.time())}"
        subprocess.run(["rclone", "mkdir", f"bed:{bucket}"], check=True, env=s3_env)
        spec = os.path.join(work, "server.yaml")

        tools = {
            "ours": lambda n: [binary, "backup", "create", "--spec", spec, "--data", data],
            "restic": lambda n: ["restic", "--quiet", "--cache-dir", os.path.join(work, "restic-cache"),
                                 "-r", f"s3:{endpoint}/{bucket}/restic-{n}", "backup", world],
            "pipeline": lambda n: ["sh", "-c", f"tar -C {data} -cf - world | zstd -T0 -3 -q | "
                                   f"rclone rcat bed:{bucket}/pipeline-{n}/world.tar.zst"],
        }
        results = {name: [] for name in tools}
        for n in range(args.rounds):
            write_spec(spec, endpoint, bucket, f"ours-{n}/")
            shutil.rmtree(os.path.join(data, ".atlas"), ignore_errors=True)  # a cold mirror every round
            subprocess.run(["restic", "--quiet", "-r", f"s3:{endpoint}/{bucket}/restic-{n}", "init",
                            "--repository-version", "2"], check=True, env=s3_env, stdout=subprocess.DEVNULL)
            order = list(tools)[n % 3:] + list(tools)[:n % 3]
            for name in order:
                wall, rss = timed(tools[name](n), env=s3_env)
                results[name].append((wall, rss))
                print(f"round {n} {name:8s} {wall:7.2f} s  {rss:6.1f} MiB", file=sys.stderr)

        # The save-off window, with the fake server running on the world under the runner.
        shutil.copy(build_fake_server(work), os.path.join(data, "fake-server.jar"))
        shutil.rmtree(os.path.join(data, ".atlas"), ignore_errors=True)
        server = {"rcon": free_port(), "game": free_port()}
        write_spec(spec, endpoint, bucket, "window/", server)
        runner = subprocess.Popen([binary, "run", "--spec", spec, "--data", data, "--metrics-addr",
                                   f"127.0.0.1:{free_port()}"], env=s3_env, stdout=subprocess.DEVNULL,
                                  stderr=open(os.path.join(work, "runner.log"), "w"))
        deadline = time.time() + 120
        while True:
            p = subprocess.run([binary, "status", "--data", data, "--json"], capture_output=True, text=True)
            if p.returncode == 0 and json.loads(p.stdout).get("phase") == "Running":
                break
            if time.time() > deadline or runner.poll() is not None:
                sys.exit(f"the runner did not reach Running; see {work}/runner.log")
            time.sleep(0.5)
        windows = []
        for n in range(args.rounds):
            timed([binary, "backup", "create", "--spec", spec, "--data", data], env=s3_env)
            listed = subprocess.run([binary, "backup", "list", "--spec", spec, "--data", data, "--json"],
                                    capture_output=True, text=True, env=s3_env, check=True)
            newest = max(json.loads(listed.stdout), key=lambda m: m["time"])
            windows.append(newest["saveOffMs"])
            print(f"window {n} ({'cold' if n == 0 else 'warm'} mirror): {newest['saveOffMs']} ms", file=sys.stderr)
    finally:
        if runner is not None:
            runner.terminate()
            runner.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)

    med = {name: statistics.median(w for w, _ in rs) for name, rs in results.items()}
    rss = {name: max(r for _, r in rs) for name, rs in results.items()}
    faster = min(("restic", "pipeline"), key=lambda k: med[k])
    print(f"world of {raw / 2**20:.0f} MiB in {args.files} files to SeaweedFS S3, medians of {args.rounds} rounds")
    for name in tools:
        print(f"{name:9s} {med[name]:8.2f} s   peak RSS {rss[name]:7.1f} MiB")
    print(f"ratio ours/{faster} (the faster peer) {med['ours'] / med[faster]:.2f}")
    print(f"save-off window: cold mirror {windows[0]} ms, warm median {statistics.median(windows[1:] or windows)} ms")


if __name__ == "__main__":
    main()
