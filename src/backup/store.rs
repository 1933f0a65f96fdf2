//! Opens the object store a server's backups live in: S3-compatible, a local directory, or memory.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::client::{DnsFuture, DnsResolver};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::multipart::MultipartStore;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use crate::api::BackupStore;

/// Where the backups of a server go when the spec names no store, relative to the data directory.
pub const DEFAULT_LOCAL_DIR: &str = ".atlas/backups";

/// Why a store could not be opened or reached.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("read the S3 credentials file {path}")]
    ReadCredentialsFile { path: PathBuf, source: std::io::Error },
    #[error("the S3 credentials file {path} lacks {missing}")]
    ParseCredentialsFile { path: PathBuf, missing: &'static str },
    #[error("no S3 credentials: set credentialsFile or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")]
    MissingCredentials,
    #[error("credentials from a Secret are read by the operator and the agent, not by this process")]
    SecretUnsupported,
    #[error("the backup store names neither s3 nor local (or both)")]
    InvalidSpec,
    #[error("create the local backup directory {path}")]
    CreateLocalDir { path: PathBuf, source: std::io::Error },
    #[error("open the S3 bucket {bucket}")]
    OpenS3 { bucket: String, source: object_store::Error },
    #[error("the S3 endpoint {endpoint:?} is not a URL: {reason}")]
    ParseEndpoint { endpoint: String, reason: String },
    #[error(
        "pathStyle: false puts the bucket in the host name, and the endpoint {endpoint} names its host by \
         address: omit pathStyle (or set it true) to name the bucket in the path, or give the endpoint's host name"
    )]
    VirtualHostedNeedsName { endpoint: String },
    #[error("open the local backup directory {path}")]
    OpenLocal { path: PathBuf, source: object_store::Error },
    #[error("the backup store refused the credentials (wrong access key or secret?)")]
    Credentials { source: object_store::Error },
    #[error("the bucket does not exist or the prefix is not reachable")]
    BucketMissing { source: object_store::Error },
    #[error("reach the backup store")]
    Probe { source: object_store::Error },
}

impl StoreError {
    /// A short static label for logs and metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::ReadCredentialsFile { .. } | Self::ParseCredentialsFile { .. } | Self::MissingCredentials => {
                "credentials_config"
            }
            Self::SecretUnsupported | Self::InvalidSpec => "invalid_spec",
            Self::CreateLocalDir { .. } | Self::OpenLocal { .. } => "local_store",
            Self::OpenS3 { .. } | Self::ParseEndpoint { .. } | Self::VirtualHostedNeedsName { .. } => "invalid_spec",
            Self::Credentials { .. } => "credentials",
            Self::BucketMissing { .. } => "bucket_missing",
            Self::Probe { .. } => "store_unreachable",
        }
    }
}

/// An S3 key pair. `Debug` never prints the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Credentials {
    /// The access key id.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
    /// A session token, for temporary credentials.
    pub session_token: Option<String>,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credentials").field("access_key_id", &self.access_key_id).finish_non_exhaustive()
    }
}

