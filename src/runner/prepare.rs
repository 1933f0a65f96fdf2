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
use crate::pack::source::{self, FetchOptions};
use crate::pack::{DataDirLock, PackVersion};
use crate::rcon::Rcon;
use crate::server::{self, BaseUrls, JavaSearch, Resolver, ServerError};

use super::Problem;

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
    /// The memory limit in bytes, when known from elsewhere than the cgroup files (the downward
    /// API in a pod); it wins over them.
    pub memory_limit: Option<u64>,
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
    /// The pack last rolled back because its server failed, with the version that failed: not
    /// applied again (by a crash restart or another spec change) until the spec names another pack,
    /// or its hub channel names another version.
    rolled_back: Arc<Mutex<Option<RolledBack>>>,
    /// Where the rollback is remembered across processes (`DATA/.atlas/held-pack.json`), if anywhere.
    record: Option<PathBuf>,
}

/// A pack spec rolled back after its server failed, and the version that failed.
type RolledBack = (PackSpec, Option<String>);

impl PackContext {
    /// The context of a runner holding `lock`.
    pub fn new(lock: Arc<DataDirLock>, metrics: PackMetrics) -> Self {
        Self { lock, metrics, rolled_back: Arc::default(), record: None }
    }

    /// The same context remembering its rollback in `data_dir` (`.atlas/held-pack.json`), so a new
    /// runner (a restarted pod) does not apply again the version whose server failed.
    pub fn remembering(mut self, data_dir: &std::path::Path) -> Self {
        let record = super::atlas_dir(data_dir).join("held-pack.json");
        match std::fs::read(&record) {
            Ok(bytes) => match serde_json::from_slice::<RolledBack>(&bytes) {
                Ok(held) => {
                    tracing::info!(
                        version = held.1.as_deref(),
                        "a pack version rolled back after its server failed is held"
                    );
                    if let Ok(mut r) = self.rolled_back.lock() {
                        *r = Some(held);
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %record.display(), "the held pack record does not parse ({e}); ignoring it")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %record.display(), "cannot read the held pack record ({e}); ignoring it"),
        }
        self.record = Some(record);
        self
    }

    /// Writes (or removes) the record of the rollback; a failure is logged, the hold then lasts as
    /// long as this process.
    fn save(&self, held: Option<&RolledBack>) {
        let Some(path) = &self.record else { return };
        let result = match held {
            Some(held) => serde_json::to_vec(held).map_err(std::io::Error::other).and_then(|bytes| {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(&tmp, path)
            }),
            None => match std::fs::remove_file(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
        };
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), "cannot record the held pack version: {e}");
        }
    }

    fn was_rolled_back(&self, pack: &PackSpec) -> bool {
        self.rolled_back.lock().is_ok_and(|r| r.as_ref().is_some_and(|(spec, _)| same_pack(Some(spec), Some(pack))))
    }

    fn set_rolled_back(&self, failed: Option<(&PackSpec, Option<&str>)>) {
        if let Ok(mut r) = self.rolled_back.lock() {
            let held = failed.map(|(pack, version)| (pack.clone(), version.map(str::to_owned)));
            if *r != held {
                self.save(held.as_ref());
            }
            *r = held;
        }
    }

    /// For an update check of `pack` that found `version`: false when that is the version rolled back
    /// after its server failed; otherwise true, and a rollback of `pack` is forgotten, since its
    /// channel has moved on from the version that failed.
    pub fn may_update_to(&self, pack: &PackSpec, version: &str) -> bool {
        let Ok(mut r) = self.rolled_back.lock() else { return false };
        match r.as_ref() {
            Some((spec, failed)) if same_pack(Some(spec), Some(pack)) => {
                if failed.as_deref() == Some(version) {
                    return false;
                }
                *r = None;
                self.save(None);
                true
            }
            _ => true,
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
    /// Why the data dir holds another pack version than the spec names (its source failed at a
    /// start, so the held version runs), when it does.
    pub pack_problem: Option<Problem>,
    /// Why a cached jar stands in for a download (the download API was unreachable), when one does.
    pub offline: Option<String>,
    /// The update this server is the new side of: when it fails (before ready, no ready in time, or
    /// a crash while settling), the update is undone and what ran before starts again.
    pub upgrade: Option<Box<Upgrade>>,
    /// The pack version this preparation swapped into the data dir, and the one before (for the
    /// PackApplied event), when it swapped one in.
    pub applied: Option<(Option<String>, String)>,
    /// What `spec.server` resolved to (jar, version, Java), reused while it does not change.
    pub resolved: Option<server::ResolvedServer>,
}

/// [`Upgrade::kind`] of a pack update.
pub const UPGRADE_PACK: &str = "pack";
/// [`Upgrade::kind`] of a Minecraft version change.
pub const UPGRADE_SERVER: &str = "server";

/// An update in progress, from what ran before to a new pack version or Minecraft version.
#[derive(Debug, Clone)]
pub struct Upgrade {
    /// `pack` or `server`.
    pub kind: &'static str,
    /// The version before (pack version, or Minecraft version).
    pub from: Option<String>,
    /// The version updated to.
    pub to: String,
    /// What ran before: started again when the update is undone.
    pub previous: Box<Prepared>,
    /// The backup taken for the update (`spec.backup.beforeUpdate`: for a pack, right before the old
    /// server stopped; for a Minecraft version, once it had stopped): the world it is restored from
    /// when the new server had touched the world.
    pub backup: Option<String>,
}

impl Upgrade {
    /// A change of Minecraft version from `from` to `to`, undone onto `previous` and, when the new
    /// server touched the world, the world of `backup`.
    pub fn server(from: String, to: String, previous: Box<Prepared>, backup: String) -> Box<Self> {
        Box::new(Self { kind: UPGRADE_SERVER, from: Some(from), to, previous, backup: Some(backup) })
    }
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
            || !same_rcon(old.rcon.as_ref(), new.rcon.as_ref())
    }

    /// Whether running `new` needs a restart for anything besides its pack.
    pub fn needs_restart_besides_pack(&self, new: &MinecraftServerSpec) -> bool {
        let mut same_pack = new.clone();
        same_pack.pack.clone_from(&self.spec.pack);
        self.needs_restart_for(&same_pack)
    }
}

