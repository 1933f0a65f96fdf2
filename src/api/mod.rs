//! The `MinecraftServer` resource (group `atlas.dev`, version `v1alpha1`): spec, status, conditions.
//!
//! These types are user documentation: every `///` becomes `kubectl explain` text. Rules the API server
//! can judge are written here as schema constraints and CEL rules, so a bad spec is refused at
//! `kubectl apply` time; what only the runner can judge becomes a condition. No I/O lives here.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of Atlas Runner's resources.
pub const GROUP: &str = "atlas.dev";

/// A Minecraft server: what runs, the pack provisioned into its volume, how its JVM is sized, how its
/// world is backed up, and how it is exposed. The operator turns it into a StatefulSet with a volume;
/// the standalone runner (`atlas-runner run --spec FILE`) reads the same document from a file.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "atlas.dev",
    version = "v1alpha1",
    kind = "MinecraftServer",
    plural = "minecraftservers",
    shortname = "mcs",
    category = "atlas",
    category = "all",
    namespaced,
    status = "MinecraftServerStatus",
    derive = "PartialEq",
    doc = "A Minecraft server run by Atlas Runner: its software, pack, JVM, backups and exposure.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Lifecycle phase"),
    printcolumn(name = "Server", type_ = "string", json_path = ".status.serverVersion", description = "Running Minecraft version"),
    printcolumn(name = "Pack", type_ = "string", json_path = ".status.packVersion", description = "Applied pack version"),
    printcolumn(name = "Players", type_ = "integer", json_path = ".status.players.online", description = "Players online"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    // Pod names carry a controller-revision-hash label built from the StatefulSet name; Kubernetes
    // caps label values at 63 characters, which leaves 52 for the name.
    validation = Rule::new("size(self.metadata.name) <= 52").message("metadata.name must be at most 52 characters (it names a StatefulSet)")
)]
#[x_kube(validation = Rule::new("!has(oldSelf.storage) || has(self.storage)").message("spec.storage cannot be removed once set: the volume would be replaced").field_path(".storage"))]
#[serde(rename_all = "camelCase")]
pub struct MinecraftServerSpec {
    /// Acceptance of the Minecraft EULA (https://aka.ms/MinecraftEULA). Must be true: accepting it is
    /// the server operator's decision, so Atlas Runner never writes `eula=true` on its own.
    #[x_kube(validation = Rule::new("self == true").message("spec.eula must be true: set it to accept the Minecraft EULA (https://aka.ms/MinecraftEULA)"))]
    pub eula: bool,

    /// What server software runs, and which Minecraft version.
    pub server: ServerSpec,

    /// Files provisioned into the data directory from a versioned pack (mods, plugins, configs,
    /// datapacks, a server jar). Omit to run the plain server software.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack: Option<PackSpec>,

    /// How the JVM is sized and tuned. Omitted: 70% of the memory limit, Aikar's flags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jvm: Option<JvmSpec>,

    /// Entries merged into `server.properties`; these win over the file, other keys in the file are
    /// kept. RCON settings are the runner's and cannot be set here (use `spec.rcon`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = Rule::new("self.all(k, !(k in ['enable-rcon', 'rcon.port', 'rcon.password']))").message("spec.properties cannot set enable-rcon, rcon.port or rcon.password: the runner owns RCON; use spec.rcon"))]
    #[schemars(extend("maxProperties" = 256))]
    pub properties: BTreeMap<String, String>,

    /// RCON, which the runner uses for graceful stops, consistent backups and player counts. Always
    /// enabled; the password is generated when none is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rcon: Option<RconSpec>,

    /// Scheduled, consistent world backups to object storage or a local directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,

    /// Operator only: when true the server is stopped gracefully and scaled to zero; its volume is kept.
    #[serde(default)]
    pub paused: bool,

    /// Operator only: CPU and memory requests and limits of the server container. The memory limit
    /// is what `jvm.heapPercent` is a percentage of. Without a memory limit the operator sets one:
    /// the memory request when there is one, else room for a fixed `jvm.heap`, else 3Gi (with a 2Gi
    /// request), so the heap is never sized from the whole node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Operator only: the persistent volume holding the data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageSpec>,

    /// Operator only: how the game port is exposed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceSpec>,

