//! The JVM command line: the memory limit, the heap within it, flag presets, the jar.

use std::ffi::OsString;
use std::path::Path;

use super::{ResolvedServer, ServerError};
use crate::api::{JvmFlags, JvmSpec};

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

/// The heap share of the memory limit when the spec names none.
pub const DEFAULT_HEAP_PERCENT: u8 = 70;

/// Below this a Minecraft server does not start (and Aikar's SurvivorRatio is refused by the JVM).
const MIN_HEAP: u64 = 256 * MIB;

/// Above this heap Aikar's large-heap variant applies.
const LARGE_HEAP: u64 = 12 * GIB;

/// The memory the JVM may use: the cgroup v2 or v1 limit under `cgroup_root` (normally
/// `/sys/fs/cgroup`), capped by the host's memory, or the host's memory when there is no limit.
pub fn memory_limit(cgroup_root: &Path) -> u64 {
    let host = host_memory();
    match cgroup_memory_limit(cgroup_root) {
        // An "unlimited" v1 cgroup reports a huge number; the host is the real bound.
        Some(limit) if host > 0 => limit.min(host),
        Some(limit) => limit,
        None => host,
    }
}

/// The cgroup memory limit under `cgroup_root`: v2 `memory.max`, else v1
/// `memory/memory.limit_in_bytes`; `None` when neither exists or the limit is `max`.
pub fn cgroup_memory_limit(cgroup_root: &Path) -> Option<u64> {
    if let Ok(text) = std::fs::read_to_string(cgroup_root.join("memory.max")) {
        return text.trim().parse().ok();
    }
    let text = std::fs::read_to_string(cgroup_root.join("memory/memory.limit_in_bytes")).ok()?;
    text.trim().parse().ok()
}

fn host_memory() -> u64 {
    use sysinfo::{MemoryRefreshKind, RefreshKind, System};
    // 0 when the host's memory cannot be read; memory_limit then trusts the cgroup alone.
    System::new_with_specifics(RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram()))
        .map_or(0, |system| system.total_memory())
}

/// Memory left outside the heap for metaspace, threads, direct buffers and the GC.
pub fn headroom(limit: u64) -> u64 {
    (256 * MIB).max(percent_of(limit, 15))
}

fn percent_of(bytes: u64, percent: u64) -> u64 {
    // Widened so neither the product overflows nor the division rounds early; the result is at most
    // `bytes` for percent <= 100, so it fits back.
    u64::try_from(u128::from(bytes) * u128::from(percent) / 100).unwrap_or(u64::MAX)
}

/// Parses a heap size as `-Xmx` takes it (`4G`, `3072M`, `1048576`).
pub fn parse_size(text: &str) -> Option<u64> {
    let (digits, unit) = match text.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&text[..i], c.to_ascii_lowercase()),
        _ => (text, 'b'),
    };
    let n: u64 = digits.parse().ok()?;
    let scale = match unit {
        'b' => 1,
        'k' => 1024,
        'm' => MIB,
        'g' => GIB,
        't' => 1024 * GIB,
        _ => return None,
    };
    n.checked_mul(scale)
}

/// The heap for `jvm` within `limit`: `heap`, or `heapPercent` (default 70) of the limit, never
/// more than the limit minus [`headroom`], rounded down to MiB.
pub fn heap_bytes(jvm: Option<&JvmSpec>, limit: u64) -> Result<u64, ServerError> {
    let ceiling = limit.saturating_sub(headroom(limit));
    let asked = match jvm.and_then(|j| j.heap.as_deref()) {
        Some(text) => parse_size(text).ok_or_else(|| ServerError::Heap {
            reason: format!("spec.jvm.heap {text:?} is not a size; write it as -Xmx takes it, like 4G or 3072M"),
        })?,
        None => {
            let percent = jvm.and_then(|j| j.heap_percent).unwrap_or(DEFAULT_HEAP_PERCENT);
            percent_of(limit, percent.into())
        }
    };
    let heap = if asked > ceiling {
        tracing::warn!(
            asked_mib = asked / MIB,
            heap_mib = ceiling / MIB,
            limit_mib = limit / MIB,
            "the requested heap does not leave room for the JVM's other memory within the limit; using less"
        );
        ceiling
    } else {
        asked
    };
    let heap = heap / MIB * MIB;
    if heap < MIN_HEAP {
        return Err(ServerError::Heap {
            reason: format!(
                "{} MiB of heap within a {} MiB memory limit is below the {} MiB a server needs; raise the memory limit or spec.jvm.heap",
                heap / MIB,
                limit / MIB,
                MIN_HEAP / MIB
            ),
        });
    }
    Ok(heap)
}