/// Whether two RCON specs run the same: the port and the password file the runner reads. A new
/// `passwordSecretRef` the pod does not mount yet keeps the same file (agent/secrets.rs), which is
/// no reason to restart.
fn same_rcon(a: Option<&crate::api::RconSpec>, b: Option<&crate::api::RconSpec>) -> bool {
    let key = |r: Option<&crate::api::RconSpec>| r.map(|r| (r.port, r.password_file.clone()));
    match (a, b) {
        (Some(a), Some(b)) if a.password_file.is_none() && b.password_file.is_none() => a == b,
        _ => key(a) == key(b),
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
    /// The update was staged, but what it waited for no longer holds (`spec.pack.update`).
    #[error("the pack update was put off: {0}")]
    Deferred(String),
    /// An automatic update would change the Minecraft version with no backup to undo it with.
    #[error(
        "{0}: an automatic update that changes the Minecraft version needs spec.backup with beforeUpdate, so a failure can be undone"
    )]
    NeedsBackup(String),
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
            Self::Deferred(_) => "deferred",
            Self::NeedsBackup(_) => "needs_backup",
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
            // The next update check decides again.
            Self::Deferred(_) => true,
            Self::NeedsBackup(_) => false,
            Self::Pack(e) => e.is_transient(),
        }
    }
}

/// Applies the spec's pack (the server is not running), then resolves, writes files and builds the
/// command line for `spec`.
pub async fn prepare(spec: &MinecraftServerSpec, options: &PrepareOptions) -> Result<Prepared, PrepareError> {
    prepare_as(spec, options, None).await
}

