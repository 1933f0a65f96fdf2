//! A node bed leaves the machine as it found it: after a bed ran a pod and stopped, whether it was
//! stopped, its owner was killed (the reaper cleans up) or its owner and reaper were both killed (the
//! next bed cleans up), `ip netns`, `iptables-save`, `ip6tables-save`, the host's kernel settings
//! and its mount table are as before, and no link, route, nftables rule, mount, process or cgroup
//! names the bed. Beds of other test runs may
//! come and go meanwhile: the check looks at what this bed added, found by its name, directory and
//! addresses.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use atlas_testbed::command_output;

/// What the machine looks like, as far as a bed could change it.
#[derive(Debug, PartialEq)]
struct Snapshot {
    netns: String,
    iptables: String,
    ip6tables: String,
    nft: String,
    mounts: String,
    links: String,
    routes: String,
    processes: String,
    sysctls: BTreeMap<String, String>,
}

/// The host's kernel settings (`sysctl -a`) but counters, random values and the settings of single
/// network interfaces (links of other beds come and go).
fn sysctls() -> Result<BTreeMap<String, String>> {
    const COUNTERS: [&str; 10] = [
        "fs.dentry-state",
        "fs.file-nr",
        "fs.inode-nr",
        "fs.inode-state",
        "fs.aio-nr",
        "kernel.ns_last_pid",
        "kernel.pty.nr",
        "kernel.random.entropy_avail",
        "kernel.random.uuid",
        "net.netfilter.nf_conntrack_count",
    ];
    let per_interface = |key: &str| {
        ["net.ipv4.conf.", "net.ipv6.conf.", "net.ipv4.neigh.", "net.ipv6.neigh."].iter().any(|prefix| {
            key.strip_prefix(prefix).is_some_and(|rest| !rest.starts_with("all.") && !rest.starts_with("default."))
        })
    };
    Ok(command_output(Command::new("sysctl").arg("-a"))?
        .lines()
        .filter_map(|l| l.split_once(" = "))
        .filter(|(key, _)| !COUNTERS.contains(key) && !key.starts_with("fs.quota.") && !per_interface(key))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect())
}

/// The kernel settings whose values differ between `before` and `after` (a setting that appears
/// only once a module is loaded is not a change of the host's settings).
fn changed_sysctls(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    before
        .iter()
        .filter_map(|(key, old)| {
            let new = after.get(key)?;
            (new != old).then(|| format!("{key}: {old} -> {new}"))
        })
        .collect()
}

fn snapshot() -> Result<Snapshot> {
    let save = |program: &str| -> Result<String> {
        Ok(command_output(&mut Command::new(program))?
            .lines()
            // Comments carry the time of the dump.
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect())
    };
    let mut processes = String::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        if entry.file_name().to_string_lossy().parse::<u32>().is_ok()
            && let Ok(cmdline) = std::fs::read(entry.path().join("cmdline"))
        {
            processes += &format!(
                "{} {}\n",
                entry.file_name().to_string_lossy(),
                String::from_utf8_lossy(&cmdline).replace('\0', " ")
            );
        }
    }
    Ok(Snapshot {
        netns: command_output(Command::new("ip").arg("netns"))?,
        iptables: save("iptables-save")?,
        ip6tables: save("ip6tables-save")?,
        nft: command_output(Command::new("nft").args(["list", "ruleset"]))?,
        mounts: std::fs::read_to_string("/proc/self/mountinfo")?,
        links: command_output(Command::new("ip").args(["-o", "link"]))?,
        routes: command_output(Command::new("ip").args(["-4", "route", "show", "table", "all"]))?,
        processes,
        sysctls: sysctls()?,
    })
}

/// A bed's identity, from the line `atlas-testbed` prints when it is up.
#[derive(Debug, Clone)]
struct Bed {
    name: String,
    dir: PathBuf,
    slot: String,
}