impl S3Credentials {
    /// Parses `AWS_ACCESS_KEY_ID=...` and `AWS_SECRET_ACCESS_KEY=...` lines (`export `, quotes, `#` comments
    /// and blank lines allowed); `None` names the first missing key.
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        let (mut id, mut secret, mut token) = (None, None, None);
        for line in text.lines() {
            let line = line.trim();
            let line = line.strip_prefix("export ").unwrap_or(line).trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else { continue };
            let value = value.trim().trim_matches(|c| c == '"' || c == '\'').to_owned();
            match key.trim() {
                "AWS_ACCESS_KEY_ID" => id = Some(value),
                "AWS_SECRET_ACCESS_KEY" => secret = Some(value),
                "AWS_SESSION_TOKEN" => token = Some(value),
                _ => {}
            }
        }
        let access_key_id = id.filter(|v| !v.is_empty()).ok_or("AWS_ACCESS_KEY_ID")?;
        let secret_access_key = secret.filter(|v| !v.is_empty()).ok_or("AWS_SECRET_ACCESS_KEY")?;
        Ok(Self { access_key_id, secret_access_key, session_token: token.filter(|v| !v.is_empty()) })
    }

    /// Reads a credentials file (see [`S3Credentials::parse`]), or a directory holding one file per key
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, optionally `AWS_SESSION_TOKEN`), as a Kubernetes
    /// Secret is mounted. Read on every use, so rotated keys are picked up.
    pub fn from_file(path: &Path) -> Result<Self, StoreError> {
        if path.is_dir() {
            return Self::from_dir(path);
        }
        let text = std::fs::read_to_string(path)
            .map_err(|source| StoreError::ReadCredentialsFile { path: path.to_owned(), source })?;
        Self::parse(&text).map_err(|missing| StoreError::ParseCredentialsFile { path: path.to_owned(), missing })
    }

    fn from_dir(dir: &Path) -> Result<Self, StoreError> {
        let read = |key: &'static str| -> Result<Option<String>, StoreError> {
            let path = dir.join(key);
            match std::fs::read_to_string(&path) {
                Ok(text) => Ok(Some(text.trim().to_owned()).filter(|v| !v.is_empty())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(StoreError::ReadCredentialsFile { path, source }),
            }
        };
        let missing = |missing| StoreError::ParseCredentialsFile { path: dir.to_owned(), missing };
        Ok(Self {
            access_key_id: read("AWS_ACCESS_KEY_ID")?.ok_or_else(|| missing("AWS_ACCESS_KEY_ID"))?,
            secret_access_key: read("AWS_SECRET_ACCESS_KEY")?.ok_or_else(|| missing("AWS_SECRET_ACCESS_KEY"))?,
            session_token: read("AWS_SESSION_TOKEN")?,
        })
    }

    /// The standard `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`) variables.
    pub fn from_env() -> Option<Self> {
        let get = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        Some(Self {
            access_key_id: get("AWS_ACCESS_KEY_ID")?,
            secret_access_key: get("AWS_SECRET_ACCESS_KEY")?,
            session_token: get("AWS_SESSION_TOKEN"),
        })
    }
}

/// An opened store, with every key already under the configured prefix.
#[derive(Clone)]
pub struct Store {
    /// The objects, keyed relative to the prefix.
    pub objects: Arc<dyn ObjectStore>,
    /// A human-readable location (`s3://bucket/prefix`, a path, `memory`), without secrets.
    pub location: String,
    /// The low-level multipart API of the same store (S3, memory), which names each upload by an id that can
    /// be recorded and aborted later; keys here are full keys, the prefix included.
    multipart: Option<Arc<dyn MultipartStore>>,
    /// The key prefix, without slashes at either end.
    prefix: String,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("location", &self.location)
            .field("multipart", &self.multipart.is_some())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// A fresh in-memory store, for tests.
    pub fn memory() -> Self {
        let memory = Arc::new(InMemory::new());
        Self { objects: memory.clone(), location: "memory".to_owned(), multipart: Some(memory), prefix: String::new() }
    }

    /// The low-level multipart API and the full key of `key` in it, where the store has one.
    pub fn multipart(&self, key: &ObjectPath) -> Option<(Arc<dyn MultipartStore>, ObjectPath)> {
        let full =
            if self.prefix.is_empty() { key.clone() } else { ObjectPath::from(format!("{}/{key}", self.prefix)) };
        self.multipart.clone().map(|store| (store, full))
    }

