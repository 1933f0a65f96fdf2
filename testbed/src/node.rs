//! A node that runs pods: containerd, kubelet, kube-proxy, controller-manager, scheduler and CoreDNS
//! in a network, mount and PID namespace of the bed's own, beside an API server on the host.
//!
//! Nothing the node sends can leave the machine: its network namespace holds only loopback, the CNI
//! bridge and one end of a veth pair whose other end carries the bed's host address, with no default
//! route (IPv4; IPv6 is off), so a packet from a pod or a node component reaches the bed's own
//! addresses or nothing. Everything the node adds to the machine goes with it: iptables chains and
//! links live in its network namespace, mounts in its private mount namespace, and every process
//! (containers included) in a PID namespace whose init's death kills them all; the namespaces are
//! held by one process and are never named, so they go with it. What is left, the bed's cgroups, its
//! host link should anything still hold the namespace, and its directory, is removed by a teardown
//! that runs at stop, in a reaper when the owner is killed, and from the next bed when both were.
//!
//! Several beds share a machine: each claims a slot `S` by locking the machine-wide file
//! `/run/atlas-bed/S.lock` for the owner's lifetime (whatever `TMPDIR` is: the names a slot stands
//! for are machine-wide), and every name it adds derives from the slot: its directory
//! `$TMPDIR/atlas-bed-S`, the host link and the cgroup `atlas-bed-S`, the addresses `10.213.S.0/30`
//! (link) and `10.214.S.0/24` (pods). The claim file holds the bed's directory, so whoever takes a
//! slot whose owner and reaper are both gone finds what to remove.

use std::fs::File;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{
    ApiOptions, ClusterProcesses, Processes, SERVICE_CIDR, bin, bin_dir, command_output, image, start_cluster_with,
    wait_until,
};

/// The node's name (one node per bed, and one API server per bed).
pub const NODE_NAME: &str = "atlas-bed";
/// The cluster DNS Service's address (in [`crate::SERVICE_CIDR`]).
pub const DNS_SERVICE_IP: &str = "10.0.0.10";
/// The StorageClass of the bed's local PersistentVolumes (also the default class).
pub const STORAGE_CLASS: &str = "manual";
const SLOTS: std::ops::RangeInclusive<u16> = 1..=250;
const PREFIX: &str = "atlas-bed-";
/// The hosts file the bed's CoreDNS reads (in the node's directory), before the cluster's names.
pub const HOSTS_FILE: &str = "hosts";
/// The node's containerd socket (in the node's directory).
pub const CONTAINERD_SOCKET: &str = "containerd/containerd.sock";
/// Where slots are claimed: one lock file per slot, machine-wide.
pub const CLAIMS_DIR: &str = "/run/atlas-bed";
/// The longest unix socket path the node makes in the bed's directory (the kubelet's pod-resources
/// socket; containerd's `containerd.sock.ttrpc` is 3 bytes shorter).
const LONGEST_SOCKET: &str = "node/kubelet/pod-resources/kubelet.sock";
/// The longest socket path containerd takes (the portable size of `sun_path`; Linux's is 108).
const SOCKET_PATH_MAX: usize = 104;

/// What [`start_node_cluster`] builds.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The `atlas-runner` binary our image is built around (the release binary for `make test`).
    pub image_binary: PathBuf,
    /// How many local PersistentVolumes the bed offers.
    pub volumes: usize,
}

// ---------------------------------------------------------------------------------------------------
// The bed: a slot, the holder of the node's namespaces, a veth pair, and the teardown that undoes them

/// A claimed slot with the node's namespaces and network; removed, with everything else the bed
/// added, on drop.
#[derive(Debug)]
pub struct BedNetwork {
    /// The slot number `S`.
    pub slot: u16,
    /// The bed's directory (`$TMPDIR/atlas-bed-S`).
    pub dir: PathBuf,
    /// The bed's name: the host end of the veth pair and the cgroup.
    pub name: String,
    /// The bed's address on the host side: the API server and S3 listen here for the pods.
    pub host_ip: Ipv4Addr,
    /// The node's address (its InternalIP), the other end of the link.
    pub node_ip: Ipv4Addr,
    /// The pods' range, behind the node's bridge.
    pub pod_cidr: String,
    /// The host PID of the holder: the init of the node's PID namespace, in its network and mount
    /// namespaces, which exist as long as it does.
    pub holder: u32,
    // The holder and the node's components.
    node: Processes,
    // The slot's claim, locked for the bed's lifetime: a slot whose lock can be taken has lost its
    // owner (and its reaper, which takes the lock to tear the bed down).
    claim: File,
    reaper: Option<Child>,
}

impl BedNetwork {
    /// Cleans up stale beds, claims a free slot and makes the node's namespaces and network.
    pub fn claim() -> Result<Self> {
        check_socket_paths(&std::env::temp_dir())?;
        check_host()?;
        clean_stale_beds();
        let routes = command_output(Command::new("ip").args(["-4", "route", "show", "table", "all"]))?;
        if let Some(route) = service_range_conflict(&routes) {
            bail!(
                "the host routes part of the bed's Service range {SERVICE_CIDR} ({route}): a node bed cannot \
                 keep its Service addresses off the machine here"
            );
        }
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let seed = (std::process::id() ^ nanos) as u16;
        let count = SLOTS.end() - SLOTS.start() + 1;
        for i in 0..count {
            let slot = SLOTS.start() + (seed.wrapping_add(i) % count);
            if let Some(claimed) = Self::try_claim(slot)? {
                return Ok(claimed);
            }
        }
        bail!(
            "no free test-bed slot among {SLOTS:?} (claims in {CLAIMS_DIR}): too many beds on this machine; \
             stop some, or remove stale links and directories named atlas-bed-S"
        )
    }