impl Bed {
    /// The lines of `text` that name this bed (its host route for the Service range names its slot).
    fn named_in<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let dir = self.dir.display().to_string();
        let (link, pods) = (format!("10.213.{}.", self.slot), format!("10.214.{}.", self.slot));
        let service_route = format!("unreachable {} metric {} ", atlas_testbed::SERVICE_CIDR, self.slot);
        text.lines()
            .filter(|l| {
                l.split(|c: char| !(c.is_alphanumeric() || c == '-')).any(|w| w == self.name)
                    || names_path(l, &dir)
                    || l.contains(&link)
                    || l.contains(&pods)
                    || format!("{l} ").starts_with(&service_route)
            })
            .collect()
    }

    /// The bed's processes (PID and start time, so a reused PID is not taken for one): those in the
    /// PID namespace of its holder, in its cgroups (a pod's containers, in PID namespaces of their
    /// own) or naming it.
    fn processes(&self) -> Result<BTreeSet<(u32, u64)>> {
        let holder = self.holder()?;
        let holder_ns = std::fs::read_link(format!("/proc/{holder}/ns/pid"))?;
        let cgroup = format!("/{}", self.name);
        let mut found = BTreeSet::new();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let path = entry.path();
            let in_ns = std::fs::read_link(path.join("ns/pid")).is_ok_and(|ns| ns == holder_ns);
            let in_cgroup = std::fs::read_to_string(path.join("cgroup"))
                .is_ok_and(|c| c.lines().any(|l| l.contains(&format!("{cgroup}/")) || l.ends_with(&cgroup)));
            let cmdline =
                String::from_utf8_lossy(&std::fs::read(path.join("cmdline")).unwrap_or_default()).replace('\0', " ");
            if (in_ns || in_cgroup || !self.named_in(&cmdline).is_empty())
                && let Some(start) = start_time(pid)
            {
                found.insert((pid, start));
            }
        }
        Ok(found)
    }

    /// The PID of the holder of the node's namespaces: `pause DIR/node/`.
    fn holder(&self) -> Result<u32> {
        let argument = format!("{}/node/", self.dir.display());
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).collect();
            if args.len() == 2 && args[0].ends_with(b"/pause") && args[1] == argument.as_bytes() {
                return Ok(pid);
            }
        }
        bail!("no holder found for {}", self.name)
    }

    fn cgroups(&self) -> Vec<PathBuf> {
        std::fs::read_dir("/sys/fs/cgroup")
            .map(|d| d.flatten().map(|e| e.path().join(&self.name)).filter(|p| p.exists()).collect())
            .unwrap_or_default()
    }
}

/// Whether `line` names the path `dir` or a path under it (not `/tmp/atlas-bed-160` for `/tmp/atlas-bed-16`).
fn names_path(line: &str, dir: &str) -> bool {
    line.match_indices(dir).any(|(i, _)| {
        line[i + dir.len()..].chars().next().is_none_or(|c| !(c.is_alphanumeric() || matches!(c, '-' | '_' | '.')))
    })
}

/// A process's start time (clock ticks since boot), field 22 of `/proc/PID/stat`.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from its closing one.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// Checks that nothing of `bed` is left (none of the processes it had while it ran), and that what
/// no other bed touches is as in `before`.
fn assert_gone(bed: &Bed, before: &Snapshot, processes: &BTreeSet<(u32, u64)>) -> Result<()> {
    let alive: Vec<String> = processes
        .iter()
        .filter(|(pid, start)| start_time(*pid) == Some(*start))
        .map(|(pid, _)| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let fields: Vec<&str> =
                status.lines().filter(|l| ["Name:", "State:", "PPid:"].iter().any(|f| l.starts_with(f))).collect();
            format!("{pid} {} ({})", String::from_utf8_lossy(&cmdline).replace('\0', " "), fields.join(", "))
        })
        .collect();
    ensure!(alive.is_empty(), "{} left processes: {alive:?}", bed.name);
    let after = snapshot()?;
    assert_eq!(after.netns, before.netns, "ip netns changed");
    assert_eq!(after.iptables, before.iptables, "the host's iptables changed");
    assert_eq!(after.ip6tables, before.ip6tables, "the host's ip6tables changed");
    let changed = changed_sysctls(&before.sysctls, &after.sysctls);
    ensure!(changed.is_empty(), "the host's kernel settings changed: {changed:#?}");
    let lists = [
        ("link", &after.links),
        ("route", &after.routes),
        ("nftables rule", &after.nft),
        ("mount", &after.mounts),
        ("process", &after.processes),
    ];
    for (what, text) in lists {
        let left = bed.named_in(text);
        ensure!(left.is_empty(), "{} left a {what}: {left:#?}", bed.name);
    }
    ensure!(bed.cgroups().is_empty(), "{} left cgroups: {:?}", bed.name, bed.cgroups());
    ensure!(!bed.dir.exists(), "{} left its directory {}", bed.name, bed.dir.display());
    Ok(())
}

