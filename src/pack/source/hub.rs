//! The pack hub source: looks a version up (a channel, with `ETag`, or a pinned version), then
//! downloads its blob like a url source, checked by sha256 and size.

use reqwest::header::{ETAG, IF_NONE_MATCH};
use reqwest::{Client, StatusCode, Url};
use serde::{Deserialize, Serialize};

use super::download::{self, Expected};
use super::{FetchOptions, Fetched, SourceError, check_hex, extension, format_of, io_err, parse_url, parse_version};
use crate::api::HubSource;
use crate::pack::ArchiveFormat;

/// The hub's answer for a channel or a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubAnswer {
    /// The pack version.
    pub version: String,
    /// Where its archive is.
    pub blob: HubBlob,
    /// When it was published (RFC 3339), informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_at: Option<String>,
}

/// A pack version's archive on the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubBlob {
    /// Absolute, or relative to the hub's base URL.
    pub url: String,
    /// 64 lowercase hex digits.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
}

/// A channel answer remembered with its `ETag`, for `If-None-Match`.
#[derive(Debug, Serialize, Deserialize)]
struct Remembered {
    /// The lookup URL: a hub moved to another address starts afresh.
    url: String,
    etag: String,
    answer: HubAnswer,
}

/// The hub's base URL with a trailing `/`, so relative URLs resolve below it.
fn base_url(raw: &str) -> Result<Url, SourceError> {
    let mut url = parse_url(raw)?;
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

fn api_url(base: &Url, segments: &[&str]) -> Result<Url, SourceError> {
    let mut url = base.clone();
    url.path_segments_mut()
        .map_err(|()| SourceError::ParseUrl { url: base.to_string(), reason: "cannot be a base".into() })?
        .pop_if_empty()
        .extend(segments);
    Ok(url)
}

/// The bearer token, from `tokenFile` (relative to the data dir), trimmed.
pub(crate) fn token(hub: &HubSource, options: &FetchOptions) -> Result<Option<String>, SourceError> {
    let Some(file) = &hub.token_file else {
        return match hub.token_secret_ref {
            Some(_) => Err(SourceError::ResolveTokenSecret),
            None => Ok(None),
        };
    };
    let path = options.data_dir.join(file);
    let raw = std::fs::read_to_string(&path).map_err(|source| SourceError::ReadToken { path: path.clone(), source })?;
    let token = raw.trim();
    if token.is_empty() {
        let source = std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is empty");
        return Err(SourceError::ReadToken { path, source });
    }
    Ok(Some(token.to_owned()))
}

fn file_part(raw: &str) -> String {
    raw.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' }).collect()
}

/// Asks the hub which version to fetch: the pinned one, or the channel's (with `If-None-Match`).
pub async fn lookup(
    client: &Client,
    hub: &HubSource,
    pinned: Option<&str>,
    token: Option<&str>,
    options: &FetchOptions,
) -> Result<HubAnswer, SourceError> {
    let base = base_url(&hub.url)?;
    let (url, state) = match pinned {
        Some(version) => (api_url(&base, &["api", "v1", "packs", &hub.pack, "versions", version])?, None),
        None => {
            let url = api_url(&base, &["api", "v1", "packs", &hub.pack, "channels", &hub.channel])?;
            let name = format!("hub-{}-{}.json", file_part(&hub.pack), file_part(&hub.channel));
            (url, Some(options.work_dir.join(name)))
        }
    };
    let remembered: Option<Remembered> = match &state {
        Some(path) => std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Remembered>(&b).ok())
            .filter(|r| r.url == url.as_str()),
        None => None,
    };
    let (url_ref, remembered_ref) = (&url, &remembered);
    let (answer, etag) = download::retry(options, url.as_str(), || async move {
        let (url, remembered) = (url_ref, remembered_ref);
        let mut request = client.get(url.clone());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(r) = &remembered {
            request = request.header(IF_NONE_MATCH, &r.etag);
        }
        let request_err = |source| SourceError::Request { url: url.to_string(), source };
        let response = request.send().await.map_err(request_err)?;
        let status = response.status();
        match status {
            StatusCode::NOT_MODIFIED => {
                if let Some(r) = &remembered {
                    tracing::debug!(url = %url, etag = %r.etag, "hub channel not modified");
                    return Ok((r.answer.clone(), None));
                }
                Err(SourceError::Status { url: url.to_string(), status: status.as_u16() })
            }
            s if s.is_success() => {
                let etag = response.headers().get(ETAG).and_then(|v| v.to_str().ok()).map(str::to_owned);
                let body = response.bytes().await.map_err(request_err)?;
                let answer: HubAnswer = serde_json::from_slice(&body)
                    .map_err(|source| SourceError::ParseHubAnswer { url: url.to_string(), source })?;
                Ok((answer, etag))
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Err(SourceError::Authorize { url: url.to_string(), status: status.as_u16() })
            }
            _ => Err(SourceError::Status { url: url.to_string(), status: status.as_u16() }),
        }
    })
    .await?;
    if let (Some(path), Some(etag)) = (&state, etag) {
        let bytes = serde_json::to_vec(&Remembered { url: url.to_string(), etag, answer: answer.clone() })
            .map_err(|source| SourceError::ParseHubAnswer { url: url.to_string(), source })?;
        // Its own name: a runner's update check and its update may both look the channel up.
        let tmp = path.with_extension(format!("json.{:08x}.tmp", rand::random::<u32>()));
        std::fs::write(&tmp, bytes).map_err(io_err("write", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err("rename", &tmp))?;
    }
    if let Some(pinned) = pinned
        && answer.version != pinned
    {
        return Err(SourceError::CheckVersion { pinned: pinned.to_owned(), found: answer.version });
    }
    Ok(answer)
}

/// Downloads the blob of `answered` (a lookup already made), or of the version a lookup finds now.
pub(crate) async fn fetch(
    client: &Client,
    hub: &HubSource,
    pinned: Option<&str>,
    answered: Option<&HubAnswer>,
    options: &FetchOptions,
) -> Result<Fetched, SourceError> {
    let token = token(hub, options)?;
    let answer = match answered {
        Some(answer) => answer.clone(),
        None => lookup(client, hub, pinned, token.as_deref(), options).await?,
    };
    let version = parse_version(&answer.version)?;
    let base = base_url(&hub.url)?;
    let blob_url = base
        .join(&answer.blob.url)
        .map_err(|e| SourceError::ParseUrl { url: answer.blob.url.clone(), reason: e.to_string() })?;
    // The Atlas pack blob is a tar.zst; a URL with another known extension says otherwise.
    let format = format_of(&blob_url).unwrap_or(ArchiveFormat::TarZst);
    let sha256 = check_hex(&answer.blob.sha256, 64)?;
    let expected = Expected { sha256: Some(sha256.clone()), size: Some(answer.blob.size), ..Expected::default() };
    let archive = options.work_dir.join(format!("{sha256}.{}", extension(format)));
    let partial = options.work_dir.join(format!("{sha256}.partial"));
    // Send the token only to the hub itself, not to a CDN the blob URL may point to.
    let blob_token = if blob_url.origin() == base.origin() { token.as_deref() } else { None };
    let bytes_downloaded =
        download::download(client, &blob_url, blob_token, &expected, &partial, &archive, options).await?;
    Ok(Fetched { archive, format, version: Some(version), fallback_version: None, bytes_downloaded })
}