    /// Operator only: when the operator may replace the server's pod after what the pod runs
    /// changed (a new Atlas Runner image after `helm upgrade`, new resources, another Secret). The
    /// pod is replaced only then; until then the server keeps running and the `UpgradePending`
    /// condition says what it waits for. Omitted: as soon as no player is online, at any time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<UpgradePolicy>,
}

/// What server software runs.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[x_kube(validation = Rule::new("self.type != 'custom' || has(self.jar)").message("spec.server.jar is required when spec.server.type is custom").field_path(".jar"))]
#[x_kube(validation = Rule::new("self.type == 'custom' || !has(self.jar)").message("spec.server.jar is only allowed when spec.server.type is custom").field_path(".jar"))]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// The server software: `vanilla` (Mojang), `paper` (PaperMC), `fabric` (Fabric's server
    /// launcher) or `custom` (a jar the pack ships, named by `jar`).
    #[serde(rename = "type")]
    pub kind: ServerType,

    /// A Minecraft version as Mojang names it (`1.21.4`, `26.2`, `26.3-snapshot-9`), or `latest` for
    /// the newest release.
    #[serde(default = "latest")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^(latest|[0-9A-Za-z][0-9A-Za-z._+-]*)$"))]
    pub version: String,

    /// Custom only: the server jar's path relative to the data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.matches('(^|/)\\\\.\\\\.(/|$)')").message("spec.server.jar must be a relative path inside the data directory (no leading / and no ..)"))]
    pub jar: Option<String>,
}

fn latest() -> String {
    "latest".to_owned()
}

/// Server software.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ServerType {
    /// Mojang's server, resolved from the version manifest.
    Vanilla,
    /// PaperMC's server, resolved from PaperMC's downloads API.
    Paper,
    /// Fabric's server launcher, resolved from Fabric's meta API.
    Fabric,
    /// A jar shipped by the pack or placed in the data directory.
    Custom,
}

impl ServerType {
    /// The name as the spec spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vanilla => "vanilla",
            Self::Paper => "paper",
            Self::Fabric => "fabric",
            Self::Custom => "custom",
        }
    }
}

/// A versioned pack of server files and how it is kept up to date.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PackSpec {
    /// Where the pack comes from: exactly one of `hub`, `url` or `mrpack`.
    pub source: PackSource,

    /// Pin to this pack version. Omitted: a hub source follows its channel; an archive with an
    /// `atlas-pack.json`, or an `.mrpack`, is the version it names; a url archive without one is
    /// `sha256-` and the first 12 hex digits of its sha256 (`sha256-9f86d081884c`), so a new digest
    /// is a new version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub version: Option<String>,

    /// Globs (relative to the data directory, `**` for any depth) of pack files the user may edit:
    /// written when first provisioned, never overwritten by an update.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 512)))]
    #[x_kube(validation = Rule::new("self.all(g, !g.startsWith('/') && !g.matches('(^|/)\\\\.\\\\.(/|$)'))").message("spec.pack.preserve globs must be relative to the data directory (no leading / and no ..)"))]
    pub preserve: Vec<String>,

    /// When and how new pack versions are applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdatePolicy>,
}

/// Where a pack comes from. Exactly one member is set.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[x_kube(validation = Rule::new("[has(self.hub), has(self.url), has(self.mrpack)].filter(x, x).size() == 1").message("spec.pack.source must set exactly one of hub, url or mrpack"))]
#[serde(rename_all = "camelCase")]
pub struct PackSource {
    /// A pack hub: versions published on channels, fetched over HTTP(S).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<HubSource>,
    /// A single archive (`.tar.zst`, `.tar.gz` or `.zip`) checked against its sha256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<UrlSource>,
    /// A Modrinth modpack (`.mrpack`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mrpack: Option<MrpackSource>,
}

/// The one pack source a [`PackSource`] names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PackSourceRef<'a> {
    /// A pack hub.
    Hub(&'a HubSource),
    /// An archive URL.
    Url(&'a UrlSource),
    /// A Modrinth modpack.
    Mrpack(&'a MrpackSource),
}

impl PackSource {
    /// The source this names, or `None` unless exactly one member is set (the schema enforces that on
    /// a cluster; a spec file is checked by [`parse_spec`]).
    pub fn get(&self) -> Option<PackSourceRef<'_>> {
        match (&self.hub, &self.url, &self.mrpack) {
            (Some(h), None, None) => Some(PackSourceRef::Hub(h)),
            (None, Some(u), None) => Some(PackSourceRef::Url(u)),
            (None, None, Some(m)) => Some(PackSourceRef::Mrpack(m)),
            _ => None,
        }
    }
}

/// A pack on a pack hub.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HubSource {
    /// The hub's base URL (`https://hub.example`).
    #[schemars(length(max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub url: String,
    /// The pack's name on the hub.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$"))]
    pub pack: String,
    /// The channel to follow when no version is pinned.
    #[serde(default = "stable")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$"))]
    pub channel: String,
    /// A Secret key holding the hub's bearer token (operator and agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
    /// A file holding the hub's bearer token (standalone runner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub token_file: Option<String>,
}