/// `atlas-testbed run --nodes` running a pod of our image until its stdin closes.
struct Run {
    child: Child,
    bed: Bed,
}

fn start_run() -> Result<Run> {
    start_run_in(&std::env::temp_dir())
}

/// [`start_run`] with `TMPDIR` set to `tmp` (where the bed's directory goes).
fn start_run_in(tmp: &Path) -> Result<Run> {
    let testbed = Path::new(env!("CARGO_BIN_EXE_atlas-runner")).with_file_name("atlas-testbed");
    ensure!(testbed.is_file(), "{} is not built: cargo build --workspace", testbed.display());
    // Under `atlas-testbed run --nodes` (make test), the run's image: no second build.
    let image_binary = std::env::var(atlas_testbed::env::IMAGE_BINARY).unwrap_or_else(|_| common::binary().to_owned());
    // The pod makes the node use what a bed can leave behind: a sandbox, mounts, cgroups, iptables.
    let script = r#"set -e
k() { "$ATLAS_TEST_BIN/kubectl" --kubeconfig "$ATLAS_TEST_NODE_KUBECONFIG" "$@"; }
k wait --for=create serviceaccount/default --timeout=60s >/dev/null
k run leak --image="$ATLAS_TEST_IMAGE" --image-pull-policy=Never --restart=Never --command -- sleep 3600 >/dev/null
k wait --for=condition=Ready pod/leak --timeout=120s >/dev/null
echo READY
read -r _ || true
"#;
    let mut child = Command::new(&testbed)
        .args(["run", "--nodes", "--no-cluster", "--no-s3", "--image-binary", &image_binary, "--", "sh", "-c", script])
        .env("TMPDIR", tmp)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut said = Vec::new();
    let bed = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(300))
            .with_context(|| format!("atlas-testbed printed no bed:\n{}", said.join("\n")))?;
        said.push(line.clone());
        // "atlas-testbed: node bed atlas-bed-S in DIR"
        if let Some(rest) = line.strip_prefix("atlas-testbed: node bed ") {
            let (name, dir) = rest.split_once(" in ").context("a bed line without a directory")?;
            let slot = name.rsplit('-').next().unwrap_or_default().to_owned();
            break Bed { name: name.to_owned(), dir: PathBuf::from(dir), slot };
        }
    };
    std::thread::spawn(move || for _ in rx {});
    let stdout = child.stdout.take().context("stdout")?;
    let mut ready = String::new();
    BufReader::new(stdout).read_line(&mut ready)?;
    ensure!(ready.trim() == "READY", "the run's pod did not become ready (atlas-testbed: {:?})", child.try_wait()?);
    Ok(Run { child, bed })
}

/// While a bed runs, it has what the check looks for, and nothing mounted on the host; returns its
/// processes.
fn assert_running(bed: &Bed) -> Result<BTreeSet<(u32, u64)>> {
    let now = snapshot()?;
    ensure!(!bed.named_in(&now.links).is_empty(), "no link of {} while it runs", bed.name);
    ensure!(!bed.named_in(&now.nft).is_empty(), "no nftables table of {} while it runs", bed.name);
    let routes = bed.named_in(&now.routes);
    ensure!(routes.len() >= 3, "not all the host routes of {} while it runs: {routes:#?}", bed.name);
    ensure!(!bed.named_in(&now.processes).is_empty(), "no process of {} while it runs", bed.name);
    ensure!(!bed.cgroups().is_empty(), "no cgroup of {} while it runs", bed.name);
    // The node mounts into its own mount namespace only.
    let mounts = bed.named_in(&now.mounts);
    ensure!(mounts.is_empty(), "{} mounted on the host: {mounts:#?}", bed.name);
    // The pod's `sleep 3600` names nothing of the bed; it is found by its cgroup.
    let processes = bed.processes()?;
    let pod = processes
        .iter()
        .any(|(pid, _)| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == b"sleep\x003600\x00"));
    ensure!(pod, "the pod's process is not among the processes of {}", bed.name);
    Ok(processes)
}