/// The flags of a preset for a heap of `heap` bytes.
pub fn preset_flags(flags: JvmFlags, heap: u64) -> Vec<String> {
    match flags {
        JvmFlags::None => Vec::new(),
        JvmFlags::Aikar => {
            // https://docs.papermc.io/paper/aikars-flags; the G1 sizes change above 12 GiB.
            let large = heap > LARGE_HEAP;
            let (new, max_new, region, reserve, ihop) =
                if large { (40, 50, "16M", 15, 20) } else { (30, 40, "8M", 20, 15) };
            [
                "-XX:+UseG1GC".to_owned(),
                "-XX:+ParallelRefProcEnabled".to_owned(),
                "-XX:MaxGCPauseMillis=200".to_owned(),
                "-XX:+UnlockExperimentalVMOptions".to_owned(),
                "-XX:+DisableExplicitGC".to_owned(),
                "-XX:+AlwaysPreTouch".to_owned(),
                format!("-XX:G1NewSizePercent={new}"),
                format!("-XX:G1MaxNewSizePercent={max_new}"),
                format!("-XX:G1HeapRegionSize={region}"),
                format!("-XX:G1ReservePercent={reserve}"),
                "-XX:G1HeapWastePercent=5".to_owned(),
                "-XX:G1MixedGCCountTarget=4".to_owned(),
                format!("-XX:InitiatingHeapOccupancyPercent={ihop}"),
                "-XX:G1MixedGCLiveThresholdPercent=90".to_owned(),
                "-XX:G1RSetUpdatingPauseTimePercent=5".to_owned(),
                "-XX:SurvivorRatio=32".to_owned(),
                "-XX:+PerfDisableSharedMem".to_owned(),
                "-XX:MaxTenuringThreshold=1".to_owned(),
                "-Dusing.aikars.flags=https://mcflags.emc.gs".to_owned(),
                "-Daikars.new.flags=true".to_owned(),
            ]
            .into()
        }
    }
}