fn stable() -> String {
    "stable".to_owned()
}

/// An archive at a URL.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UrlSource {
    /// Where the archive is (`.tar.zst`, `.tar.gz` or `.zip`).
    #[schemars(length(max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub url: String,
    /// The archive's sha256, 64 lowercase hex digits. A download that does not match is refused.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: String,
}

/// A Modrinth modpack.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MrpackSource {
    /// Where the `.mrpack` file is.
    #[schemars(length(max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub url: String,
    /// The `.mrpack` file's sha512, 128 lowercase hex digits. Every file the pack downloads is
    /// checked against the hashes in its index whether or not this is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{128}$"))]
    pub sha512: Option<String>,
}

/// A key of a Secret in the resource's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A Secret in the resource's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// When new pack versions are applied.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UpdatePolicy {
    /// `auto`: apply new versions when found (within `window`); `manual`: only report them (in
    /// `atlas-runner status` and the `atlas_pack_update_available` metric).
    #[serde(default)]
    pub mode: UpdateMode,
    /// How often the source is checked for a new version, as a duration (`30s`, `5m`, `1h30m`);
    /// default 5m, at most 168h. Only a hub source followed on its channel (no `version`) can change,
    /// so only it is checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(s|m|h))+$"))]
    pub interval: Option<String>,
    /// When automatic updates may run, in the server's local time (`TZ`; on Kubernetes the
    /// operator's, the chart's `timeZone`, as for `spec.upgrade.window`; UTC unless set): optional
    /// comma-separated days, then `HH:MM-HH:MM` (`Sat,Sun 02:00-06:00`). Omitted: any time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^((Mon|Tue|Wed|Thu|Fri|Sat|Sun)(,(Mon|Tue|Wed|Thu|Fri|Sat|Sun))* )?([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9]$"
    ))]
    pub window: Option<String>,
    /// Wait until no players are online before applying an update.
    #[serde(default)]
    pub require_no_players: bool,
}

/// When the operator may replace the server's pod.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UpgradePolicy {
    /// When the pod may be replaced, in the operator's local time (UTC unless the chart sets
    /// `timeZone`, which the server pods get too):
    /// optional comma-separated days, then `HH:MM-HH:MM` (`Sat,Sun 02:00-06:00`). Omitted: any time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^((Mon|Tue|Wed|Thu|Fri|Sat|Sun)(,(Mon|Tue|Wed|Thu|Fri|Sat|Sun))* )?([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9]$"
    ))]
    pub window: Option<String>,
    /// Wait until no player is online (as `status.players` reports) before replacing the pod.
    /// Default true: an upgrade never kicks players. False replaces it within `window` regardless.
    #[serde(default = "yes")]
    pub require_no_players: bool,
}

impl Default for UpgradePolicy {
    fn default() -> Self {
        Self { window: None, require_no_players: true }
    }
}

/// How pack updates are applied.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpdateMode {
    /// Apply new versions automatically.
    Auto,
    /// Report new versions; apply only when the spec changes.
    #[default]
    Manual,
}

/// JVM sizing and flags.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
// Maintainer note: neither set is allowed (the runner then uses 70%); both set is the error.
#[x_kube(validation = Rule::new("!(has(self.heap) && has(self.heapPercent))").message("spec.jvm: set heap or heapPercent, not both"))]
#[serde(rename_all = "camelCase")]
pub struct JvmSpec {
    /// The heap size as the JVM's `-Xmx` takes it (`4G`, `3072M`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[1-9][0-9]*[KkMmGg]?$"))]
    pub heap: Option<String>,
    /// The heap as a percentage (10-95) of the memory limit (the container's cgroup limit, else the
    /// host's memory). The runner always leaves headroom for the JVM's non-heap memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 95))]
    pub heap_percent: Option<u8>,
    /// A preset of GC flags: `aikar` (Aikar's G1 flags, tuned for Minecraft) or `none`.
    #[serde(default)]
    pub flags: JvmFlags,
    /// Extra JVM arguments, appended after the preset.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub extra_args: Vec<String>,
}