fn wait_gone(bed: &Bed, before: &Snapshot, processes: &BTreeSet<(u32, u64)>, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match assert_gone(bed, before, processes) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

#[test]
fn a_node_bed_leaves_nothing_when_stopped_killed_or_killed_with_its_reaper() -> Result<()> {
    let before = snapshot()?;

    // Stopped: the bed removes itself.
    let mut run = start_run()?;
    let processes = assert_running(&run.bed)?;
    drop(run.child.stdin.take());
    let status = run.child.wait()?;
    ensure!(status.success(), "atlas-testbed exited with {status}");
    // The node's processes were killed with it, but a process the kernel handed to the host's init
    // (its parent, outside the node's PID namespace, was killed first) stays a zombie, and the
    // holder waits in its exit, until that init reaps it: moments.
    wait_gone(&run.bed, &before, &processes, Duration::from_secs(30))?;

    // The owner is killed: its reaper (the only one: the bed's processes have none of their own)
    // removes the bed.
    let mut run = start_run()?;
    let processes = assert_running(&run.bed)?;
    run.child.kill()?;
    run.child.wait()?;
    drop(run.child.stdin.take());
    wait_gone(&run.bed, &before, &processes, Duration::from_secs(60))?;

    // The owner and its reaper are killed: the next bed removes the stale one when it starts, even
    // under another TMPDIR (slots, like the links and cgroups named after them, are machine-wide).
    let mut stale = start_run()?;
    let processes = assert_running(&stale.bed)?;
    let reaper = reaper_of(&stale.bed)?;
    Command::new("kill").args(["-KILL", &reaper.to_string()]).status()?;
    stale.child.kill()?;
    stale.child.wait()?;
    drop(stale.child.stdin.take());
    std::thread::sleep(Duration::from_secs(2));
    // Nobody removed anything: the holder (and with it the node and its pod) still runs.
    ensure!(stale.bed.dir.exists(), "the stale bed went away with nobody to remove it: the test proves nothing");
    let holder = stale.bed.holder().context("the stale bed's holder is gone: the test proves less")?;
    ensure!(processes.iter().any(|(pid, _)| *pid == holder), "the holder {holder} is not the one that ran");
    // Beside the usual one rather than under the checkout: the node's socket paths must fit in 104
    // bytes, and a checkout may be anywhere.
    let other_tmp = std::env::temp_dir().join(atlas_testbed::unique("other-tmpdir"));
    std::fs::create_dir_all(&other_tmp)?;
    let mut next = start_run_in(&other_tmp)?;
    ensure!(
        next.bed.dir.starts_with(&other_tmp),
        "the next bed is not under the other TMPDIR: {}",
        next.bed.dir.display()
    );
    wait_gone(&stale.bed, &before, &processes, Duration::from_secs(30))?;
    let next_processes = assert_running(&next.bed)?;
    drop(next.child.stdin.take());
    next.child.wait()?;
    wait_gone(&next.bed, &before, &next_processes, Duration::from_secs(30))?;
    std::fs::remove_dir(&other_tmp)?;
    Ok(())
}

/// The PID of the bed's reaper: the `flock` waiting on its slot's claim.
fn reaper_of(bed: &Bed) -> Result<u32> {
    let lock = format!("{}/{}.lock", atlas_testbed::node::CLAIMS_DIR, bed.slot);
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.first().is_some_and(|a| a.ends_with("flock")) && args.get(1) == Some(&lock) {
            return Ok(pid);
        }
    }
    bail!("no reaper found for {}", bed.name)
}
