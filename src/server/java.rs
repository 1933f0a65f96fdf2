//! Finding a Java whose major version fits the Minecraft version.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::ServerError;

/// Where to look for Java installations, in order of preference.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JavaSearch {
    /// `JAVA_HOME`.
    pub java_home: Option<PathBuf>,
    /// Installations named by the user: a Java home directory or a `java` binary.
    pub paths: Vec<PathBuf>,
    /// Directories whose every child is a Java home (`/usr/lib/jvm`).
    pub jvm_dirs: Vec<PathBuf>,
    /// The `PATH` searched for `java`.
    pub path_var: Option<OsString>,
}

impl JavaSearch {
    /// `JAVA_HOME`, `/usr/lib/jvm/*` and `PATH` from this process's environment.
    pub fn from_env() -> Self {
        Self {
            java_home: std::env::var_os("JAVA_HOME").filter(|v| !v.is_empty()).map(PathBuf::from),
            paths: Vec::new(),
            jvm_dirs: vec![PathBuf::from("/usr/lib/jvm")],
            path_var: std::env::var_os("PATH"),
        }
    }

    /// [`from_env`](Self::from_env) plus installations the user named.
    pub fn with_extra(paths: Vec<PathBuf>) -> Self {
        Self { paths, ..Self::from_env() }
    }

    /// The `java` binaries to consider, in order, without duplicates.
    pub fn candidates(&self) -> Vec<PathBuf> {
        let mut listed: Vec<PathBuf> = Vec::new();
        listed.extend(self.java_home.iter().map(|home| home.join("bin/java")));
        listed.extend(self.paths.iter().map(|p| if p.is_dir() { p.join("bin/java") } else { p.clone() }));
        for dir in &self.jvm_dirs {
            let Ok(entries) = std::fs::read_dir(dir) else { continue };
            let mut homes: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            homes.sort();
            listed.extend(homes.into_iter().map(|home| home.join("bin/java")));
        }
        if let Some(path) = &self.path_var {
            listed.extend(std::env::split_paths(path).map(|dir| dir.join("java")));
        }
        let mut seen = BTreeSet::new();
        listed
            .into_iter()
            .filter_map(|java| std::fs::canonicalize(&java).ok())
            .filter(|java| java.is_file() && seen.insert(java.clone()))
            .collect()
    }
}

/// A Java installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JavaInstall {
    /// The `java` binary.
    pub path: PathBuf,
    /// Its major version (`17`, `21`, `25`).
    pub major: u32,
}

/// A Java of exactly `major`, else the oldest newer one (Minecraft runs on newer Java in practice).
pub fn find_java(major: u32, search: &JavaSearch) -> Result<JavaInstall, ServerError> {
    let found: Vec<JavaInstall> = search
        .candidates()
        .into_iter()
        .filter_map(|path| java_major(&path).map(|major| JavaInstall { path, major }))
        .collect();
    match choose(major, &found) {
        Some(java) if java.major == major => {
            tracing::debug!(path = %java.path.display(), major, "using Java");
            Ok(java.clone())
        }
        Some(java) => {
            tracing::info!(path = %java.path.display(), needed = major, using = java.major, "no Java {major} found; using the oldest newer one");
            Ok(java.clone())
        }
        None => {
            let found = if found.is_empty() {
                "none".to_owned()
            } else {
                found.iter().map(|j| format!("{} ({})", j.major, j.path.display())).collect::<Vec<_>>().join(", ")
            };
            Err(ServerError::FindJava { needed: major, found })
        }
    }
}

/// The install of exactly `major`, else the one with the smallest newer major; earlier entries win ties.
pub fn choose(major: u32, found: &[JavaInstall]) -> Option<&JavaInstall> {
    found.iter().find(|j| j.major == major).or_else(|| {
        found.iter().filter(|j| j.major > major).fold(None, |best: Option<&JavaInstall>, j| match best {
            Some(b) if b.major <= j.major => Some(b),
            _ => Some(j),
        })
    })
}

/// The major version of the `java` binary at `path`: from its home's `release` file, else from
/// running `java -version`.
pub fn java_major(path: &Path) -> Option<u32> {
    let home = path.parent()?.parent()?;
    if let Some(major) = std::fs::read_to_string(home.join("release")).ok().and_then(|t| parse_release_file(&t)) {
        return Some(major);
    }
    let output = Command::new(path).arg("-version").stdin(Stdio::null()).stdout(Stdio::null()).output().ok()?;
    parse_version_output(&String::from_utf8_lossy(&output.stderr))
}

/// The major version in a JDK's `release` file (`JAVA_VERSION="21.0.2"`).
pub fn parse_release_file(text: &str) -> Option<u32> {
    let line = text.lines().find_map(|l| l.trim().strip_prefix("JAVA_VERSION="))?;
    major_of(line.trim().trim_matches('"'))
}

/// The major version in `java -version` output (`openjdk version "17.0.15" 2025-04-15`).
pub fn parse_version_output(text: &str) -> Option<u32> {
    let rest = &text[text.find("version \"")? + "version \"".len()..];
    major_of(&rest[..rest.find('"')?])
}

/// The major version of a Java version string: `1.8.0_392` is 8, `17.0.15` is 17, `25-ea` is 25.
pub fn major_of(version: &str) -> Option<u32> {
    let mut parts = version.split(|c: char| !c.is_ascii_digit());
    let first: u32 = parts.next()?.parse().ok()?;
    if first == 1 { parts.next()?.parse().ok() } else { Some(first) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn java_versions_parse() {
        assert_eq!(parse_release_file("IMPLEMENTOR=\"Eclipse\"\nJAVA_VERSION=\"21.0.2\"\n"), Some(21));
        assert_eq!(parse_release_file("JAVA_VERSION=\"1.8.0_392\""), Some(8));
        assert_eq!(parse_release_file("JAVA_VERSION_DATE=\"2025\""), None);
        assert_eq!(parse_version_output("openjdk version \"17.0.15\" 2025-04-15\nOpenJDK Runtime"), Some(17));
        assert_eq!(parse_version_output("java version \"1.8.0_202\"\n"), Some(8));
        assert_eq!(parse_version_output("openjdk version \"25\" 2025-09-16"), Some(25));
        assert_eq!(parse_version_output("openjdk version \"26-ea\" 2026-03-17"), Some(26));
        assert_eq!(parse_version_output("no version here"), None);
        assert_eq!(major_of("21.0.2+13-LTS"), Some(21));
    }

    #[test]
    fn exact_major_first_then_the_oldest_newer_one() {
        let at = |major: u32, path: &str| JavaInstall { path: path.into(), major };
        let found = [at(25, "/a"), at(17, "/b"), at(22, "/c"), at(21, "/d")];
        assert_eq!(choose(21, &found), Some(&found[3]));
        assert_eq!(choose(18, &found), Some(&found[3]));
        assert_eq!(choose(23, &found), Some(&found[0]));
        assert_eq!(choose(8, &found), Some(&found[1]));
        assert_eq!(choose(26, &found), None);
    }
}