    /// Opens the store `spec` names; `None` is the local default under `data_dir`. `credentials` overrides
    /// the spec's credentials file and the environment (first match wins: explicit, file, environment).
    /// Nothing is contacted: see [`Store::probe`].
    pub fn open(
        spec: Option<&BackupStore>,
        data_dir: &Path,
        credentials: Option<S3Credentials>,
    ) -> Result<Self, StoreError> {
        match spec {
            None => Self::local(&data_dir.join(DEFAULT_LOCAL_DIR)),
            Some(BackupStore { s3: None, local: Some(local) }) => {
                let path = Path::new(&local.path);
                // A relative path would depend on the working directory; anchor it at the data dir.
                Self::local(&data_dir.join(path))
            }
            Some(BackupStore { s3: Some(s3), local: None }) => {
                let credentials = match credentials {
                    Some(c) => c,
                    None => match (&s3.credentials_file, &s3.credentials_secret_ref) {
                        (Some(file), _) => S3Credentials::from_file(Path::new(file))?,
                        (None, Some(_)) => return Err(StoreError::SecretUnsupported),
                        (None, None) => S3Credentials::from_env().ok_or(StoreError::MissingCredentials)?,
                    },
                };
                install_crypto_provider();
                let path_style =
                    s3.path_style.unwrap_or_else(|| default_path_style(s3.endpoint.as_deref(), &s3.bucket));
                let mut builder = AmazonS3Builder::new()
                    .with_bucket_name(&s3.bucket)
                    .with_region(&s3.region)
                    .with_access_key_id(&credentials.access_key_id)
                    .with_secret_access_key(&credentials.secret_access_key)
                    .with_virtual_hosted_style_request(!path_style)
                    // Backups delete one key at a time: a plain `DELETE /KEY` costs what a one-key
                    // `POST /?delete` does, every S3-compatible service takes it, and it reaches the
                    // same place as the `PUT` of that key did.
                    .with_disable_bulk_delete(true)
                    .with_retry(retry_policy());
                if let Some(token) = &credentials.session_token {
                    builder = builder.with_token(token);
                }
                let mut location = format!("s3://{}", s3.bucket);
                if let Some(endpoint) = &s3.endpoint {
                    let endpoint = bucket_endpoint(endpoint, &s3.bucket, path_style)?;
                    let base = endpoint.as_str().trim_end_matches('/');
                    location = if path_style { format!("{base}/{}", s3.bucket) } else { base.to_owned() };
                    // `allow_http` lives in the client options: set both together so neither overrides the other.
                    let mut options = ClientOptions::new().with_allow_http(endpoint.scheme() == "http");
                    if is_loopback(&endpoint) {
                        // A loopback endpoint must never go through a proxy from the environment, and
                        // `BUCKET.localhost` must not be asked of DNS servers off the machine.
                        options = options.with_proxy_excludes("*").with_dns_resolver(Arc::new(LocalhostResolver));
                    }
                    builder = builder.with_endpoint(base).with_client_options(options);
                }
                let s3_store =
                    builder.build().map_err(|source| StoreError::OpenS3 { bucket: s3.bucket.clone(), source })?;
                let s3_store = Arc::new(s3_store);
                let mut store = Self::with_prefix(s3_store.clone(), &s3.prefix, location);
                store.multipart = Some(s3_store);
                Ok(store)
            }
            Some(_) => Err(StoreError::InvalidSpec),
        }
    }

    fn local(path: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(path).map_err(|source| StoreError::CreateLocalDir { path: path.to_owned(), source })?;
        let fs = LocalFileSystem::new_with_prefix(path)
            .map_err(|source| StoreError::OpenLocal { path: path.to_owned(), source })?;
        Ok(Self { objects: Arc::new(fs), location: path.display().to_string(), multipart: None, prefix: String::new() })
    }

    fn with_prefix(objects: Arc<dyn ObjectStore>, prefix: &str, location: String) -> Self {
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            return Self { objects, location, multipart: None, prefix: String::new() };
        }
        let location = format!("{location}/{prefix}");
        Self {
            objects: Arc::new(PrefixStore::new(objects, prefix)),
            location,
            multipart: None,
            prefix: prefix.to_owned(),
        }
    }

    /// Lists one key to check that the store answers, and turns the common failures into clear errors.
    pub async fn probe(&self) -> Result<(), StoreError> {
        let mut listing = self.objects.list(None);
        match listing.try_next().await {
            Ok(_) => Ok(()),
            Err(source) => Err(classify(source)),
        }
    }
}

