//! Readies everything a server start needs, while the old server (if any) keeps running: the jar,
//! `eula.txt`, `server.properties` with RCON, a matching Java, and the JVM command line.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::api::MinecraftServerSpec;
use crate::rcon::Rcon;
use crate::server::{self, BaseUrls, JavaSearch, Resolver, ServerError};

/// What preparation needs to know besides the spec.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// The server's data directory.
    pub data_dir: PathBuf,
    /// Download API base URLs.
    pub base_urls: BaseUrls,
    /// Where to look for Java installations.
    pub java: JavaSearch,
    /// The cgroup filesystem root the memory limit is read from.
    pub cgroup_root: PathBuf,
}

/// A server ready to start.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The full command line, program first.
    pub command: Vec<OsString>,
    /// RCON to the server once it runs.
    pub rcon: Rcon,
    /// The server software.
    pub server_type: String,
    /// The Minecraft version it resolved to.
    pub minecraft_version: String,
    /// `max-players` as written.
    pub max_players: u32,
    /// The spec this was prepared from.
    pub spec: MinecraftServerSpec,
}

impl Prepared {
    /// Whether running `new` instead of the prepared spec needs a restart.
    pub fn needs_restart_for(&self, new: &MinecraftServerSpec) -> bool {
        let old = &self.spec;
        old.eula != new.eula
            || old.server != new.server
            || old.pack != new.pack
            || old.jvm != new.jvm
            || old.properties != new.properties
            || old.rcon != new.rcon
    }
}

/// Preparation failed.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// Server software, files or Java.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The spec asks for something this build cannot do yet.
    #[error("{0}")]
    Unsupported(String),
}

impl PrepareError {
    /// A short static category.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Server(e) => e.category(),
            Self::Unsupported(_) => "unsupported",
        }
    }

    /// Whether waiting and trying again may help.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Server(e) => e.is_transient(),
            Self::Unsupported(_) => false,
        }
    }
}

/// Resolves, writes files and builds the command line for `spec`.
pub async fn prepare(spec: &MinecraftServerSpec, options: &PrepareOptions) -> Result<Prepared, PrepareError> {
    if spec.pack.is_some() {
        return Err(PrepareError::Unsupported(
            "spec.pack is not supported by this build yet (the pack engine is not built); remove spec.pack to run the plain server".into(),
        ));
    }
    let data_dir = &options.data_dir;
    let atlas = super::atlas_dir(data_dir);
    std::fs::create_dir_all(&atlas).map_err(|source| ServerError::io(&atlas, source))?;
    let resolver = Resolver::new(options.base_urls.clone(), super::atlas_dir(data_dir).join("cache/jars"))?;
    let resolved = resolver.resolve(&spec.server, data_dir).await?;
    server::write_eula(data_dir, spec.eula)?;

    let password = server::rcon_password(data_dir, spec.rcon.as_ref())?;
    let port = spec.rcon.as_ref().map_or(25575, |r| r.port);
    let runner_props = BTreeMap::from([
        ("enable-rcon".to_owned(), "true".to_owned()),
        ("rcon.port".to_owned(), port.to_string()),
        ("rcon.password".to_owned(), password.clone()),
        ("broadcast-rcon-to-ops".to_owned(), "false".to_owned()),
    ]);
    let written = server::write_properties(data_dir, &spec.properties, &runner_props)?;
    let max_players = written.get("max-players").and_then(|v| v.parse().ok()).unwrap_or(20);

    let java = server::find_java(resolved.java_major, &options.java)?;
    let limit = server::memory_limit(&options.cgroup_root);
    let command = server::jvm_command(&java.path, &resolved, spec.jvm.as_ref(), limit)?;
    Ok(Prepared {
        command,
        rcon: Rcon::new(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), password, Duration::from_secs(5)),
        server_type: resolved.kind.as_str().to_owned(),
        minecraft_version: resolved.minecraft_version,
        max_players,
        spec: spec.clone(),
    })
}