    fn try_claim(slot: u16) -> Result<Option<Self>> {
        let name = format!("{PREFIX}{slot}");
        let claim_path = claim_path(slot);
        let claim = open_claim(&claim_path)?;
        if claim.try_lock().is_err() {
            return Ok(None);
        }
        // The slot is ours: a bed that had it is gone with its reaper; remove what it left.
        remove_claimed_bed(&claim, &claim_path, &name);
        let dir = std::env::temp_dir().join(&name);
        let (link_net, pod_net) = (format!("10.213.{slot}."), format!("10.214.{slot}."));
        let routes = command_output(Command::new("ip").args(["-4", "route", "show", "table", "all"]))?;
        let slot_text = slot.to_string();
        let service_route = |l: &str| l.split_whitespace().eq(["unreachable", SERVICE_CIDR, "metric", &slot_text]);
        // Left by something that claims no slot here (a bed of an older atlas-testbed): not ours to remove.
        if dir.exists()
            || link_exists(&name)
            || routes.contains(&link_net)
            || routes.contains(&pod_net)
            || routes.lines().any(service_route)
        {
            return Ok(None);
        }
        std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
        // From here on the claim names the directory, so whoever takes the slot after a crash finds it.
        claim.set_len(0).with_context(|| format!("write {}", claim_path.display()))?;
        (&claim)
            .write_all(dir.display().to_string().as_bytes())
            .with_context(|| format!("write {}", claim_path.display()))?;
        let reaper = start_reaper(&dir, &name, &claim_path)?;
        // Its processes have no reapers of their own: the bed's reaper (above) kills them all.
        let node = match Processes::new_in(dir.join("node")).map(Processes::reaped_by_bed) {
            Ok(node) => node,
            Err(e) => {
                let _ = teardown(&dir, &name, &claim_path);
                return Err(e);
            }
        };
        let mut bed = Self {
            slot,
            host_ip: Ipv4Addr::new(10, 213, slot as u8, 1),
            node_ip: Ipv4Addr::new(10, 213, slot as u8, 2),
            pod_cidr: format!("10.214.{slot}.0/24"),
            dir,
            name,
            holder: 0,
            node,
            claim,
            reaper: Some(reaper),
        };
        // From here on, dropping `bed` undoes whatever part was made.
        bed.holder = start_holder(&mut bed.node)?;
        bed.create().with_context(|| format!("make the network of the bed {}", bed.name))?;
        Ok(Some(bed))
    }

    fn create(&self) -> Result<()> {
        let (name, host, node) = (&self.name, self.host_ip.to_string(), self.node_ip.to_string());
        let holder = self.holder.to_string();
        // The node's end is created inside the namespace, so its name there is private.
        run(Command::new("ip").args(["link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", &holder]))?;
        run(Command::new("ip").args(["addr", "add", &format!("{host}/30"), "dev", name]))?;
        // The host never forwards for the bed (not even when the host forwards between its own
        // links), and the link carries no IPv6; both settings go with the link.
        run(Command::new("sysctl").args([
            "-q",
            "-w",
            &format!("net.ipv4.conf.{name}.forwarding=0"),
            &format!("net.ipv6.conf.{name}.disable_ipv6=1"),
        ]))?;
        // What the node may reach on the host: the ports opened to it (the API server's, the pods'
        // S3), not every service bound to a wildcard address. A table of the bed's own, removed
        // by the teardown; stateless, so the host's connection tracking is not switched on.
        let mut nft = Command::new("nft");
        nft.args(["-f", "-"]);
        run_with_input(&mut nft, &nft_table(name))?;
        run(Command::new("ip").args(["link", "set", name, "up"]))?;
        // Replies to pods go back through the link (the route leaves with it).
        run(Command::new("ip").args(["route", "add", &self.pod_cidr, "via", &node, "dev", name]))?;
        // Nothing on the host reaches a Service address (they exist only in the node's namespace):
        // one that tried would otherwise take the host's default route off the machine. One route
        // per bed (its metric is the slot), so beds come and go independently.
        run(Command::new("ip").args(["route", "add", "unreachable", SERVICE_CIDR, "metric", &self.slot.to_string()]))?;
        run(self.in_netns("sysctl").args([
            "-q",
            "-w",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
            "net.ipv4.ip_forward=1",
            "net.bridge.bridge-nf-call-iptables=1",
        ]))?;
        run(self.in_netns("ip").args(["addr", "add", &format!("{node}/30"), "dev", "eth0"]))?;
        run(self.in_netns("ip").args(["link", "set", "eth0", "up"]))?;
        run(self.in_netns("ip").args(["link", "set", "lo", "up"]))?;
        // kubelet's cgroupRoot must exist in every hierarchy; a v1 cpuset needs its cpus and mems.
        for hierarchy in cgroup_hierarchies() {
            let path = hierarchy.join(name);
            std::fs::create_dir_all(&path).with_context(|| format!("create cgroup {}", path.display()))?;
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(parent) = std::fs::read_to_string(hierarchy.join(file)) {
                    std::fs::write(path.join(file), parent.trim())
                        .with_context(|| format!("write {}", path.join(file).display()))?;
                }
            }
        }
        Ok(())
    }

    /// Lets the node and its pods open TCP connections to `port` on the bed's host address (and on
    /// any other host address the link would reach).
    pub fn open_to_pods(&self, port: u16) -> Result<()> {
        open_port(&self.name, port)
    }

    /// Makes the bed's cluster DNS answer `names` with `address` (see [`point_names`]).
    pub fn point_names(&self, names: &[&str], address: Ipv4Addr) -> Result<()> {
        point_names(&self.node_dir().join(HOSTS_FILE), names, address)
    }

    /// `program` run in the node's network namespace (and nothing else of it).
    pub fn in_netns(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path().display())).arg("--").arg(program);
        cmd
    }

    /// The node's network namespace as a path (`nsenter --net=PATH`).
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.holder))
    }

    /// Starts `program` inside the node's namespaces with a clean environment.
    pub fn spawn_in<I, S>(&mut self, name: &str, program: &Path, args: I) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut full: Vec<std::ffi::OsString> = vec![
            "-i".into(),
            format!("PATH={}:{NODE_PATH}", bin_dir().display()).into(),
            "HOME=/root".into(),
            "nsenter".into(),
            "-t".into(),
            self.holder.to_string().into(),
            "--net".into(),
            "--mount".into(),
            "--pid".into(),
            "--".into(),
            program.into(),
        ];
        full.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self.node.spawn(name, Path::new("env"), full)
    }

    /// Fails with the tail of its log if the node's process `name` has exited.
    pub fn check_alive(&mut self, name: &str) -> Result<()> {
        self.node.check_alive(name)
    }

    /// The last `lines` lines of the log of the node's process `name`.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        self.node.log_tail(name, lines)
    }

    /// The node's directory (configuration, containerd's root, kubelet's root, volumes, logs).
    pub fn node_dir(&self) -> &Path {
        self.node.dir()
    }

    /// Removes everything the bed added: its processes, cgroups, links and directory.
    pub fn teardown(&mut self) {
        let _ = teardown(&self.dir, &self.name, &claim_path(self.slot));
        self.node.stop();
        if let Some(mut reaper) = self.reaper.take() {
            let _ = reaper.kill();
            let _ = reaper.wait();
        }
    }
}