/// [`prepare`], resolving `server` instead of `spec.server` when given (`latest` pinned to the
/// version the world last ran on, or the server that ran when a version change is refused); the
/// prepared spec is still `spec`.
pub(super) async fn prepare_as(
    spec: &MinecraftServerSpec,
    options: &PrepareOptions,
    server: Option<&crate::api::ServerSpec>,
) -> Result<Prepared, PrepareError> {
    let (mut pack_problem, mut applied) = (None, None);
    let pack_version = match (&spec.pack, &options.pack) {
        (Some(pack), Some(context)) if context.was_rolled_back(pack) => {
            tracing::warn!("spec.pack names the pack rolled back after its server failed; keeping the applied one");
            provision::current_version(&options.data_dir, context.lock.clone()).await?.map(|v| v.to_string())
        }
        (Some(pack), Some(context)) => {
            let fetch = FetchOptions::new(&options.data_dir);
            match provision::apply_spec(pack, &options.data_dir, context.lock.clone(), &fetch, &context.metrics).await {
                Ok(provisioned) => {
                    context.set_rolled_back(None);
                    if let provision::Provisioned::Applied { report, .. } = &provisioned {
                        applied = Some((report.from.as_ref().map(ToString::to_string), report.to.to_string()));
                    }
                    Some(provisioned.version().to_string())
                }
                // The spec's pack cannot be applied now (its source down, a bad new version) but the
                // data dir holds a version of the same pack: that one starts, so an installed server
                // never waits for the network, and the problem is reported.
                Err(e) => match provision::held(&options.data_dir, context.lock.clone()).await? {
                    Some((held, origin)) if origin.is_some() && origin == source::origin(&pack.source) => {
                        tracing::warn!(category = e.category(), version = %held, "{e}; starting the pack version the data dir holds");
                        pack_problem = Some(Problem {
                            reason: if e.is_transient() { "source_unreachable" } else { e.category() }.to_owned(),
                            message: crate::troubleshooting::with_pointer_for(
                                format!("{e}; running the pack version the data dir holds ({held})"),
                                &e,
                            ),
                        });
                        Some(held.to_string())
                    }
                    _ => return Err(e.into()),
                },
            }
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
    let mut prepared = prepare_server_as(spec, options, None, server).await?;
    prepared.pack_version = pack_version;
    prepared.pack_problem = pack_problem;
    prepared.applied = applied;
    Ok(prepared)
}

/// Whether `pack` follows a hub channel (no pinned version): what it names can change under the same spec.
pub(super) fn follows_channel(pack: &PackSpec) -> bool {
    matches!(pack.source.get(), Some(crate::api::PackSourceRef::Hub(_))) && pack.version.is_none()
}

/// Readies a spec change whose pack is unchanged (see [`pack_changes`]) while the old server runs.
pub async fn prepare_change(
    current: &Prepared,
    spec: &MinecraftServerSpec,
    options: &PrepareOptions,
) -> Result<Prepared, PrepareError> {
    // The same server spec runs the same jar: a property change does not ask the download APIs again
    // (nor moves `latest` to a newer Minecraft version behind the admin's back).
    let known = current.resolved.as_ref().filter(|_| current.spec.server == spec.server);
    let mut prepared = prepare_server_with(spec, options, known).await?;
    prepared.pack_version = current.pack_version.clone();
    prepared.pack_problem = current.pack_problem.clone();
    Ok(prepared)
}

/// Whether running `new` instead of `current` needs a pack update: its pack differs in more than
/// `update`, which says when updates run, not what the pack is.
pub fn pack_changes(current: &Prepared, new: &MinecraftServerSpec) -> bool {
    new.pack.is_some() && !same_pack(current.spec.pack.as_ref(), new.pack.as_ref())
}

/// Whether `new` differs from the spec `current` runs in `spec.pack.update` alone.
pub fn only_update_policy_changes(current: &Prepared, new: &MinecraftServerSpec) -> bool {
    current.spec.pack != new.pack
        && same_pack(current.spec.pack.as_ref(), new.pack.as_ref())
        && !current.needs_restart_besides_pack(new)
}

fn same_pack(a: Option<&PackSpec>, b: Option<&PackSpec>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.source == b.source && a.version == b.version && a.preserve == b.preserve,
        (a, b) => a.is_none() && b.is_none(),
    }
}

/// Asked once the new version is staged, before the backup and the stop: `Err(why)` puts the
/// update off with the server still running.
pub type Proceed<'a> = Box<dyn FnOnce(PackVersion) -> BoxFuture<'a, Result<(), String>> + Send + 'a>;

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
    /// not be prepared and the pack was rolled back; the store says the data dir holds the version
    /// the old server was prepared for. Start the old server again.
    Reverted {
        /// Why.
        error: PrepareError,
        /// What stopping the old server returned.
        stopped: X,
    },
    /// The server was stopped, the update failed, and the data dir does not hold (or the store
    /// cannot tell whether it holds) the version the old server was prepared for: start nothing.
    Held {
        /// Why, in one line.
        reason: String,
        /// What stopping the old server returned.
        stopped: X,
    },
}