/// JVM flag presets.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum JvmFlags {
    /// Aikar's G1 flags (with the large-heap variant above 12 GiB).
    #[default]
    Aikar,
    /// No preset flags.
    None,
}

/// RCON settings.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RconSpec {
    /// The RCON port (loopback inside the pod or host).
    #[serde(default = "rcon_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: u16,
    /// A Secret key holding the RCON password (operator and agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// A file holding the RCON password (standalone runner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub password_file: Option<String>,
}

fn rcon_port() -> u16 {
    25575
}

/// World backups.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// When to back up, in cron syntax (`0 */6 * * *`, five fields, server local time: `TZ`, on
    /// Kubernetes the chart's `timeZone`) or one of
    /// `@hourly`, `@daily`, `@weekly`. Omitted: only on demand and before updates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(@(hourly|daily|weekly|monthly)|\S+( \S+){4})$"))]
    pub schedule: Option<String>,
    /// Where backups are stored. Omitted: a local directory (`DATA/.atlas/backups`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<BackupStore>,
    /// Which backups are kept.
    #[serde(default)]
    pub retention: Retention,
    /// Take a backup before applying a pack update.
    #[serde(default = "yes")]
    pub before_update: bool,
    /// zstd compression level of the archive (1-19).
    #[serde(default = "zstd_level")]
    #[schemars(range(min = 1, max = 19))]
    pub compression_level: u8,
    /// Extra paths (globs relative to the data directory) captured besides the world directories.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub include: Vec<String>,
    /// Paths (globs) left out of the capture.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub exclude: Vec<String>,
}

fn yes() -> bool {
    true
}

fn zstd_level() -> u8 {
    3
}

/// A backup store. Exactly one member is set.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[x_kube(validation = Rule::new("has(self.s3) != has(self.local)").message("spec.backup.store must set exactly one of s3 or local"))]
#[serde(rename_all = "camelCase")]
pub struct BackupStore {
    /// An S3-compatible bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Store>,
    /// A directory on the host or volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalStore>,
}

/// An S3-compatible bucket.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct S3Store {
    /// The bucket's name.
    #[schemars(length(min = 3, max = 63), regex(pattern = r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$"))]
    pub bucket: String,
    /// A key prefix for this server's backups (`survival/`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 512))]
    pub prefix: String,
    /// The endpoint URL for S3-compatible services (MinIO, SeaweedFS, R2). Omitted: AWS. A host that
    /// starts with the bucket's name and a dot (`https://BUCKET.s3.example.com`) is taken as the
    /// bucket's own address unless `pathStyle` is true: so a bucket named like the first label of
    /// the service's host (bucket `s3` on `s3.example.com`) needs `pathStyle: true`, or its whole
    /// address (`https://s3.s3.example.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub endpoint: Option<String>,
    /// The region to sign requests for.
    #[serde(default = "us_east_1")]
    #[schemars(length(min = 1, max = 64))]
    pub region: String,
    /// How requests name the bucket: `true`, in the path (`ENDPOINT/BUCKET/KEY`); `false`, in the
    /// host name (`BUCKET.HOST/KEY`, virtual-hosted style: the service and DNS must answer that
    /// name). Omitted: in the path when `endpoint` is set, as MinIO, SeaweedFS, Ceph RGW and Garage
    /// expect unless configured otherwise, except for an endpoint whose host starts with `BUCKET.`
    /// (the bucket's own address, used as it is); in the host name for AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_style: Option<bool>,
    /// A Secret with `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (operator and agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
    /// A file with `AWS_ACCESS_KEY_ID=...` and `AWS_SECRET_ACCESS_KEY=...` lines, or a directory with
    /// one file per key as a Secret is mounted (standalone runner). Omitted, with no Secret: the
    /// standard AWS environment variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub credentials_file: Option<String>,
}

fn us_east_1() -> String {
    "us-east-1".to_owned()
}