impl Drop for BedNetwork {
    fn drop(&mut self) {
        // The claim is released only after the teardown, with the struct.
        self.teardown();
        let _ = self.claim.unlock();
    }
}

fn claim_path(slot: u16) -> PathBuf {
    Path::new(CLAIMS_DIR).join(format!("{slot}.lock"))
}

fn open_claim(path: &Path) -> Result<File> {
    std::fs::create_dir_all(CLAIMS_DIR).with_context(|| format!("create {CLAIMS_DIR} (the beds' slot claims)"))?;
    // Never removed (a lock file removed while another process waits on it would split the slot
    // in two); one small file per slot.
    File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("open {}", path.display()))
}

/// With the slot's claim locked: tears down the bed the claim names, if any (its owner and reaper
/// are gone, or the lock could not have been taken).
fn remove_claimed_bed(claim: &File, path: &Path, name: &str) {
    let previous = std::fs::read_to_string(path).unwrap_or_default();
    let previous = previous.trim();
    if previous.is_empty() {
        return;
    }
    eprintln!("atlas-testbed: removing the stale bed {name} in {previous} (its owner and reaper are gone)");
    let _ = teardown(Path::new(previous), name, path);
    let _ = claim.set_len(0);
}

/// A reaper that waits for the owner's lock on the slot's claim and tears the bed down once it gets
/// it: when the owner exits without stopping the bed (a SIGKILL), the kernel releases the lock.
fn start_reaper(dir: &Path, name: &str, claim: &Path) -> Result<Child> {
    Command::new("flock")
        .arg(claim)
        .args(["sh", "-c", TEARDOWN, "teardown"])
        .env("D", dir)
        .env("NS", name)
        .env("CLAIM", claim)
        .env("SERVICE_CIDR", SERVICE_CIDR)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("start the node bed's reaper")
}