/// Sorts a store error into wrong credentials, a missing bucket, or anything else.
pub fn classify(source: object_store::Error) -> StoreError {
    match error_category(&source) {
        "credentials" => StoreError::Credentials { source },
        "bucket_missing" => StoreError::BucketMissing { source },
        _ => StoreError::Probe { source },
    }
}

/// `credentials`, `bucket_missing` or `store_unreachable` for a store error, as [`classify`] sorts it.
pub fn error_category(source: &object_store::Error) -> &'static str {
    let text = source.to_string();
    match source {
        object_store::Error::Unauthenticated { .. } | object_store::Error::PermissionDenied { .. } => "credentials",
        _ if text.contains("SignatureDoesNotMatch")
            || text.contains("InvalidAccessKeyId")
            || text.contains("AccessDenied")
            || text.contains("403 Forbidden") =>
        {
            "credentials"
        }
        object_store::Error::NotFound { .. } => "bucket_missing",
        _ if text.contains("NoSuchBucket") || text.contains("404 Not Found") => "bucket_missing",
        _ => "store_unreachable",
    }
}

/// Retries for transient S3 errors. Fewer than object_store's default (10 retries within 3 minutes): a store
/// that stays unreachable fails the backup within seconds (about 3 s of backoff, each request also bounded
/// by the client's timeouts), the multipart upload is aborted, and the next scheduled backup tries again,
/// rather than a backup holding its staging copy for minutes.
fn retry_policy() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 5,
        retry_timeout: Duration::from_secs(60),
    }
}

/// Whether requests name the bucket in the path when the spec does not say. Custom endpoints (MinIO,
/// SeaweedFS, Ceph RGW, Garage) answer path-style requests unless configured otherwise, except an endpoint
/// whose host already starts with `BUCKET.`: that is the bucket's own virtual-hosted address (object_store's
/// convention, and what such a spec meant before path style became the default), used as it is. AWS itself
/// prefers virtual-hosted requests.
fn default_path_style(endpoint: Option<&str>, bucket: &str) -> bool {
    let Some(endpoint) = endpoint else { return false };
    let host = reqwest::Url::parse(endpoint).ok().and_then(|url| url.host_str().map(str::to_ascii_lowercase));
    !host.is_some_and(|host| host.starts_with(&format!("{bucket}.")))
}

/// The URL requests for `bucket` go to, before the key: the endpoint itself for path style (the
/// store adds `/BUCKET`), else the endpoint with `BUCKET.` before its host, as S3's virtual-hosted
/// style defines it (an endpoint whose host already starts with `BUCKET.` is taken as it is).
fn bucket_endpoint(endpoint: &str, bucket: &str, path_style: bool) -> Result<reqwest::Url, StoreError> {
    let parse_error = |reason: String| StoreError::ParseEndpoint { endpoint: endpoint.to_owned(), reason };
    let mut url = reqwest::Url::parse(endpoint).map_err(|e| parse_error(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(parse_error(format!("the scheme {} is not http or https", url.scheme())));
    }
    if path_style {
        return Ok(url);
    }
    let host = match host_of(&url) {
        Some(Host::Name(name)) => name.to_owned(),
        _ => return Err(StoreError::VirtualHostedNeedsName { endpoint: endpoint.to_owned() }),
    };
    if !host.starts_with(&format!("{bucket}.")) {
        url.set_host(Some(&format!("{bucket}.{host}"))).map_err(|e| parse_error(e.to_string()))?;
    }
    Ok(url)
}

/// A URL's host: a name or an address.
enum Host<'a> {
    Name(&'a str),
    Address(IpAddr),
}

fn host_of(url: &reqwest::Url) -> Option<Host<'_>> {
    let host = url.host_str()?;
    // IPv6 addresses come in brackets.
    match host.trim_start_matches('[').trim_end_matches(']').parse() {
        Ok(ip) => Some(Host::Address(ip)),
        Err(_) => Some(Host::Name(host)),
    }
}