/// A backup directory.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalStore {
    /// An absolute path.
    #[schemars(length(min = 1, max = 4096), regex(pattern = r"^/"))]
    pub path: String,
}

/// Which backups are kept. The newest complete backup is never deleted.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    /// Keep this many of the newest backups (1-1000).
    #[serde(default = "keep_last")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep_last: u32,
    /// Also keep the newest backup of each of this many days (0-366).
    #[serde(default)]
    #[schemars(range(min = 0, max = 366))]
    pub keep_daily: u32,
    /// Also keep the newest backup of each of this many weeks (0-520).
    #[serde(default)]
    #[schemars(range(min = 0, max = 520))]
    pub keep_weekly: u32,
}

fn keep_last() -> u32 {
    10
}

impl Default for Retention {
    fn default() -> Self {
        Self { keep_last: keep_last(), keep_daily: 0, keep_weekly: 0 }
    }
}

/// The persistent volume.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[x_kube(validation = Rule::new("has(self.storageClassName) == has(oldSelf.storageClassName) && (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)").message("spec.storage.storageClassName is immutable: changing it would move the server to an empty volume").field_path(".storageClassName"))]
#[x_kube(validation = Rule::new("quantity(self.size).compareTo(quantity(oldSelf.size)) >= 0").message("spec.storage.size cannot shrink: volumes only grow").field_path(".size"))]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// The volume's size (`10Gi`). It can grow where the storage class allows expansion; it cannot shrink.
    #[serde(default = "ten_gi")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    #[x_kube(validation = Rule::new("quantity(self).isGreaterThan(quantity('0'))").message("spec.storage.size must be a positive quantity such as 10Gi"))]
    pub size: String,
    /// The storage class. Omitted: the cluster's default. Immutable once set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
    /// Delete the volume, and the world on it, when the MinecraftServer is deleted. Default false:
    /// the volume outlives the resource, and a server created again under the same name gets its
    /// world back. Pausing a server never deletes its volume.
    #[serde(default)]
    pub delete_with_server: bool,
}

fn ten_gi() -> String {
    "10Gi".to_owned()
}

/// How the game port is exposed.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.nodePort) || self.type != 'ClusterIP'").message("spec.service.nodePort needs type NodePort or LoadBalancer").field_path(".nodePort"))]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// The Service type.
    #[serde(default, rename = "type")]
    pub kind: ServiceType,
    /// The game port (Minecraft's default is 25565).
    #[serde(default = "game_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// A fixed node port (30000-32767) for NodePort and LoadBalancer Services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 30000, max = 32767))]
    pub node_port: Option<u16>,
    /// Annotations for the Service (load-balancer settings).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

fn game_port() -> u16 {
    25565
}

/// Kubernetes Service types.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServiceType {
    /// Reachable inside the cluster only.
    #[default]
    ClusterIP,
    /// Also on a port of every node.
    NodePort,
    /// Also through a cloud load balancer.
    LoadBalancer,
}

/// What the runner or operator last observed. The in-pod agent writes every field but the
/// operator's conditions (field manager `atlas-agent`); the operator writes only its conditions
/// (`atlas-operator`).
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MinecraftServerStatus {
    /// The lifecycle phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The Minecraft version running (what `latest` resolved to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_version: Option<String>,
    /// The pack version applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack_version: Option<String>,
    /// Players online, from RCON `list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub players: Option<Players>,
    /// The newest complete backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<BackupRef>,
    /// When the next scheduled backup is due (RFC 3339), when `spec.backup.schedule` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_backup: Option<String>,
    /// How often the server was restarted after an unexpected exit.
    #[serde(default)]
    pub restarts: u32,
    /// How and when the server last exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<LastExit>,
    /// Pack and server updates: what is available, and how the last one went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateStatus>,
    /// The agent's `Ready`, `PackApplied`, `BackupHealthy`, `UpdateAvailable` and `Degraded`, and the
    /// operator's `WorkloadReady`, `SecretsResolved` and `UpgradePending`, keyed by type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// How the server last exited.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LastExit {
    /// Why: `clean`, `crash`, `oom` (the JVM's heap), `oom_killed` (the container's memory limit),
    /// `watchdog` (a hung tick) or `killed_on_stop` (it ignored every gentler stop).
    pub reason: String,
    /// When (RFC 3339).
    pub time: String,
}