/// The teardown, as a shell script so the reaper can run it after its owner is gone; `D` is the
/// bed's directory, `NS` its name and `CLAIM` its slot's claim, which whoever runs it holds locked
/// (so the names it removes are the bed's, not another's). Every step is idempotent.
const TEARDOWN: &str = r#"
# The directory goes last but for the claim: without it, the rest is gone too (and the link or cgroup
# of that name, if any, is not this bed's).
[ -d "$D" ] || { : > "$CLAIM"; exit 0; }
cgroups() { for h in /sys/fs/cgroup/*/; do [ -d "$h$NS" ] && echo "$h$NS"; done; }
# Every process of the bed: those whose command line names its directory (the holder of the node's
# namespaces, the init of its PID namespace whose death kills every container; the node's
# components; etcd and the API server) and those in its cgroups.
bed_pids() {
  for c in $(cgroups); do find "$c" -name cgroup.procs -exec cat {} + 2>/dev/null; done
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    { [ "$pid" = "$$" ] || [ "$pid" = "$PPID" ]; } && continue
    case "$(tr '\0' ' ' 2>/dev/null < "$p/cmdline")" in *"$D/"*) echo "$pid" ;; esac
  done 2>/dev/null
}
i=0
while [ $i -lt 100 ]; do
  pids=$(bed_pids | sort -u | tr '\n' ' ')
  [ -z "${pids# }" ] && break
  kill -9 $pids 2>/dev/null
  sleep 0.1; i=$((i+1))
done
# A cgroup can be removed once its last task has exited.
i=0
while [ $i -lt 50 ] && [ -n "$(cgroups)" ]; do
  for c in $(cgroups); do find "$c" -depth -type d -exec rmdir {} + 2>/dev/null; done
  [ -z "$(cgroups)" ] || sleep 0.1; i=$((i+1))
done
# The network namespace went with its last process, and the veth pair and its routes with it;
# the host end is removed here should anything still hold the namespace.
ip link del "$NS" 2>/dev/null
ip route del unreachable "$SERVICE_CIDR" metric "${NS#atlas-bed-}" 2>/dev/null
nft delete table inet "$NS" 2>/dev/null
rm -rf --one-file-system "$D"
# Nothing of the bed is left for the slot's next owner to remove.
: > "$CLAIM"
true
"#;

/// The bed's nftables table (family `inet`, named as the bed): of what comes in over the link, the
/// host takes TCP connections to the ports in the set `pod_ports`, the rest of connections the host
/// opened (anything but a first SYN) and ICMP errors; every other packet is refused at once (a TCP
/// reset, else ICMP). Nothing is forwarded to or from the link.
fn nft_table(name: &str) -> String {
    format!(
        r#"table inet {name} {{
  set pod_ports {{ type inet_service; }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{name}" tcp dport @pod_ports accept
    iifname "{name}" tcp flags & (syn | ack) != syn accept
    iifname "{name}" icmp type {{ echo-reply, destination-unreachable, time-exceeded, parameter-problem }} accept
    iifname "{name}" meta l4proto tcp reject with tcp reset
    iifname "{name}" reject with icmpx admin-prohibited
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname "{name}" drop
    oifname "{name}" drop
  }}
}}
"#
    )
}

/// Points `names` at `address` in the bed's hosts file `hosts` (the one its CoreDNS reads, within a
/// second), replacing what they pointed at before: pods then resolve an outside name (Mojang's, a
/// pack hub's) to an address of the bed, typically its host address, where a test serves it. Names
/// not listed still get no answer. An empty `names` changes nothing.
pub fn point_names(hosts: &Path, names: &[&str], address: Ipv4Addr) -> Result<()> {
    if let Some(bad) = names.iter().find(|n| n.is_empty() || n.contains(|c: char| c.is_whitespace() || c == '#')) {
        bail!("{bad:?} is not a host name: a name for the bed's DNS has no spaces and no '#'");
    }
    // Tests of one run share a bed: one edit at a time, or one could lose another's names.
    let lock_path = hosts.with_extension("lock");
    let lock = File::create(&lock_path).with_context(|| format!("create {}", lock_path.display()))?;
    lock.lock().with_context(|| format!("lock {}", lock_path.display()))?;
    let old =
        std::fs::read_to_string(hosts).with_context(|| format!("read the bed's hosts file {}", hosts.display()))?;
    let mut text = String::new();
    for line in old.lines() {
        // The names now pointed elsewhere leave the lines they were on.
        let mut words = line.split_whitespace();
        let Some(ip) = words.next() else { continue };
        let kept: Vec<&str> = words.filter(|w| !names.contains(w)).collect();
        if !kept.is_empty() {
            text += &format!("{ip} {}\n", kept.join(" "));
        }
    }
    if !names.is_empty() {
        text += &format!("{address} {}\n", names.join(" "));
    }
    // Whole or not at all: CoreDNS may read it at any moment.
    let partial = hosts.with_extension("partial");
    std::fs::write(&partial, text).with_context(|| format!("write {}", partial.display()))?;
    std::fs::rename(&partial, hosts).with_context(|| format!("rename {} into place", partial.display()))
}

/// Opens `port` on the host to the node of the bed `name` (see [`nft_table`]).
pub fn open_port(name: &str, port: u16) -> Result<()> {
    run(Command::new("nft").args(["add", "element", "inet", name, "pod_ports", &format!("{{ {port} }}")]))
        .with_context(|| format!("open port {port} of the host to the node of {name}"))
}

fn run_with_input(cmd: &mut Command, input: &str) -> Result<()> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {cmd:?}"))?;
    child.stdin.take().context("the child's stdin")?.write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn teardown(dir: &Path, name: &str, claim: &Path) -> Result<()> {
    let status = Command::new("sh")
        .args(["-c", TEARDOWN, "teardown"])
        .env("D", dir)
        .env("NS", name)
        .env("CLAIM", claim)
        .env("SERVICE_CIDR", SERVICE_CIDR)
        .stdin(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("the teardown of {name} failed with {status}");
    }
    Ok(())
}

/// Fails when a bed's directory under `tmp` would be too long for the node's unix sockets: containerd
/// and the kubelet would fail to listen half-way through the start, with nothing naming TMPDIR.
fn check_socket_paths(tmp: &Path) -> Result<()> {
    let longest = tmp.join(format!("{PREFIX}{}", SLOTS.end())).join(LONGEST_SOCKET);
    let length = longest.as_os_str().len();
    if length > SOCKET_PATH_MAX {
        bail!(
            "TMPDIR {} is too long for the node bed's unix sockets (its {} would be {length} bytes, and \
             containerd takes {SOCKET_PATH_MAX}): set TMPDIR to a directory at most {} bytes long, such as /tmp",
            tmp.display(),
            longest.display(),
            tmp.as_os_str().len() - (length - SOCKET_PATH_MAX)
        );
    }
    Ok(())
}

/// Tears down every bed of the machine whose owner is gone and whose reaper is gone too (the
/// reaper holds the claim while it works): those whose slot's claim can be locked and names a bed.
pub fn clean_stale_beds() {
    let Ok(entries) = std::fs::read_dir(CLAIMS_DIR) else { return };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(slot) = file.strip_suffix(".lock").and_then(|s| s.parse::<u16>().ok()) else { continue };
        if !SLOTS.contains(&slot) {
            continue;
        }
        let path = claim_path(slot);
        let Ok(claim) = open_claim(&path) else { continue };
        if claim.try_lock().is_ok() {
            remove_claimed_bed(&claim, &path, &format!("{PREFIX}{slot}"));
        }
    }
}

/// The first route of `routes` (`ip -4 route show table all`) to an address of [`SERVICE_CIDR`]
/// other than the default route and the beds' own unreachable routes for the range.
fn service_range_conflict(routes: &str) -> Option<&str> {
    const TYPES: [&str; 10] = [
        "unicast",
        "local",
        "broadcast",
        "unreachable",
        "blackhole",
        "prohibit",
        "throw",
        "multicast",
        "anycast",
        "nat",
    ];
    let parse = |cidr: &str| -> Option<(u32, u32)> {
        let (address, len) = cidr.split_once('/').unwrap_or((cidr, "32"));
        let len: u32 = len.parse().ok().filter(|l| *l <= 32)?;
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        Some((u32::from(address.parse::<Ipv4Addr>().ok()?) & mask, mask))
    };
    let (range, range_mask) = parse(SERVICE_CIDR)?;
    routes.lines().find(|route| {
        let mut words = route.split_whitespace().peekable();
        let kind = words.next_if(|w| TYPES.contains(w));
        let Some(destination) = words.next() else { return false };
        if destination == "default" || (kind == Some("unreachable") && destination == SERVICE_CIDR) {
            return false;
        }
        // Two networks overlap when each one's address, under the shorter mask, is the same.
        parse(destination).is_some_and(|(address, mask)| {
            let common = mask & range_mask;
            address & common == range & common
        })
    })
}

/// The host's programs a node bed runs, each with how to get it (Debian's package).
const HOST_TOOLS: [(&str, &str); 11] = [
    ("buildah", "apt-get install buildah"),
    ("nsenter", "apt-get install util-linux"),
    ("unshare", "apt-get install util-linux"),
    ("flock", "apt-get install util-linux"),
    ("ip", "apt-get install iproute2"),
    ("nft", "apt-get install nftables"),
    ("sysctl", "apt-get install procps"),
    ("iptables", "apt-get install iptables"),
    ("runc", "apt-get install runc"),
    ("tar", "apt-get install tar"),
    ("sh", "a POSIX shell at /bin/sh"),
];

/// The first of [`HOST_TOOLS`] no directory of `path` (a `PATH` value) holds as an executable file.
fn missing_tool(path: &std::ffi::OsStr) -> Option<(&'static str, &'static str)> {
    use std::os::unix::fs::PermissionsExt;
    HOST_TOOLS.into_iter().find(|(tool, _)| {
        !std::env::split_paths(path).any(|dir| {
            std::fs::metadata(dir.join(tool)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// What a node bed needs of the host, checked before it changes anything, each with a one-line
/// error that says what to do (rather than the bare "No such file or directory" of a spawn).
fn check_host() -> Result<()> {
    if let Some((tool, install)) = missing_tool(&std::env::var_os("PATH").unwrap_or_default()) {
        bail!("a node bed needs `{tool}` on PATH: {install} (scripts/testbed-install.sh installs the node's packages)");
    }
    if !crate::running_as_root()? {
        bail!(
            "a node bed must run as root (it makes network namespaces, links, routes, nftables tables and \
             cgroups): run the tests as root, or only those that need no node"
        );
    }
    if !Path::new("/proc/sys/net/bridge").exists() {
        bail!(
            "the kernel module br_netfilter is not loaded (the node's bridged pod traffic must pass \
             kube-proxy's iptables rules): modprobe br_netfilter"
        );
    }
    Ok(())
}

fn cgroup_hierarchies() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else { return Vec::new() };
    let mut found: Vec<PathBuf> =
        entries.flatten().map(|e| e.path()).filter(|p| p.join("cgroup.procs").exists()).collect();
    found.sort();
    found
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn run(cmd: &mut Command) -> Result<()> {
    command_output(cmd).map(|_| ())
}

// ---------------------------------------------------------------------------------------------------
// The node's processes

/// A running cluster with a node: the API server on the bed's host address, the node's components
/// in the bed's namespaces, and our image imported into the node's containerd.
#[derive(Debug)]
pub struct NodeCluster {
    // Field order is drop order: the bed's teardown first kills every process at once (the API
    // server too, so it never waits out the graceful end of the node's watches), then removes the rest.
    /// The bed: slot, addresses, the node's namespaces and processes.
    pub network: BedNetwork,
    /// etcd and the API server (listening on the bed's host address).
    pub api: ClusterProcesses,
    /// Our image as the node knows it (pods use it with `imagePullPolicy: Never`).
    pub image: image::BuiltImage,
    /// How long the start took until the node was Ready.
    pub started_in: Duration,
}

impl NodeCluster {
    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.api.kubeconfig
    }

    /// Makes the cluster's DNS answer `names` with `address` (see [`point_names`]).
    pub fn point_names(&self, names: &[&str], address: Ipv4Addr) -> Result<()> {
        self.network.point_names(names, address)
    }
}

const COMPONENTS: [&str; 6] =
    ["containerd", "kubelet", "kube-proxy", "kube-controller-manager", "kube-scheduler", "coredns"];

/// Starts etcd, the API server and a node that runs pods, and waits until the node is Ready.
pub fn start_node_cluster(options: &NodeOptions) -> Result<NodeCluster> {
    let started = Instant::now();
    let mut bed = BedNetwork::claim()?;
    // Scoped threads: whatever fails, every thread has ended before `bed` is dropped, so none can
    // start etcd in, or write into, a bed that was torn down. A thread's result that is never
    // joined (an API server whose node failed) is dropped with the scope, which stops it.
    let (api, built) = std::thread::scope(|scope| start_node(scope, &mut bed, options))?;
    Ok(NodeCluster { network: bed, api, image: built, started_in: started.elapsed() })
}

fn joined<T>(handle: std::thread::ScopedJoinHandle<'_, Result<T>>, what: &str) -> Result<T> {
    handle.join().map_err(|_| anyhow::anyhow!("{what} panicked"))?
}

fn start_node<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    bed: &mut BedNetwork,
    options: &'scope NodeOptions,
) -> Result<(ClusterProcesses, image::BuiltImage)> {
    let api_options = ApiOptions { address: bed.host_ip, nodes: true };
    let api_dir = bed.dir.join("api");
    let api = scope.spawn(move || start_cluster_with(&api_options, Processes::new_in(api_dir)?.reaped_by_bed()));
    let image_dir = bed.dir.join("image");
    let built = scope.spawn(move || image::our_image(&options.image_binary, &image_dir));

    let d = bed.node_dir().to_path_buf();
    let socket = d.join(CONTAINERD_SOCKET);
    let pause = image::pause_image()?;
    std::fs::write(d.join("containerd.toml"), containerd_config(&d, &pause.name))
        .with_context(|| format!("write {}", d.join("containerd.toml").display()))?;
    bed.spawn_in("containerd", &bin("containerd")?, [format!("--config={}", d.join("containerd.toml").display())])?;
    wait_until("containerd", Duration::from_secs(30), || socket.exists())
        .with_context(|| format!("containerd's log ends:\n{}", bed.log_tail("containerd", 20)))?;
    bed.check_alive("containerd")?;
    image::import(&socket, &pause.archive)?;

    let api = joined(api, "the API server's start")?;
    let api_port = api.server.rsplit(':').next().and_then(|p| p.parse().ok()).context("the API server's port")?;
    bed.open_to_pods(api_port)?;
    let built = joined(built, "the image build")?;
    let import = scope.spawn({
        let (socket, archive) = (socket.clone(), built.archive.clone());
        move || image::import(&socket, &archive)
    });

    write_node_files(&d, bed, &api)?;
    apply(&api, &cluster_objects(bed, &d, options.volumes)?)?;
    let cfg = |name: &str| d.join(name).display().to_string();
    let node_ip = bed.node_ip;
    bed.spawn_in(
        "kubelet",
        &bin("kubelet")?,
        [
            format!("--config={}", cfg("kubelet.yaml")),
            format!("--kubeconfig={}", cfg("kubelet.kubeconfig")),
            format!("--root-dir={}", cfg("kubelet")),
            format!("--cert-dir={}", cfg("kubelet/pki")),
            format!("--hostname-override={NODE_NAME}"),
            format!("--node-ip={node_ip}"),
            // cAdvisor finds containers through containerd's own socket (not the CRI endpoint):
            // without it, its metrics have the pods' cgroups but no `container` label.
            format!("--containerd={}", cfg(CONTAINERD_SOCKET)),
            "--containerd-namespace=k8s.io".to_owned(),
            "--v=1".to_owned(),
        ],
    )?;
    bed.spawn_in(
        "kube-proxy",
        &bin("kube-proxy")?,
        [
            format!("--config={}", cfg("kube-proxy.yaml")),
            format!("--hostname-override={NODE_NAME}"),
            "--v=1".to_owned(),
        ],
    )?;
    let pki = &api.pki;
    let auth = |name: &str| {
        let k = cfg(&format!("{name}.kubeconfig"));
        vec![
            format!("--kubeconfig={k}"),
            format!("--authentication-kubeconfig={k}"),
            format!("--authorization-kubeconfig={k}"),
        ]
    };
    let mut manager_args = auth("controller-manager");
    manager_args.extend([
        "--bind-address=127.0.0.1".to_owned(),
        "--leader-elect=false".to_owned(),
        "--use-service-account-credentials=true".to_owned(),
        format!("--service-account-private-key-file={}", pki.path("sa.key")),
        format!("--root-ca-file={}", pki.path("ca.crt")),
        "--allocate-node-cidrs=false".to_owned(),
        "--controllers=*,-csrsigning,-csrapproving,-csrcleaner".to_owned(),
        "--v=1".to_owned(),
    ]);
    bed.spawn_in("kube-controller-manager", &bin("kube-controller-manager")?, manager_args)?;
    let mut scheduler_args = auth("scheduler");
    scheduler_args.extend([
        "--bind-address=127.0.0.1".to_owned(),
        "--leader-elect=false".to_owned(),
        "--v=1".to_owned(),
    ]);
    bed.spawn_in("kube-scheduler", &bin("kube-scheduler")?, scheduler_args)?;
    bed.spawn_in("coredns", &bin("coredns")?, ["-conf".to_owned(), cfg("Corefile")])?;

    joined(import, "the image import")?;
    // Also under the name the chart runs by default, so a `helm install` with no values finds it on
    // the node (its pull policy, IfNotPresent, then pulls nothing).
    image::tag(&socket, &built.name, &image::chart_default_image()?)?;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        for name in COMPONENTS {
            bed.check_alive(name)?;
        }
        if node_ready(&api)? {
            break;
        }
        if Instant::now() > deadline {
            // The logs go with the bed: the error carries what they end with.
            bail!(
                "the node was not Ready after 180 s; the kubelet's log ends:\n{}\ncontainerd's log ends:\n{}",
                bed.log_tail("kubelet", 30),
                bed.log_tail("containerd", 10)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok((api, built))
}

fn node_ready(api: &ClusterProcesses) -> Result<bool> {
    let out = Command::new(bin("kubectl")?)
        .arg("--kubeconfig")
        .arg(&api.kubeconfig)
        .args(["get", "node", NODE_NAME, "-o", r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#])
        .stderr(Stdio::null())
        .output()?;
    Ok(out.status.success() && out.stdout == b"True")
}

const NODE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The kernel settings the kubelet checks at start, under `/proc/sys`, with the values it wants
/// (k8s.io/component-helpers/node/util/sysctl, read by pkg/kubelet/cm/container_manager_linux.go
/// `setupKernelTunables`). All six are the host's own, whatever the namespace.
pub const KUBELET_KERNEL_SETTINGS: [(&str, &str); 6] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

/// Starts the holder of the node's namespaces: a new network namespace (only loopback until the
/// bed adds its link), a new mount namespace (private, with the bed's own `/run`, `/var/lib` and
/// `/var/log`, so nothing the node mounts or writes there reaches the host, and the kubelet's kernel
/// settings masked) and a new PID namespace, whose init it is. Returns its host PID.
fn start_holder(node: &mut Processes) -> Result<u32> {
    let d = node.dir().to_path_buf();
    std::fs::create_dir_all(d.join("var-lib"))?;
    std::fs::create_dir_all(d.join("var-log"))?;
    let ready = d.join("holder.ready");
    // The kubelet wants six host-wide kernel settings (not one of them is per namespace) and writes
    // those that differ. In the node's mount namespace each is a read-only file holding the value
    // the kubelet wants, so it reads what it expects and writes nothing (with
    // `protectKernelDefaults` it would fail rather than write); the host's values stay as they are.
    let mut masks = String::from("mkdir /run/atlas-bed-sysctl\n");
    for (key, value) in KUBELET_KERNEL_SETTINGS {
        let file = format!("/run/atlas-bed-sysctl/{}", key.replace('/', "."));
        masks += &format!(
            "echo {value} > {file}\nmount --bind {file} /proc/sys/{key}\nmount -o remount,bind,ro /proc/sys/{key}\n"
        );
    }
    // pause's argument is only there so the teardown finds the holder by its command line.
    let setup = format!(
        r#"set -e
mount -t tmpfs -o mode=0755 atlas-bed-run /run
mount --bind "$D/var-lib" /var/lib
mount --bind "$D/var-log" /var/log
{masks}: > "$D/holder.ready"
exec "$PAUSE" "$D/"
"#
    );
    let args: Vec<String> = vec![
        "--net".into(),
        "--pid".into(),
        "--fork".into(),
        "--kill-child".into(),
        "--mount".into(),
        "--propagation".into(),
        "private".into(),
        "--mount-proc".into(),
        "--".into(),
        "env".into(),
        format!("D={}", d.display()),
        format!("PAUSE={}", bin("pause")?.display()),
        "sh".into(),
        "-c".into(),
        setup,
    ];
    node.spawn("holder", Path::new("unshare"), args)?;
    wait_until("the node's namespaces", Duration::from_secs(10), || {
        ready.exists() || node.check_alive("holder").is_err()
    })?;
    node.check_alive("holder")?;
    // The holder is unshare's one child.
    let unshare = node.pid("holder").context("the holder has no PID")?;
    let children = std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))?;
    children.split_whitespace().next().and_then(|p| p.parse().ok()).context("the holder's unshare has no child")
}

fn containerd_config(d: &Path, sandbox_image: &str) -> String {
    let d = d.display();
    format!(
        r#"# The bed's own containerd: its own root, state and socket, never the system's configuration.
version = 4
root = "{d}/containerd/root"
state = "{d}/containerd/state"
imports = []
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.blockfile", "io.containerd.snapshotter.v1.erofs", "io.containerd.differ.v1.erofs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing", "io.containerd.nri.v1.nri"]

[debug]
  level = "warn"

[plugins]
  [plugins."io.containerd.server.v1.grpc"]
    address = "{d}/containerd/containerd.sock"
  [plugins."io.containerd.server.v1.ttrpc"]
    address = "{d}/containerd/containerd.sock.ttrpc"
  [plugins."io.containerd.internal.v1.opt"]
    path = "{d}/containerd/opt"
  [plugins."io.containerd.cri.v1.images"]
    snapshotter = "overlayfs"
    [plugins."io.containerd.cri.v1.images".pinned_images]
      sandbox = "{sandbox_image}"
  [plugins."io.containerd.cri.v1.runtime"]
    enable_selinux = false
    # root here lacks CAP_SYS_RESOURCE: runc cannot lower a sandbox's oom_score_adj below its own
    restrict_oom_score_adj = true
    [plugins."io.containerd.cri.v1.runtime".containerd]
      default_runtime_name = "runc"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
          BinaryName = "runc"
          SystemdCgroup = false
    [plugins."io.containerd.cri.v1.runtime".cni]
      bin_dirs = ["/usr/lib/cni"]
      conf_dir = "{d}/cni"
  [plugins."io.containerd.grpc.v1.cri"]
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
"#
    )
}

/// The node's configuration files, certificates and kubeconfigs, written into `d`.
fn write_node_files(d: &Path, network: &BedNetwork, api: &ClusterProcesses) -> Result<()> {
    let pki = &api.pki;
    let node_ip = network.node_ip.to_string();
    pki.client("kubelet", &format!("system:node:{NODE_NAME}"), &["system:nodes"])?;
    pki.server("kubelet-serving", NODE_NAME, vec![node_ip.clone(), NODE_NAME.to_owned()])?;
    pki.client("kube-proxy", "system:kube-proxy", &[])?;
    pki.client("controller-manager", "system:kube-controller-manager", &[])?;
    pki.client("scheduler", "system:kube-scheduler", &[])?;
    pki.client("coredns", "atlas-bed:coredns", &[])?;
    for name in ["kubelet", "kube-proxy", "controller-manager", "scheduler", "coredns"] {
        std::fs::write(d.join(format!("{name}.kubeconfig")), pki.kubeconfig(&api.server, name))?;
    }
    let dd = d.display();
    std::fs::create_dir_all(d.join("cni"))?;
    std::fs::write(
        d.join("cni/10-atlas-bed.conflist"),
        serde_json::to_string_pretty(&serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "atlas-bed",
            "plugins": [
                {
                    "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": network.pod_cidr}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": format!("{dd}/cni-ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        }))?,
    )?;
    // Empty until a test points a name at the bed (see point_names); CoreDNS rereads it.
    std::fs::write(d.join(HOSTS_FILE), "")?;
    // Pods whose DNS policy is Default read this too: never the host's resolver.
    std::fs::write(d.join("resolv.conf"), format!("nameserver {DNS_SERVICE_IP}\n"))?;
    std::fs::write(
        d.join("kubelet.yaml"),
        format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {node_ip}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: Webhook}}
tlsCertFile: {pki}/kubelet-serving.crt
tlsPrivateKeyFile: {pki}/kubelet-serving.key
# PID 1 is not systemd and the host is cgroup v1 (hybrid).
cgroupDriver: cgroupfs
failCgroupV1: false
cgroupRoot: /{ns}
failSwapOn: false
containerRuntimeEndpoint: unix://{dd}/containerd/containerd.sock
clusterDomain: cluster.local
clusterDNS: [{DNS_SERVICE_IP}]
resolvConf: {dd}/resolv.conf
podLogsDirectory: {dd}/pod-logs
volumePluginDir: {dd}/kubelet-plugins
# A test machine's disk is shared and often full-ish: evict only when it is really out of room
# (an absolute floor: 1 % of a big disk is gigabytes, and a node tainted for DiskPressure schedules
# nothing), and never collect the images the bed imported (no registry can give them back).
evictionHard: {{memory.available: 1Mi, nodefs.available: 100Mi, nodefs.inodesFree: 1%, imagefs.available: 100Mi, imagefs.inodesFree: 1%}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
# The kernel settings it wants are masked in the node's mount namespace (see start_holder): it
# finds them as it wants them, and would fail rather than change the host's should one not be.
protectKernelDefaults: true
rotateCertificates: false
serverTLSBootstrap: false
"#,
            ca = pki.path("ca.crt"),
            pki = pki.dir().display(),
            ns = network.name,
        ),
    )?;
    std::fs::write(
        d.join("kube-proxy.yaml"),
        format!(
            r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {{kubeconfig: {dd}/kube-proxy.kubeconfig}}
hostnameOverride: {NODE_NAME}
clusterCIDR: {pods}
nodePortAddresses: ["{node_ip}/32"]
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
iptables: {{localhostNodePorts: false}}
# Zero: kube-proxy then writes no conntrack sysctls (they are not the namespace's to change).
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
"#,
            pods = network.pod_cidr,
        ),
    )?;
    std::fs::write(
        d.join("Corefile"),
        format!(
            r#".:53 {{
    errors
    health 127.0.0.1:8080
    ready 127.0.0.1:8181
    # Outside names a test points at the bed's own address (see point_names); every other name
    # goes on to the cluster's, and one the cluster does not know either gets no answer from
    # outside: there is no `forward`.
    hosts {dd}/{HOSTS_FILE} {{
        reload 1s
        fallthrough
    }}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {dd}/coredns.kubeconfig atlas-test
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 30
    loadbalance
}}
"#
        ),
    )?;
    Ok(())
}

/// The objects a cluster's add-ons would make: CoreDNS's RBAC, the `kube-dns` Service (its endpoint
/// is CoreDNS on the node's address), the `manual` StorageClass and the bed's local volumes.
fn cluster_objects(network: &BedNetwork, d: &Path, volumes: usize) -> Result<String> {
    let node_ip = network.node_ip;
    let mut yaml = format!(
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: "atlas-bed:coredns"}}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: "atlas-bed:coredns"}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "atlas-bed:coredns"}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: "atlas-bed:coredns"}}
---
apiVersion: v1
kind: Service
metadata: {{name: kube-dns, namespace: kube-system, labels: {{k8s-app: kube-dns}}}}
spec:
  clusterIP: {DNS_SERVICE_IP}
  ports:
  - {{name: dns, port: 53, protocol: UDP, targetPort: 53}}
  - {{name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-node
  namespace: kube-system
  labels: {{kubernetes.io/service-name: kube-dns, endpointslice.kubernetes.io/managed-by: atlas-testbed}}
addressType: IPv4
endpoints:
- addresses: ["{node_ip}"]
  conditions: {{ready: true}}
ports:
- {{name: dns, port: 53, protocol: UDP}}
- {{name: dns-tcp, port: 53, protocol: TCP}}
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: {STORAGE_CLASS}
  annotations: {{storageclass.kubernetes.io/is-default-class: "true"}}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Retain
"#
    );
    for i in 0..volumes {
        let path = d.join(format!("volumes/pv-{i}"));
        std::fs::create_dir_all(&path).with_context(|| format!("create the local volume {}", path.display()))?;
        yaml += &format!(
            r#"---
apiVersion: v1
kind: PersistentVolume
metadata: {{name: atlas-bed-pv-{i}}}
spec:
  capacity: {{storage: 10Gi}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: {STORAGE_CLASS}
  local: {{path: "{path}"}}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions:
        - {{key: kubernetes.io/hostname, operator: In, values: [{NODE_NAME}]}}
"#,
            path = path.display()
        );
    }
    Ok(yaml)
}

fn apply(api: &ClusterProcesses, yaml: &str) -> Result<()> {
    let mut child = Command::new(bin("kubectl")?)
        .arg("--kubeconfig")
        .arg(&api.kubeconfig)
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().context("kubectl's stdin")?.write_all(yaml.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("kubectl apply of the bed's cluster objects failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{HOST_TOOLS, check_socket_paths, missing_tool, point_names, service_range_conflict};

    #[test]
    fn a_tmpdir_too_long_for_the_nodes_sockets_is_refused_with_the_length_it_may_have() -> anyhow::Result<()> {
        check_socket_paths(std::path::Path::new("/tmp"))?;
        // "/atlas-bed-250/node/kubelet/pod-resources/kubelet.sock" is 54 bytes: 50 more make 104.
        let longest = format!("/{}", "d".repeat(49));
        check_socket_paths(std::path::Path::new(&longest))?;
        let over = format!("{longest}x");
        match check_socket_paths(std::path::Path::new(&over)) {
            Err(refused) => {
                let message = refused.to_string();
                assert!(message.starts_with(&format!("TMPDIR {over} is too long")), "{message}");
                assert!(message.contains("at most 50 bytes long"), "{message}");
            }
            Ok(()) => anyhow::bail!("{over} is one byte over and was taken"),
        }
        Ok(())
    }

    #[test]
    fn pointing_names_moves_them_and_keeps_the_other_names() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(crate::unique("atlas-hosts"));
        std::fs::create_dir_all(&dir)?;
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, "")?;
        let (a, b) = (std::net::Ipv4Addr::new(10, 213, 7, 1), std::net::Ipv4Addr::new(10, 213, 7, 2));
        point_names(&hosts, &["x.example", "y.example"], a)?;
        point_names(&hosts, &["z.example"], a)?;
        assert_eq!(std::fs::read_to_string(&hosts)?, "10.213.7.1 x.example y.example\n10.213.7.1 z.example\n");
        point_names(&hosts, &["y.example"], b)?;
        assert_eq!(
            std::fs::read_to_string(&hosts)?,
            "10.213.7.1 x.example\n10.213.7.1 z.example\n10.213.7.2 y.example\n"
        );
        match point_names(&hosts, &["two words"], a) {
            Err(bad) => assert!(bad.to_string().contains("not a host name"), "{bad}"),
            Ok(()) => anyhow::bail!("a name with a space was written"),
        }
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn a_host_tool_missing_from_path_is_named_with_how_to_install_it() -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(crate::unique("atlas-host-tools"));
        let (first, second) = (dir.join("a"), dir.join("b"));
        std::fs::create_dir_all(&first)?;
        std::fs::create_dir_all(&second)?;
        // Spread over two directories, as PATH spreads them.
        let home = |tool: &str| {
            let i = HOST_TOOLS.iter().position(|(t, _)| *t == tool).unwrap_or_default();
            if i % 2 == 0 { first.join(tool) } else { second.join(tool) }
        };
        for (tool, _) in HOST_TOOLS {
            std::fs::write(home(tool), "#!/bin/sh\n")?;
            std::fs::set_permissions(home(tool), std::fs::Permissions::from_mode(0o755))?;
        }
        let path = std::env::join_paths([&first, &second])?;
        assert_eq!(missing_tool(&path), None);
        // Not executable is as good as missing.
        std::fs::set_permissions(home("nft"), std::fs::Permissions::from_mode(0o644))?;
        assert_eq!(missing_tool(&path), Some(("nft", "apt-get install nftables")));
        std::fs::remove_file(home("nsenter"))?;
        assert_eq!(missing_tool(&path), Some(("nsenter", "apt-get install util-linux")));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn a_host_route_into_the_service_range_is_a_conflict_and_the_default_route_is_not() {
        let host = "default via 192.0.2.1 dev eth0\n192.0.2.0/24 dev eth0 proto kernel scope link src 192.0.2.2\n\
                    unreachable 10.0.0.0/24 metric 7\nlocal 127.0.0.1 dev lo table local proto kernel\n";
        assert_eq!(service_range_conflict(host), None);
        for route in
            ["10.0.0.0/8 via 192.0.2.1 dev eth0", "10.0.0.128/25 dev eth1", "local 10.0.0.5 dev eth1 table local"]
        {
            let routes = format!("{host}{route}\n");
            assert_eq!(service_range_conflict(&routes), Some(route));
        }
        assert_eq!(service_range_conflict("10.0.1.0/24 dev eth1\n"), None);
    }
}