/// The full command line, program first: `java -Xms -Xmx PRESET EXTRA -jar JAR nogui`.
///
/// `-Xms` equals `-Xmx` so the heap is committed (and pre-touched) up front. OutOfMemoryError
/// handling stays the JVM's default: the supervisor classifies the exit from the output, and a heap
/// dump as large as the heap would fill the data volume.
pub fn jvm_command(
    java: &Path,
    resolved: &ResolvedServer,
    jvm: Option<&JvmSpec>,
    memory_limit_bytes: u64,
) -> Result<Vec<OsString>, ServerError> {
    let heap_mib = heap_bytes(jvm, memory_limit_bytes)? / MIB;
    let mut command: Vec<OsString> =
        vec![java.into(), format!("-Xms{heap_mib}M").into(), format!("-Xmx{heap_mib}M").into()];
    let flags = jvm.map_or(JvmFlags::Aikar, |j| j.flags);
    command.extend(preset_flags(flags, heap_mib * MIB).into_iter().map(OsString::from));
    command.extend(jvm.into_iter().flat_map(|j| j.extra_args.iter()).map(OsString::from));
    command.extend(["-jar".into(), resolved.jar.clone().into_os_string(), "nogui".into()]);
    Ok(command)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ServerType;
    use crate::server::test_dir;

    fn spec(heap: Option<&str>, percent: Option<u8>, flags: JvmFlags) -> JvmSpec {
        JvmSpec { heap: heap.map(str::to_owned), heap_percent: percent, flags, extra_args: vec![] }
    }

    #[test]
    fn cgroup_v2_v1_and_unlimited_limits_are_read() -> anyhow::Result<()> {
        let v2_dir = test_dir("cgroup-v2")?;
        let v2 = v2_dir.path();
        std::fs::write(v2.join("memory.max"), "2147483648\n")?;
        assert_eq!(cgroup_memory_limit(v2), Some(2 * GIB));
        assert!(memory_limit(v2) <= 2 * GIB);

        let v2_unlimited_dir = test_dir("cgroup-v2-max")?;
        let v2_unlimited = v2_unlimited_dir.path();
        std::fs::write(v2_unlimited.join("memory.max"), "max\n")?;
        assert_eq!(cgroup_memory_limit(v2_unlimited), None);
        assert_eq!(memory_limit(v2_unlimited), host_memory());

        let v1_dir = test_dir("cgroup-v1")?;
        let v1 = v1_dir.path();
        std::fs::create_dir_all(v1.join("memory"))?;
        std::fs::write(v1.join("memory/memory.limit_in_bytes"), "1073741824\n")?;
        assert_eq!(cgroup_memory_limit(v1), Some(GIB));

        let v1_unlimited_dir = test_dir("cgroup-v1-unlimited")?;
        let v1_unlimited = v1_unlimited_dir.path();
        std::fs::create_dir_all(v1_unlimited.join("memory"))?;
        std::fs::write(v1_unlimited.join("memory/memory.limit_in_bytes"), "9223372036854771712\n")?;
        assert_eq!(memory_limit(v1_unlimited), host_memory());

        let none_dir = test_dir("cgroup-none")?;
        let none = none_dir.path();
        assert_eq!(cgroup_memory_limit(none), None);
        assert!(host_memory() > 0);
        assert_eq!(memory_limit(none), host_memory());
        Ok(())
    }

    #[test]
    fn heap_comes_from_the_spec_or_a_share_of_the_limit() -> Result<(), ServerError> {
        // Default: 70% of 4 GiB.
        assert_eq!(heap_bytes(None, 4 * GIB)? / MIB, 2867);
        assert_eq!(heap_bytes(Some(&spec(None, Some(50), JvmFlags::Aikar)), 4 * GIB)?, 2 * GIB);
        assert_eq!(heap_bytes(Some(&spec(Some("3072M"), None, JvmFlags::Aikar)), 8 * GIB)?, 3 * GIB);
        // Never more than the limit minus headroom: 15% of 8 GiB stays free.
        assert_eq!(heap_bytes(Some(&spec(Some("8G"), None, JvmFlags::Aikar)), 8 * GIB)? / MIB, 6963);
        assert_eq!(heap_bytes(Some(&spec(None, Some(95), JvmFlags::Aikar)), GIB)?, 768 * MIB);
        let tiny = heap_bytes(None, 300 * MIB);
        assert!(matches!(tiny, Err(ServerError::Heap { .. })));
        let bad = heap_bytes(Some(&spec(Some("lots"), None, JvmFlags::Aikar)), 8 * GIB);
        assert!(bad.err().is_some_and(|e| e.to_string().contains("4G")));
        Ok(())
    }

    #[test]
    fn sizes_parse_as_xmx_takes_them() {
        assert_eq!(parse_size("4G"), Some(4 * GIB));
        assert_eq!(parse_size("4g"), Some(4 * GIB));
        assert_eq!(parse_size("512M"), Some(512 * MIB));
        assert_eq!(parse_size("2048k"), Some(2 * MIB));
        assert_eq!(parse_size("1048576"), Some(MIB));
        assert_eq!(parse_size("G"), None);
        assert_eq!(parse_size("4X"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn aikar_switches_to_the_large_heap_variant_above_12_gib() {
        let small = preset_flags(JvmFlags::Aikar, 12 * GIB);
        let large = preset_flags(JvmFlags::Aikar, 12 * GIB + MIB);
        for flag in ["-XX:G1NewSizePercent=30", "-XX:G1HeapRegionSize=8M", "-XX:InitiatingHeapOccupancyPercent=15"] {
            assert!(small.iter().any(|f| f == flag), "{flag}");
        }
        for flag in [
            "-XX:G1NewSizePercent=40",
            "-XX:G1MaxNewSizePercent=50",
            "-XX:G1HeapRegionSize=16M",
            "-XX:G1ReservePercent=15",
            "-XX:InitiatingHeapOccupancyPercent=20",
        ] {
            assert!(large.iter().any(|f| f == flag), "{flag}");
        }
        assert!(preset_flags(JvmFlags::None, 16 * GIB).is_empty());
    }

    #[test]
    fn command_line_orders_heap_preset_extra_and_jar() -> Result<(), ServerError> {
        let resolved = ResolvedServer {
            kind: ServerType::Vanilla,
            minecraft_version: "1.21.4".into(),
            jar: "/data/.atlas/cache/jars/abc.jar".into(),
            java_major: 21,
            sha256: "abc".into(),
            offline: None,
        };
        let mut jvm = spec(Some("2G"), None, JvmFlags::Aikar);
        jvm.extra_args = vec!["-Dfoo=bar".into()];
        let command = jvm_command(Path::new("/usr/bin/java"), &resolved, Some(&jvm), 8 * GIB)?;
        let command: Vec<String> = command.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(command[..3], ["/usr/bin/java", "-Xms2048M", "-Xmx2048M"]);
        assert_eq!(command[command.len() - 4..], ["-Dfoo=bar", "-jar", "/data/.atlas/cache/jars/abc.jar", "nogui"]);
        assert!(command.iter().any(|a| a == "-XX:+UseG1GC"));
        let plain = jvm_command(Path::new("java"), &resolved, Some(&spec(None, None, JvmFlags::None)), 4 * GIB)?;
        assert_eq!(plain.len(), 6);
        Ok(())
    }
}
