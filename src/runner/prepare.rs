//! Readies everything a server start needs, while the old server (if any) keeps running: the
//! spec's pack, the jar, `eula.txt`, `server.properties` with RCON, a matching Java, and the JVM
//! command line. A pack update is fetched, staged and verified while the old server runs; the
//! server is stopped only for the swap ([`update_pack`]).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;

use crate::api::{MinecraftServerSpec, PackSpec};
use crate::metrics::PackMetrics;
use crate::pack::provision::{self, ProvisionError};
use crate::pack::source::FetchOptions;
use crate::pack::{DataDirLock, PackVersion};
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
    /// What applying `spec.pack` needs; `None` refuses a spec with a pack.
    pub pack: Option<PackContext>,
}

/// The pack engine's share of the runner: the data dir's lock (which the runner holds for its
/// whole life) and the pack metrics served on its `/metrics`.
#[derive(Debug, Clone)]
pub struct PackContext {
    /// The data dir's lock.
    pub lock: Arc<DataDirLock>,
    /// The pack metrics.
    pub metrics: PackMetrics,
    /// The pack last rolled back because its server failed: not applied again (by a crash restart
    /// or another spec change) until the spec names another pack.
    rolled_back: Arc<Mutex<Option<PackSpec>>>,
}

impl PackContext {
    /// The context of a runner holding `lock`.
    pub fn new(lock: Arc<DataDirLock>, metrics: PackMetrics) -> Self {
        Self { lock, metrics, rolled_back: Arc::default() }
    }

    fn was_rolled_back(&self, pack: &PackSpec) -> bool {
        self.rolled_back.lock().is_ok_and(|r| r.as_ref() == Some(pack))
    }

    fn set_rolled_back(&self, pack: Option<&PackSpec>) {
        if let Ok(mut r) = self.rolled_back.lock() {
            *r = pack.cloned();
        }
    }
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
    /// The pack version the data dir holds.
    pub pack_version: Option<String>,
    /// What ran before a pack update: when this server fails before it is ready, the pack is
    /// rolled back and that one is started again.
    pub fallback: Option<Box<Prepared>>,
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
    /// `spec.backup.beforeUpdate` is set and that backup failed.
    #[error("the backup before the pack update failed: {0}")]
    BackupBeforeUpdate(String),
    /// Fetching, verifying or applying the pack failed; the data dir holds the version it held.
    #[error("pack: {0}")]
    Pack(#[from] ProvisionError),
}

impl PrepareError {
    /// A short static category.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Server(e) => e.category(),
            Self::Unsupported(_) => "unsupported",
            Self::BackupBeforeUpdate(_) => "backup",
            Self::Pack(e) => e.category(),
        }
    }

    /// Whether waiting and trying again may help.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Server(e) => e.is_transient(),
            Self::Unsupported(_) => false,
            // A store that was down may be back: the update is tried again later.
            Self::BackupBeforeUpdate(_) => true,
            Self::Pack(e) => e.is_transient(),
        }
    }
}

/// Applies the spec's pack (the server is not running), then resolves, writes files and builds the
/// command line for `spec`.
pub async fn prepare(spec: &MinecraftServerSpec, options: &PrepareOptions) -> Result<Prepared, PrepareError> {
    let pack_version = match (&spec.pack, &options.pack) {
        (Some(pack), Some(context)) if context.was_rolled_back(pack) => {
            tracing::warn!("spec.pack names the pack rolled back after its server failed; keeping the applied one");
            provision::current_version(&options.data_dir, context.lock.clone()).await?.map(|v| v.to_string())
        }
        (Some(pack), Some(context)) => {
            let fetch = FetchOptions::new(&options.data_dir);
            let provisioned =
                provision::apply_spec(pack, &options.data_dir, context.lock.clone(), &fetch, &context.metrics).await?;
            context.set_rolled_back(None);
            Some(provisioned.version().to_string())
        }
        (Some(_), None) => {
            return Err(PrepareError::Unsupported("spec.pack needs a runner that holds the data dir's lock".into()));
        }
        // No pack in the spec: a pack applied earlier stays as it is.
        (None, Some(context)) => {
            provision::current_version(&options.data_dir, context.lock.clone()).await?.map(|v| v.to_string())
        }
        (None, None) => None,
    };
    let mut prepared = prepare_server(spec, options).await?;
    prepared.pack_version = pack_version;
    Ok(prepared)
}

/// Readies a spec change whose pack is unchanged (see [`pack_changes`]) while the old server runs.
pub async fn prepare_change(
    current: &Prepared,
    spec: &MinecraftServerSpec,
    options: &PrepareOptions,
) -> Result<Prepared, PrepareError> {
    let mut prepared = prepare_server(spec, options).await?;
    prepared.pack_version = current.pack_version.clone();
    Ok(prepared)
}

/// Whether running `new` instead of `current` needs a pack update.
pub fn pack_changes(current: &Prepared, new: &MinecraftServerSpec) -> bool {
    new.pack.is_some() && current.spec.pack != new.pack
}

