//! Server software resolution, server.properties, eula.txt and the JVM command line.
//!
//! Steps, each in its own file: [`version`] orders Minecraft versions by Mojang's manifest;
//! [`resolve`] turns a [`ServerSpec`](crate::api::ServerSpec) into a verified, cached jar (over
//! [`http`] and [`cache`]); [`properties`] merges `server.properties`; [`files`] writes `eula.txt` and
//! keeps the RCON password; [`java`] finds a matching Java; [`jvm`] sizes the heap and builds the
//! command line.

use std::path::PathBuf;

mod cache;
mod files;
mod http;
pub mod java;
pub mod jvm;
pub mod properties;
pub mod resolve;
pub mod version;

pub use files::{rcon_password, write_eula};
pub use java::{JavaInstall, JavaSearch, find_java};
pub use jvm::{heap_bytes, jvm_command, memory_limit};
pub use properties::{merge_properties, parse_properties, write_properties};
pub use resolve::{BaseUrls, ResolvedServer, Resolver};
pub use version::VersionManifest;

/// What went wrong while readying the server software, its files or its JVM.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The HTTP client could not be set up (TLS roots, settings).
    #[error("cannot set up the HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),

    /// A request failed in a way that may pass: no connection, a timeout, HTTP 5xx or 429.
    #[error("cannot reach {url}: {reason}; check the network, or point the base URL at a reachable mirror")]
    Fetch {
        /// The URL requested.
        url: String,
        /// What failed.
        reason: String,
    },

    /// The server answered with an error status that retrying will not change (HTTP 4xx).
    #[error("{url} answered HTTP {status}; check the configured base URL and the version in spec.server")]
    FetchStatus {
        /// The URL requested.
        url: String,
        /// The HTTP status code.
        status: u16,
    },

    /// A metadata document did not have the expected shape.
    #[error("{url} returned a document Atlas Runner cannot read ({detail}); the base URL may point at something else")]
    ParseMetadata {
        /// The URL of the document.
        url: String,
        /// What was wrong with it.
        detail: String,
    },

    /// The software does not publish the requested Minecraft version.
    #[error("{software} has no Minecraft version {version:?}: {hint}")]
    UnknownVersion {
        /// `vanilla`, `paper`, `fabric` or `custom`.
        software: &'static str,
        /// The version asked for.
        version: String,
        /// What to do about it.
        hint: String,
    },

    /// A download or document did not match its published digest; nothing was cached.
    #[error(
        "{url} does not match its published {algorithm}: expected {expected}, got {actual}; the download is corrupt or was tampered with, so nothing was cached (retry later or use another mirror)"
    )]
    VerifyDigest {
        /// What was downloaded.
        url: String,
        /// `sha1`, `sha256` or `size`.
        algorithm: &'static str,
        /// The published value.
        expected: String,
        /// The value of what arrived.
        actual: String,
    },

    /// The download API was unreachable and no cached jar can stand in.
    #[error(
        "cannot resolve {software} {version} and no jar for it is cached, so the server cannot start offline: {source}"
    )]
    Offline {
        /// `vanilla`, `paper` or `fabric`.
        software: &'static str,
        /// The version asked for.
        version: String,
        /// Why the API could not be used.
        #[source]
        source: Box<ServerError>,
    },

    /// The jar of a `custom` server is missing or not acceptable.
    #[error("custom server jar {}: {reason}", path.display())]
    CustomJar {
        /// The path as resolved against the data directory.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },

    /// A file could not be read or written.
    #[error("cannot read or write {}: {source}; check its permissions and the free space", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// `spec.eula` is false.
    #[error("the Minecraft EULA is not accepted: set spec.eula: true to accept it (https://aka.ms/MinecraftEULA)")]
    Eula,

    /// The RCON password could not be read or made.
    #[error("RCON password: {reason}")]
    RconPassword {
        /// What is wrong and what to do.
        reason: String,
    },

    /// The heap cannot be sized as asked.
    #[error("JVM heap: {reason}")]
    Heap {
        /// What is wrong and what to do.
        reason: String,
    },

    /// No installed Java is recent enough.
    #[error(
        "no Java {needed} (or newer) found; found: {found}; install Java {needed} or name its directory with --java or JAVA_HOME"
    )]
    FindJava {
        /// The major version the Minecraft version asks for.
        needed: u32,
        /// The installations seen, as `major (path)`, or `none`.
        found: String,
    },
}

impl ServerError {
    /// A short static word for metrics labels, Event reasons and log fields.
    pub fn category(&self) -> &'static str {
        match self {
            Self::HttpClient(_) => "http_client",
            Self::Fetch { .. } | Self::FetchStatus { .. } => "fetch",
            Self::ParseMetadata { .. } => "metadata",
            Self::UnknownVersion { .. } => "version",
            Self::VerifyDigest { .. } => "digest",
            Self::Offline { .. } => "offline",
            Self::CustomJar { .. } => "jar",
            Self::Io { .. } => "io",
            Self::Eula => "eula",
            Self::RconPassword { .. } => "rcon",
            Self::Heap { .. } => "heap",
            Self::FindJava { .. } => "java",
        }
    }

    /// Whether trying again later may succeed without a change to the spec or the machine.
    pub fn is_transient(&self) -> bool {
        // I/O errors are mostly a full disk or a flaky volume; worth another try.
        matches!(self, Self::Fetch { .. } | Self::Offline { .. } | Self::Io { .. })
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}

/// A fresh, empty directory for one unit test, removed when the returned guard drops.
#[cfg(test)]
pub(crate) fn test_dir(name: &str) -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix(&format!("atlas-server-{name}-")).tempdir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_and_transient_errors_are_told_apart() {
        let fetch = ServerError::Fetch { url: "http://x".into(), reason: "connection refused".into() };
        let digest = ServerError::VerifyDigest {
            url: "http://x".into(),
            algorithm: "sha1",
            expected: "aa".into(),
            actual: "bb".into(),
        };
        assert!(fetch.is_transient());
        assert!(!digest.is_transient());
        assert!(!ServerError::Eula.is_transient());
        assert_eq!(digest.category(), "digest");
        let text = digest.to_string();
        assert!(text.contains("expected aa") && text.contains("got bb"), "{text}");
        assert!(!text.contains('\n'));
    }
}