/// Whether the endpoint's host is a loopback address or a `localhost` name.
fn is_loopback(endpoint: &reqwest::Url) -> bool {
    match host_of(endpoint) {
        Some(Host::Name(name)) => is_localhost_name(name),
        Some(Host::Address(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// `localhost` and every name under it (RFC 6761, 6.3), in any case, with or without the root dot.
fn is_localhost_name(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// Resolves `localhost` names to loopback without asking DNS, as RFC 6761 asks of resolution
/// APIs; any other name goes to the system's resolver. glibc (files, then dns) sends
/// `BUCKET.localhost`, the virtual-hosted address of a bucket on a loopback endpoint, to the DNS
/// servers of /etc/resolv.conf, off the machine; there it fails, or worse, names another host.
#[derive(Debug)]
struct LocalhostResolver;

impl DnsResolver for LocalhostResolver {
    fn resolve(&self, host: &str) -> DnsFuture {
        if is_localhost_name(host) {
            return Box::pin(async { Ok(vec![IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)]) });
        }
        let host = host.to_owned();
        Box::pin(async move {
            let addresses = tokio::net::lookup_host((host.as_str(), 0)).await?;
            Ok(addresses.map(|a| a.ip()).collect())
        })
    }
}

/// object_store's HTTP client (reqwest 0.13, built without its own crypto provider so that the
/// process keeps one: ring, as kube and the download client use) needs rustls' process-wide
/// provider installed before the first S3 client is built.
fn install_crypto_provider() {
    // An error only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn reads_credentials_from_a_mounted_secret_directory() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("AWS_ACCESS_KEY_ID"), "id\n")?;
        let missing = S3Credentials::from_file(dir.path()).map(|_| ()).map_err(|e| e.to_string());
        assert!(missing.as_ref().is_err_and(|e| e.contains("AWS_SECRET_ACCESS_KEY")), "{missing:?}");
        std::fs::write(dir.path().join("AWS_SECRET_ACCESS_KEY"), "secret")?;
        let read = S3Credentials::from_file(dir.path())?;
        assert_eq!((read.access_key_id.as_str(), read.secret_access_key.as_str()), ("id", "secret"));
        assert_eq!(read.session_token, None);
        // Rotated in place (as the kubelet swaps a Secret's files): the next read sees the new key.
        std::fs::write(dir.path().join("AWS_SECRET_ACCESS_KEY"), "rotated")?;
        assert_eq!(S3Credentials::from_file(dir.path())?.secret_access_key, "rotated");
        Ok(())
    }

    #[test]
    fn the_bucket_goes_in_the_path_or_before_the_host() {
        let at = |endpoint, path_style| bucket_endpoint(endpoint, "bars", path_style).map(|u| u.to_string());
        assert_eq!(at("http://127.0.0.1:8333", true).unwrap(), "http://127.0.0.1:8333/");
        assert_eq!(at("https://s3.example.com", false).unwrap(), "https://bars.s3.example.com/");
        assert_eq!(at("http://localhost:8333/", false).unwrap(), "http://bars.localhost:8333/");
        // The bucket already in the endpoint (object_store's own convention) is not added twice.
        assert_eq!(at("https://bars.s3.example.com", false).unwrap(), "https://bars.s3.example.com/");
        // An address has no subdomain to put the bucket in.
        for ip in ["http://127.0.0.1:8333", "http://[::1]:8333"] {
            assert!(matches!(bucket_endpoint(ip, "bars", false), Err(StoreError::VirtualHostedNeedsName { .. })));
        }
        assert!(matches!(at("s3.example.com", true), Err(StoreError::ParseEndpoint { .. })));
    }

    #[test]
    fn an_endpoint_naming_the_bucket_in_its_host_is_virtual_hosted_unless_path_style_is_asked() {
        let location = |endpoint: &str, bucket: &str, path_style: Option<bool>| {
            let spec = BackupStore {
                s3: Some(crate::api::S3Store {
                    bucket: bucket.to_owned(),
                    prefix: "survival/".to_owned(),
                    endpoint: Some(endpoint.to_owned()),
                    region: "us-east-1".to_owned(),
                    path_style,
                    credentials_secret_ref: None,
                    credentials_file: None,
                }),
                local: None,
            };
            let keys = S3Credentials { access_key_id: "a".into(), secret_access_key: "s".into(), session_token: None };
            Store::open(Some(&spec), Path::new("/nonexistent"), Some(keys)).unwrap().location
        };
        // pathStyle omitted: the bucket's own address is used as it is, not with the bucket again in the path.
        assert_eq!(location("https://bars.s3.example.com", "bars", None), "https://bars.s3.example.com/survival");
        assert_eq!(location("https://BARS.s3.example.com", "bars", None), "https://bars.s3.example.com/survival");
        // Any other custom endpoint: the bucket in the path.
        assert_eq!(location("https://s3.example.com", "bars", None), "https://s3.example.com/bars/survival");
        assert_eq!(location("http://127.0.0.1:8333", "bars", None), "http://127.0.0.1:8333/bars/survival");
        assert_eq!(location("https://barsx.example.com", "bars", None), "https://barsx.example.com/bars/survival");
        // Asked for, each style is kept.
        let asked = location("https://bars.s3.example.com", "bars", Some(true));
        assert_eq!(asked, "https://bars.s3.example.com/bars/survival");
        assert_eq!(location("https://s3.example.com", "bars", Some(false)), "https://bars.s3.example.com/survival");
        // A bucket named like the service host's first label: its whole address says which is meant.
        assert_eq!(location("https://s3.s3.example.com", "s3", Some(false)), "https://s3.s3.example.com/survival");
        assert_eq!(location("https://s3.example.com", "s3", Some(true)), "https://s3.example.com/s3/survival");
        assert!(!default_path_style(None, "bars"), "AWS: virtual-hosted");
    }

    #[test]
    fn localhost_names_are_loopback() {
        for name in ["localhost", "bars.localhost", "a.b.LOCALHOST", "bars.localhost."] {
            assert!(is_localhost_name(name), "{name}");
        }
        for name in ["localhost.example.com", "notlocalhost", "example.com"] {
            assert!(!is_localhost_name(name), "{name}");
        }
        let url = |u: &str| reqwest::Url::parse(u).unwrap();
        assert!(is_loopback(&url("http://bars.localhost:1")) && is_loopback(&url("http://[::1]:1")));
        assert!(is_loopback(&url("http://127.0.0.2:1")) && !is_loopback(&url("http://localhost.example.com")));
    }

    #[tokio::test]
    async fn the_resolver_answers_localhost_names_itself() {
        let ips = LocalhostResolver.resolve("bars.localhost").await.unwrap();
        assert_eq!(ips.first(), Some(&IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert!(ips.iter().all(IpAddr::is_loopback));
    }

    #[test]
    fn parses_credentials_file() {
        let c = S3Credentials::parse("# keys\nexport AWS_ACCESS_KEY_ID=abc\nAWS_SECRET_ACCESS_KEY=\"s e\"\n")
            .unwrap_or_else(|m| panic!("missing {m}"));
        assert_eq!(c.access_key_id, "abc");
        assert_eq!(c.secret_access_key, "s e");
        assert!(!format!("{c:?}").contains("s e"));
        assert_eq!(S3Credentials::parse("AWS_ACCESS_KEY_ID=abc\n"), Err("AWS_SECRET_ACCESS_KEY"));
    }
}