/// What [`update_pack`] did.
#[derive(Debug)]
pub enum PackUpdate<X> {
    /// The server was not touched: the pack was refused before the swap (the error), or the data
    /// dir already holds it (none; the change is then prepared like any other).
    Untouched(Option<PrepareError>),
    /// The server was stopped (what the stop returned), the new version swapped in and its server
    /// prepared, with the old one as its fallback: start it.
    Ready {
        /// The server to start.
        next: Box<Prepared>,
        /// What stopping the old server returned.
        stopped: X,
    },
    /// The server was stopped but the update failed: the swap was undone, or the new server could
    /// not be prepared and the pack was rolled back. Start the old server again.
    Reverted {
        /// Why.
        error: PrepareError,
        /// What stopping the old server returned.
        stopped: X,
    },
}

/// A spec change with a new pack: fetch, stage, verify and plan while the old server runs, then
/// take `backup` (`spec.backup.beforeUpdate`; not polled before, and an error calls the update off
/// with the server still running), stop it (`stop`, not polled before), swap, and prepare the new
/// server. A pack that fails to fetch or verify leaves the running server alone.
pub async fn update_pack<X: Send>(
    current: &Prepared,
    spec: &MinecraftServerSpec,
    options: &PrepareOptions,
    backup: Option<BoxFuture<'_, Result<String, String>>>,
    stop: BoxFuture<'_, X>,
) -> PackUpdate<X> {
    let (Some(pack), Some(context)) = (&spec.pack, &options.pack) else {
        return PackUpdate::Untouched(Some(PrepareError::Unsupported(
            "spec.pack needs a runner that holds the data dir's lock".into(),
        )));
    };
    if context.was_rolled_back(pack) {
        tracing::warn!("spec.pack names the pack rolled back after its server failed; keeping the applied one");
        return PackUpdate::Untouched(None);
    }
    let fetch = FetchOptions::new(&options.data_dir);
    let (mut stopped, mut backup_failed) = (None, None);
    let (stopped_slot, failed_slot) = (&mut stopped, &mut backup_failed);
    let gate: provision::Gate<'_> = Box::new(move |to: PackVersion| {
        Box::pin(async move {
            if let Some(backup) = backup {
                tracing::info!(to = %to, "pack staged; backing the world up before the update");
                match backup.await {
                    Ok(name) => tracing::info!(backup = %name, "backed up before the pack update"),
                    Err(e) => {
                        *failed_slot = Some(e);
                        return false;
                    }
                }
            }
            tracing::info!(from = current.pack_version.as_deref(), to = %to, "pack staged; stopping the server for the swap");
            *stopped_slot = Some(stop.await);
            true
        })
    });
    let result =
        provision::apply_spec_gated(pack, &options.data_dir, context.lock.clone(), &fetch, &context.metrics, gate)
            .await;
    let Some(stopped) = stopped else {
        if let Some(e) = backup_failed {
            return PackUpdate::Untouched(Some(PrepareError::BackupBeforeUpdate(e)));
        }
        return match result {
            Ok(_) => PackUpdate::Untouched(None),
            Err(e) => PackUpdate::Untouched(Some(e.into())),
        };
    };
    let to = match result {
        Ok(provisioned) => provisioned.version().clone(),
        // The gate ran, so the plan was made: the swap failed, and was undone.
        Err(e) => return PackUpdate::Reverted { error: e.into(), stopped },
    };
    context.set_rolled_back(None);
    match prepare_server(spec, options).await {
        Ok(mut next) => {
            next.pack_version = Some(to.to_string());
            next.fallback = Some(Box::new(current.clone()));
            PackUpdate::Ready { next: Box::new(next), stopped }
        }
        Err(error) => {
            tracing::error!(category = error.category(), to = %to, "{error}; rolling the pack back");
            if let Err(e) = roll_back_pack(options, error.category(), spec.pack.as_ref()).await {
                return PackUpdate::Reverted { error: e, stopped };
            }
            PackUpdate::Reverted { error, stopped }
        }
    }
}

/// Returns the data dir to the previous pack version (the server is stopped), counting why in
/// `atlas_pack_rollbacks_total`. `failed` (the spec's pack that failed) is not applied again until
/// the spec names another pack.
pub async fn roll_back_pack(
    options: &PrepareOptions,
    reason: &str,
    failed: Option<&PackSpec>,
) -> Result<(), PrepareError> {
    let Some(context) = &options.pack else { return Ok(()) };
    context.metrics.rollbacks.with_label_values(&[reason]).inc();
    context.set_rolled_back(failed);
    let report = provision::rollback(&options.data_dir, context.lock.clone(), &context.metrics).await?;
    tracing::warn!(from = ?report.from.as_ref().map(PackVersion::as_str), to = %report.to, reason, "pack rolled back");
    Ok(())
}

/// Resolves, writes files and builds the command line for `spec`; the pack is left as it is.
async fn prepare_server(spec: &MinecraftServerSpec, options: &PrepareOptions) -> Result<Prepared, PrepareError> {
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
        pack_version: None,
        fallback: None,
    })
}