/// Pack and server updates.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct UpdateStatus {
    /// The pack version the followed hub channel names, when the server does not run it yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<String>,
    /// How the last update went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<UpdateOutcome>,
}

/// How an update went.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UpdateOutcome {
    /// What was updated: `pack` or `server` (the Minecraft version).
    pub kind: String,
    /// The version before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The version the update went to.
    pub to: String,
    /// `Applied`, or `RolledBack` (its server failed; the version before runs again).
    pub result: String,
    /// Why it was rolled back, and whether the world was restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When it finished (RFC 3339).
    pub time: String,
}

/// The condition types and reasons of `status.conditions`.
pub mod conditions {
    /// The server runs and answers (agent).
    pub const READY: &str = "Ready";
    /// The spec's pack is applied (agent).
    pub const PACK_APPLIED: &str = "PackApplied";
    /// The last backup succeeded and saving is on (agent).
    pub const BACKUP_HEALTHY: &str = "BackupHealthy";
    /// The followed hub channel names a pack version the server does not run (agent).
    pub const UPDATE_AVAILABLE: &str = "UpdateAvailable";
    /// The server runs, but something it depends on is not right; the reason says what (agent).
    pub const DEGRADED: &str = "Degraded";
    /// The condition types the agent owns.
    pub const AGENT_TYPES: [&str; 5] = [READY, PACK_APPLIED, BACKUP_HEALTHY, UPDATE_AVAILABLE, DEGRADED];
    /// The StatefulSet's pod is ready; false while paused (operator).
    pub const WORKLOAD_READY: &str = "WorkloadReady";
    /// Every Secret the spec references exists with the keys the agent reads (operator).
    pub const SECRETS_RESOLVED: &str = "SecretsResolved";
    /// The pod runs an old template and waits for `spec.upgrade` to allow its replacement (operator).
    pub const UPGRADE_PENDING: &str = "UpgradePending";
    /// The condition types the operator owns (docs/design/pod-contract.md).
    pub const OPERATOR_TYPES: [&str; 3] = [WORKLOAD_READY, SECRETS_RESOLVED, UPGRADE_PENDING];