/// A spec change with a new pack: fetch, stage, verify and plan while the old server runs, ask
/// `proceed` (an update check's conditions), then take `backup` (`spec.backup.beforeUpdate`; not
/// polled before, and an error calls the update off with the server still running), stop it
/// (`stop`, not polled before), swap, and prepare the new server. A pack that fails to fetch or
/// verify leaves the running server alone.
pub async fn update_pack<X: Send>(
    current: &Prepared,
    spec: &MinecraftServerSpec,
    options: &PrepareOptions,
    proceed: Option<Proceed<'_>>,
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
    // An update a check found (auto mode) is the one `proceed` is given for.
    let automatic = proceed.is_some();
    let (mut stopped, mut called_off, mut backed_up) = (None, None, None);
    let (stopped_slot, called_off_slot, backup_slot) = (&mut stopped, &mut called_off, &mut backed_up);
    let gate: provision::Gate<'_> = Box::new(move |to: PackVersion| {
        Box::pin(async move {
            if let Some(proceed) = proceed
                && let Err(why) = proceed(to.clone()).await
            {
                *called_off_slot = Some(PrepareError::Deferred(why));
                return false;
            }
            if let Some(backup) = backup {
                tracing::info!(to = %to, "pack staged; backing the world up before the update");
                match backup.await {
                    Ok(name) => {
                        tracing::info!(backup = %name, "backed up before the pack update");
                        *backup_slot = Some(name);
                    }
                    Err(e) => {
                        *called_off_slot = Some(PrepareError::BackupBeforeUpdate(e));
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
        if let Some(e) = called_off {
            return PackUpdate::Untouched(Some(e));
        }
        return match result {
            Ok(_) => PackUpdate::Untouched(None),
            Err(e) => PackUpdate::Untouched(Some(e.into())),
        };
    };
    let to = match result {
        Ok(provisioned) => provisioned.version().clone(),
        // The gate ran, so the server is stopped and the swap failed: undone, or not (a failed undo,
        // a dead task), which only the store can tell.
        Err(e) => return reverted_or_held(current, options, context, e.into(), stopped).await,
    };
    context.set_rolled_back(None);
    let prepared = prepare_server(spec, options).await.and_then(|next| {
        // A pack that moves the Minecraft version cannot be undone once the new server touched the
        // world, unless a backup was taken first: an automatic update must have one.
        if automatic && backed_up.is_none() && next.minecraft_version != current.minecraft_version {
            return Err(PrepareError::NeedsBackup(format!(
                "pack {to} moves Minecraft from {} to {}",
                current.minecraft_version, next.minecraft_version
            )));
        }
        Ok(next)
    });
    match prepared {
        Ok(mut next) => {
            next.pack_version = Some(to.to_string());
            next.upgrade = Some(Box::new(Upgrade {
                kind: UPGRADE_PACK,
                from: current.pack_version.clone(),
                to: to.to_string(),
                previous: fallback_of(current),
                backup: backed_up,
            }));
            PackUpdate::Ready { next: Box::new(next), stopped }
        }
        Err(error) => {
            tracing::error!(category = error.category(), to = %to, "{error}; rolling the pack back");
            let back_to = current.pack_version.as_deref();
            // A transient error (a jar download's network) says nothing against the pack: it is
            // rolled back for now and may be tried again. Only a permanent one marks it failed.
            let failed = if error.is_transient() { None } else { spec.pack.as_ref() };
            let failed = failed.map(|pack| (pack, Some(to.as_str())));
            if let Err(e) = roll_back_pack(options, error.category(), failed, back_to).await {
                return reverted_or_held(current, options, context, e, stopped).await;
            }
            reverted_or_held(current, options, context, error, stopped).await
        }
    }
}

/// After the old server was stopped for an update that failed: [`PackUpdate::Reverted`] only when
/// the store (opened afresh, which finishes or undoes a swap its journal left) holds the version
/// `current` was prepared for; the old server must not start on any other.
async fn reverted_or_held<X>(
    current: &Prepared,
    options: &PrepareOptions,
    context: &PackContext,
    error: PrepareError,
    stopped: X,
) -> PackUpdate<X> {
    match check_holds(options, context, current.pack_version.as_deref()).await {
        Ok(()) => PackUpdate::Reverted { error, stopped },
        Err(held) => PackUpdate::Held { reason: format!("{error}; {held}"), stopped },
    }
}

/// Whether the data dir holds pack version `expected` (none: no pack), with a one-line reason when
/// it does not or cannot be told.
async fn check_holds(options: &PrepareOptions, context: &PackContext, expected: Option<&str>) -> Result<(), String> {
    let show = |v: Option<&str>| v.map_or_else(|| "no pack".to_owned(), |v| format!("pack {v}"));
    match provision::current_version(&options.data_dir, context.lock.clone()).await {
        Ok(found) if found.as_ref().map(PackVersion::as_str) == expected => Ok(()),
        Ok(found) => Err(format!(
            "the data dir holds {} but the old server was prepared for {}; not starting a server",
            show(found.as_ref().map(PackVersion::as_str)),
            show(expected)
        )),
        Err(e) => {
            Err(format!("the pack store cannot say which version the data dir holds ({e}); not starting a server"))
        }
    }
}

/// What a server of a new pack version falls back to: `current` alone. Its own fallback (the
/// version before it) is dropped: the store keeps one previous version, and a rollback from the
/// new version goes to `current`'s, so a second step back would run one version's command on
/// another's files.
pub(super) fn fallback_of(current: &Prepared) -> Box<Prepared> {
    Box::new(Prepared { upgrade: None, applied: None, ..current.clone() })
}

/// Returns the data dir to the previous pack version (the server is stopped), counting why in
/// `atlas_pack_rollbacks_total`. `failed` (the spec's pack that failed, and the version it failed
/// at) is not applied again until the spec names another pack or its channel another version. `back_to` is the pack version of the server started afterwards: a
/// store keeping another previous version is refused, not rolled back.
pub async fn roll_back_pack(
    options: &PrepareOptions,
    reason: &str,
    failed: Option<(&PackSpec, Option<&str>)>,
    back_to: Option<&str>,
) -> Result<(), PrepareError> {
    let Some(context) = &options.pack else { return Ok(()) };
    context.metrics.rollbacks.with_label_values(&[reason]).inc();
    context.set_rolled_back(failed);
    let report = provision::rollback(&options.data_dir, context.lock.clone(), back_to, &context.metrics).await?;
    tracing::warn!(from = ?report.from.as_ref().map(PackVersion::as_str), to = %report.to, reason, "pack rolled back");
    Ok(())
}

/// Resolves, writes files and builds the command line for `spec`; the pack is left as it is.
async fn prepare_server(spec: &MinecraftServerSpec, options: &PrepareOptions) -> Result<Prepared, PrepareError> {
    prepare_server_with(spec, options, None).await
}

/// [`prepare_server`], taking `known` (what the running server's unchanged `spec.server` resolved
/// to) instead of asking the download APIs again while its jar is still there.
async fn prepare_server_with(
    spec: &MinecraftServerSpec,
    options: &PrepareOptions,
    known: Option<&server::ResolvedServer>,
) -> Result<Prepared, PrepareError> {
    prepare_server_as(spec, options, known, None).await
}

/// [`prepare_server_with`], resolving `server` instead of `spec.server` when given.
pub(super) async fn prepare_server_as(
    spec: &MinecraftServerSpec,
    options: &PrepareOptions,
    known: Option<&server::ResolvedServer>,
    server: Option<&crate::api::ServerSpec>,
) -> Result<Prepared, PrepareError> {
    let data_dir = &options.data_dir;
    let atlas = super::atlas_dir(data_dir);
    std::fs::create_dir_all(&atlas).map_err(|source| ServerError::io(&atlas, source))?;
    let resolved = match known.filter(|known| known.jar.is_file()) {
        Some(known) => known.clone(),
        None => {
            let resolver = Resolver::new(options.base_urls.clone(), super::atlas_dir(data_dir).join("cache/jars"))?;
            resolver.resolve(server.unwrap_or(&spec.server), data_dir).await?
        }
    };
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
    // The pod's limit from the downward API, else the cgroup's (a nested cgroup may not show it).
    let limit = options.memory_limit.unwrap_or_else(|| server::memory_limit(&options.cgroup_root));
    let command = server::jvm_command(&java.path, &resolved, spec.jvm.as_ref(), limit)?;
    Ok(Prepared {
        command,
        rcon: Rcon::new(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), password, Duration::from_secs(5)),
        server_type: resolved.kind.as_str().to_owned(),
        minecraft_version: resolved.minecraft_version.clone(),
        max_players,
        spec: spec.clone(),
        pack_version: None,
        pack_problem: None,
        offline: resolved.offline.clone(),
        upgrade: None,
        applied: None,
        resolved: Some(resolved),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::pack::build::{BuildOptions, build};
    use crate::pack::{Limits, PackStore, Preserve, lock, lock_path};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// Applies a one-file pack of each version, in order, to `data`.
    fn apply_versions(data: &Path, held: &DataDirLock, versions: &[&str]) -> TestResult {
        let work = tempfile::tempdir()?;
        let (mut store, _) = PackStore::open(data, held)?;
        for version in versions {
            let src = work.path().join(version);
            std::fs::create_dir_all(src.join("mods"))?;
            std::fs::write(src.join("mods/a.jar"), version.as_bytes())?;
            let archive = work.path().join(format!("{version}.tar.zst"));
            build(&src, &archive, &BuildOptions::new(PackVersion::new(version)?))?;
            let staged = store.stage(&archive, crate::pack::ArchiveFormat::TarZst, None, &Limits::default())?;
            store.apply(staged, &Preserve::none())?;
        }
        Ok(())
    }

    fn options(data: &Path, held: Arc<DataDirLock>) -> Result<PrepareOptions, Box<dyn std::error::Error>> {
        let metrics = PackMetrics::register(&prometheus::Registry::new())?;
        Ok(PrepareOptions {
            data_dir: data.to_owned(),
            base_urls: BaseUrls::default(),
            java: JavaSearch::default(),
            cgroup_root: data.join("no-cgroup"),
            memory_limit: None,
            pack: Some(PackContext::new(held, metrics)),
        })
    }

    fn prepared_for(pack_version: Option<&str>) -> Result<Prepared, Box<dyn std::error::Error>> {
        let spec =
            super::super::parse_spec(Path::new("s.yaml"), "eula: true\nserver: {type: vanilla, version: '1.21.4'}\n")?;
        Ok(Prepared {
            command: Vec::new(),
            rcon: Rcon::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 25575)), String::new(), Duration::from_secs(1)),
            server_type: "vanilla".into(),
            minecraft_version: "1.21.4".into(),
            max_players: 20,
            spec,
            pack_version: pack_version.map(str::to_owned),
            pack_problem: None,
            offline: None,
            upgrade: None,
            applied: None,
            resolved: None,
        })
    }

    fn failed() -> PrepareError {
        PrepareError::Unsupported("the swap failed".into())
    }

    #[tokio::test]
    async fn a_failed_update_leaving_another_version_holds_instead_of_starting_the_old_server() -> TestResult {
        let data = tempfile::tempdir()?;
        std::fs::create_dir_all(data.path().join(".atlas"))?;
        let held = Arc::new(lock(&lock_path(data.path()))?);
        // The update to 2.0.0 failed after the gate yet left 2.0.0 in the data dir.
        apply_versions(data.path(), &held, &["1.0.0", "2.0.0"])?;
        let options = options(data.path(), held)?;
        let context = options.pack.clone().ok_or("no pack context")?;
        let old = prepared_for(Some("1.0.0"))?;
        let outcome = reverted_or_held(&old, &options, &context, failed(), ()).await;
        let PackUpdate::Held { reason, .. } = outcome else {
            return Err(format!("the old server would start on the new version: {outcome:?}").into());
        };
        assert!(reason.contains("pack 2.0.0") && reason.contains("pack 1.0.0"), "{reason}");
        assert!(!reason.contains('\n'), "{reason}");
        // Where the data dir does hold the old server's version, the old server starts again.
        let current = prepared_for(Some("2.0.0"))?;
        let outcome = reverted_or_held(&current, &options, &context, failed(), ()).await;
        assert!(matches!(outcome, PackUpdate::Reverted { .. }), "{outcome:?}");
        Ok(())
    }

    #[test]
    fn a_new_versions_fallback_does_not_carry_the_one_before_it() -> TestResult {
        let mut v2 = prepared_for(Some("2.0.0"))?;
        v2.upgrade = Some(Box::new(Upgrade {
            kind: UPGRADE_PACK,
            from: Some("1.0.0".into()),
            to: "2.0.0".into(),
            previous: Box::new(prepared_for(Some("1.0.0"))?),
            backup: None,
        }));
        let fallback = fallback_of(&v2);
        assert_eq!(fallback.pack_version.as_deref(), Some("2.0.0"));
        assert!(fallback.upgrade.is_none(), "the fallback chain reaches {:?}", fallback.upgrade);
        Ok(())
    }

    #[tokio::test]
    async fn a_rollback_to_another_version_than_the_stores_previous_is_refused() -> TestResult {
        let data = tempfile::tempdir()?;
        std::fs::create_dir_all(data.path().join(".atlas"))?;
        let held = Arc::new(lock(&lock_path(data.path()))?);
        apply_versions(data.path(), &held, &["1.0.0", "2.0.0", "3.0.0"])?;
        let options = options(data.path(), Arc::clone(&held))?;
        let refused = roll_back_pack(&options, "crash", None, Some("1.0.0")).await;
        assert!(matches!(refused, Err(PrepareError::Pack(ProvisionError::RollbackTarget { .. }))), "{refused:?}");
        assert_eq!(
            provision::current_version(data.path(), Arc::clone(&held)).await?.map(|v| v.to_string()).as_deref(),
            Some("3.0.0")
        );
        roll_back_pack(&options, "crash", None, Some("2.0.0")).await?;
        assert_eq!(
            provision::current_version(data.path(), held).await?.map(|v| v.to_string()).as_deref(),
            Some("2.0.0")
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_transient_error_after_the_swap_rolls_back_without_marking_the_pack_failed() -> TestResult {
        use sha2::Digest as _;
        let data = tempfile::tempdir()?;
        std::fs::create_dir_all(data.path().join(".atlas"))?;
        let held = Arc::new(lock(&lock_path(data.path()))?);
        apply_versions(data.path(), &held, &["1.0.0"])?;
        // Version 2.0.0, served from loopback.
        let work = tempfile::tempdir()?;
        std::fs::create_dir_all(work.path().join("src/mods"))?;
        std::fs::write(work.path().join("src/mods/a.jar"), b"2.0.0")?;
        let archive = work.path().join("2.0.0.tar.zst");
        build(&work.path().join("src"), &archive, &BuildOptions::new(PackVersion::new("2.0.0")?))?;
        let blob = std::fs::read(&archive)?;
        let sha256 = hex::encode(sha2::Sha256::digest(&blob));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let router = axum::Router::new().route("/2.0.0.tar.zst", axum::routing::get(move || async move { blob }));
        tokio::spawn(async move { axum::serve(listener, router).await });
        // The new server's jar cannot be resolved: its API is down (a network error).
        let mut options = options(data.path(), Arc::clone(&held))?;
        options.base_urls.mojang_manifest = "http://127.0.0.1:9/version_manifest_v2.json".into();
        let text = format!(
            "eula: true\nserver: {{type: vanilla, version: '1.21.4'}}\npack:\n  source:\n    url: {{url: 'http://{addr}/2.0.0.tar.zst', sha256: '{sha256}'}}\n"
        );
        let spec = super::super::parse_spec(Path::new("s.yaml"), &text)?;
        let old = prepared_for(Some("1.0.0"))?;
        let outcome = update_pack(&old, &spec, &options, None, None, Box::pin(async {})).await;
        let PackUpdate::Reverted { error, .. } = outcome else {
            return Err(format!("expected the old server back: {outcome:?}").into());
        };
        assert!(error.is_transient(), "{error}");
        let current = provision::current_version(data.path(), held).await?;
        assert_eq!(current.as_ref().map(PackVersion::as_str), Some("1.0.0"));
        // The pack is not held against: the retry applies it again.
        let context = options.pack.as_ref().ok_or("no pack context")?;
        assert!(!context.was_rolled_back(spec.pack.as_ref().ok_or("no pack")?));
        Ok(())
    }

    #[test]
    fn a_rollback_is_remembered_by_the_next_runner_on_the_data_dir() -> TestResult {
        let data = tempfile::tempdir()?;
        std::fs::create_dir_all(data.path().join(".atlas"))?;
        let text = "eula: true\nserver: {type: vanilla, version: '1.21.4'}\npack:\n  source:\n    hub: {url: 'http://127.0.0.1:9', pack: p, channel: stable}\n";
        let spec = super::super::parse_spec(Path::new("s.yaml"), text)?;
        let pack = spec.pack.as_ref().ok_or("no pack")?;
        let context = |held: Arc<DataDirLock>| -> Result<PackContext, Box<dyn std::error::Error>> {
            let metrics = PackMetrics::register(&prometheus::Registry::new())?;
            Ok(PackContext::new(held, metrics).remembering(data.path()))
        };
        let held = Arc::new(lock(&lock_path(data.path()))?);
        context(Arc::clone(&held))?.set_rolled_back(Some((pack, Some("2.0.0"))));
        // A new process (a restarted pod) holds the same.
        let next = context(Arc::clone(&held))?;
        assert!(next.was_rolled_back(pack));
        assert!(!next.may_update_to(pack, "2.0.0"));
        // The channel moves on: forgotten, by the next process too.
        assert!(next.may_update_to(pack, "3.0.0"));
        assert!(!context(held)?.was_rolled_back(pack));
        Ok(())
    }

    #[test]
    fn a_rollback_holds_only_until_the_channel_names_another_version() -> TestResult {
        let data = tempfile::tempdir()?;
        std::fs::create_dir_all(data.path().join(".atlas"))?;
        let held = Arc::new(lock(&lock_path(data.path()))?);
        let options = options(data.path(), held)?;
        let context = options.pack.as_ref().ok_or("no pack context")?;
        let text = "eula: true\nserver: {type: vanilla, version: '1.21.4'}\npack:\n  source:\n    hub: {url: 'http://127.0.0.1:9', pack: p, channel: stable}\n";
        let spec = super::super::parse_spec(Path::new("s.yaml"), text)?;
        let pack = spec.pack.as_ref().ok_or("no pack")?;
        context.set_rolled_back(Some((pack, Some("2.0.0"))));
        assert!(!context.may_update_to(pack, "2.0.0"), "the version that failed is applied again");
        assert!(context.was_rolled_back(pack));
        assert!(context.may_update_to(pack, "3.0.0"));
        assert!(!context.was_rolled_back(pack), "the channel moved on, the rollback is forgotten");
        Ok(())
    }
}