    /// Condition reasons: CamelCase words, also used as Event reasons.
    pub mod reasons {
        /// Ready: the server printed `Done (` and answers RCON.
        pub const RUNNING: &str = "Running";
        /// Ready false: the server is not running; the message says the phase.
        pub const NOT_RUNNING: &str = "NotRunning";
        /// PackApplied: the data dir holds the spec's pack.
        pub const APPLIED: &str = "Applied";
        /// PackApplied false: the spec has no pack.
        pub const NO_PACK: &str = "NoPack";
        /// PackApplied false: the spec's pack could not be applied; the message says why.
        pub const APPLY_FAILED: &str = "ApplyFailed";
        /// PackApplied false: the data dir holds another version (an update rolled back, or the
        /// source unreachable at start).
        pub const HELD_VERSION: &str = "HeldVersion";
        /// BackupHealthy: the last backup succeeded.
        pub const BACKUP_SUCCEEDED: &str = "BackupSucceeded";
        /// BackupHealthy false: the last backup failed.
        pub const BACKUP_FAILED: &str = "BackupFailed";
        /// BackupHealthy: no backup has been attempted since the agent started.
        pub const NO_BACKUP_YET: &str = "NoBackupYet";
        /// UpdateAvailable: the channel names a new version.
        pub const NEW_VERSION: &str = "NewVersion";
        /// UpdateAvailable false: the server runs what the channel names (or follows none).
        /// UpgradePending false: the pod runs the latest template (operator).
        pub const UP_TO_DATE: &str = "UpToDate";
        /// Degraded false: nothing is wrong.
        pub const HEALTHY: &str = "Healthy";
        /// Degraded: the pack hub or pack URL is unreachable; the version the data dir holds runs.
        pub const PACK_SOURCE_UNREACHABLE: &str = "PackSourceUnreachable";
        /// Degraded: a download API (Mojang, PaperMC, Fabric) is unreachable; a cached jar runs.
        pub const DOWNLOAD_API_UNREACHABLE: &str = "DownloadApiUnreachable";
        /// Degraded: the backup store is unreachable.
        pub const STORE_UNREACHABLE: &str = "StoreUnreachable";
        /// Degraded: world saving was left off after a backup (`save-on` failed).
        pub const SAVING_LEFT_OFF: &str = "SavingLeftOff";
        /// Degraded: the agent refused the spec (or part of it) and runs the one before; the message
        /// says what to change. `observedGeneration` moves on all the same: the refusal is final
        /// until the spec changes.
        pub const SPEC_REJECTED: &str = "SpecRejected";
        /// Degraded: the spec names a Secret this pod does not mount (the operator replaces the pod
        /// under `spec.upgrade`, see `UpgradePending`); the Secret the pod mounts is used until then.
        pub const SECRET_NOT_MOUNTED: &str = "SecretNotMounted";
        /// SecretsResolved: every referenced Secret exists with its keys (operator).
        pub const RESOLVED: &str = "Resolved";
        /// SecretsResolved false: a referenced Secret does not exist; the message names it (operator).
        pub const SECRET_MISSING: &str = "SecretMissing";
        /// SecretsResolved false: a referenced Secret lacks a key the spec names (operator).
        pub const SECRET_KEY_MISSING: &str = "SecretKeyMissing";
        /// WorkloadReady false: `spec.paused` is true; scaled to zero, the volume kept (operator).
        pub const PAUSED: &str = "Paused";
        /// WorkloadReady false: the StatefulSet controller has not observed the latest spec yet (operator).
        pub const PROGRESSING: &str = "Progressing";
        /// WorkloadReady false: the StatefulSet waits for the referenced Secrets (operator).
        pub const SECRETS_UNRESOLVED: &str = "SecretsUnresolved";
        /// WorkloadReady: the server's pod is ready (operator).
        pub const POD_READY: &str = "PodReady";
        /// WorkloadReady false: the server's pod is not ready yet (operator).
        pub const POD_NOT_READY: &str = "PodNotReady";
        /// UpgradePending: the pod waits for `spec.upgrade.window` (operator).
        pub const OUTSIDE_WINDOW: &str = "OutsideWindow";
        /// UpgradePending: the pod waits for the players to leave (`spec.upgrade.requireNoPlayers`) (operator).
        pub const PLAYERS_ONLINE: &str = "PlayersOnline";
        /// UpgradePending: the pod waits because its player count is not known (the agent's `Ready`
        /// is not True for the current generation) and `spec.upgrade.requireNoPlayers` is set (operator).
        pub const PLAYERS_UNKNOWN: &str = "PlayersUnknown";
        /// UpgradePending false: the outdated pod is being replaced (operator).
        pub const REPLACING: &str = "Replacing";
    }

    /// Event reasons: the transitions the agent records as Kubernetes Events (events.k8s.io/v1) on
    /// its MinecraftServer, and the runner logs (`event` field); then the operator's.
    pub mod events {
        /// The server became ready.
        pub const STARTED: &str = "Started";
        /// The server was stopped (on request, or the runner is going down).
        pub const STOPPED: &str = "Stopped";
        /// The server exited unexpectedly; the message names the class.
        pub const CRASHED: &str = "Crashed";
        /// The kernel killed the server for the memory limit.
        pub const OOM_KILLED: &str = "OOMKilled";
        /// A pack version was swapped into the data dir.
        pub const PACK_APPLIED: &str = "PackApplied";
        /// The followed hub channel names a new pack version.
        pub const UPDATE_AVAILABLE: &str = "UpdateAvailable";
        /// A pack or server update is done: its server became ready and stayed up.
        pub const UPDATE_APPLIED: &str = "UpdateApplied";
        /// A pack or server update failed and was undone.
        pub const UPDATE_ROLLED_BACK: &str = "UpdateRolledBack";
        /// A backup completed.
        pub const BACKUP_SUCCEEDED: &str = "BackupSucceeded";
        /// A backup failed.
        pub const BACKUP_FAILED: &str = "BackupFailed";
        /// A world was restored from a backup.
        pub const RESTORE_COMPLETED: &str = "RestoreCompleted";
        /// The agent refused a spec (a Warning); the Degraded condition says the same.
        pub const SPEC_REJECTED: &str = "SpecRejected";
        /// The spec names a Secret the pod does not mount yet (a Warning).
        pub const SECRET_NOT_MOUNTED: &str = "SecretNotMounted";
        /// A referenced Secret does not exist; the StatefulSet waits for it (operator, Warning).
        pub const SECRET_MISSING: &str = "SecretMissing";
        /// A referenced Secret lacks a key the spec names (operator, Warning).
        pub const SECRET_KEY_MISSING: &str = "SecretKeyMissing";
        /// The Secrets reported missing exist now (operator).
        pub const SECRETS_RESOLVED: &str = "SecretsResolved";
        /// A new pod template waits for `spec.upgrade` (operator).
        pub const UPGRADE_PENDING: &str = "UpgradePending";
        /// The operator deletes an outdated pod so that the StatefulSet makes it anew (operator).
        pub const REPLACING_POD: &str = "ReplacingPod";
        /// A reconcile failed for a reason only a change can fix; the note says what (operator, Warning).
        pub const RECONCILE_FAILED: &str = "ReconcileFailed";
    }
}

/// Lifecycle phases.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepted, nothing done yet.
    Pending,
    /// Fetching and applying the pack and server software.
    Provisioning,
    /// The JVM is starting.
    Starting,
    /// The server is ready for players.
    Running,
    /// A pack update is being applied.
    Updating,
    /// The server is stopping.
    Stopping,
    /// The server is stopped (paused, or stopped on request).
    Stopped,
    /// The server cannot run until something changes; a condition says why.
    Failed,
}

/// Player counts.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Players {
    /// Players online.
    pub online: u32,
    /// The server's player limit.
    pub max: u32,
}

/// A complete backup.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupRef {
    /// The backup's name.
    pub name: String,
    /// When it was taken (RFC 3339).
    pub time: String,
    /// The archive's size in bytes.
    pub size_bytes: u64,
}

/// The CRD as the YAML committed under `crds/` and shipped by the chart.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let body = serde_yaml::to_string(&MinecraftServer::crd())?;
    Ok(format!("# Generated by `atlas-runner crd` from src/api; do not edit (run `make crds`).\n{body}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_yaml(extra: &str) -> String {
        format!("eula: true\nserver: {{type: vanilla}}\n{extra}")
    }

    #[test]
    fn defaults_fill_what_a_minimal_spec_leaves_out() -> Result<(), serde_yaml::Error> {
        let spec: MinecraftServerSpec =
            serde_yaml::from_str(&spec_yaml("backup: {}\nrcon: {}\nservice: {}\nstorage: {}"))?;
        assert_eq!(spec.server.version, "latest");
        assert!(!spec.paused);
        let backup = spec.backup.as_ref().map(|b| (b.retention.keep_last, b.before_update, b.compression_level));
        assert_eq!(backup, Some((10, true, 3)));
        assert_eq!(spec.rcon.map(|r| r.port), Some(25575));
        assert_eq!(spec.service.map(|s| (s.kind, s.port)), Some((ServiceType::ClusterIP, 25565)));
        assert_eq!(spec.storage.map(|s| s.size), Some("10Gi".to_owned()));
        Ok(())
    }

    #[test]
    fn pack_source_names_exactly_one_source() -> Result<(), serde_yaml::Error> {
        let one: PackSource = serde_yaml::from_str("url: {url: 'https://x/p.zip', sha256: abc}")?;
        assert!(matches!(one.get(), Some(PackSourceRef::Url(u)) if u.url == "https://x/p.zip"));
        let hub: PackSource = serde_yaml::from_str("hub: {url: 'https://hub', pack: p}")?;
        assert!(matches!(hub.get(), Some(PackSourceRef::Hub(h)) if h.channel == "stable"));
        let two: PackSource = serde_yaml::from_str("url: {url: 'https://x', sha256: abc}\nmrpack: {url: 'https://y'}")?;
        assert_eq!(two.get(), None);
        let none: PackSource = serde_yaml::from_str("{}")?;
        assert_eq!(none.get(), None);
        Ok(())
    }

    #[test]
    fn spec_round_trips_through_json_without_inventing_fields() -> Result<(), Box<dyn std::error::Error>> {
        let spec: MinecraftServerSpec = serde_yaml::from_str(&spec_yaml("jvm: {heapPercent: 60}"))?;
        let json = serde_json::to_value(&spec)?;
        // Optional sections left out stay out, so server-side apply does not claim them.
        assert!(json.get("pack").is_none() && json.get("backup").is_none() && json.get("storage").is_none());
        assert_eq!(json["jvm"]["heapPercent"], 60);
        assert_eq!(json["server"]["type"], "vanilla");
        let back: MinecraftServerSpec = serde_json::from_value(json)?;
        assert_eq!(back, spec);
        Ok(())
    }
}
