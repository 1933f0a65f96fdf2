//! The control API's client: HTTP/1.1 over the runner's Unix socket, used by `atlas-runner status|logs|console|stop|restart`.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// A control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket.
    #[error(
        "no runner answers on {path}: {source}; is `atlas-runner run` running for this data dir? (pass --data DIR or --control PATH)"
    )]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("talking to the runner failed: {0}")]
    Http(#[from] hyper::Error),
    /// Building the request failed.
    #[error("building the request failed: {0}")]
    Request(#[from] hyper::http::Error),
    /// The runner answered with an error.
    #[error("{0}")]
    Runner(String),
    /// The runner's reply did not parse.
    #[error("the runner's reply did not parse: {0}")]
    Decode(#[from] serde_json::Error),
}

impl ClientError {
    /// A short static category.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Http(_) | Self::Request(_) => "http",
            Self::Runner(_) => "runner",
            Self::Decode(_) => "decode",
        }
    }
}

/// The control socket of a data dir.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    crate::runner::atlas_dir(data_dir).join("control.sock")
}

/// Sends one request and returns the response with its body still streaming.
pub async fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Response<Incoming>, ClientError> {
    let stream =
        UnixStream::connect(socket).await.map_err(|source| ClientError::Connect { path: socket.into(), source })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "control connection ended");
        }
    });
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "atlas-runner")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    Ok(sender.send_request(request).await?)
}

/// Sends a request and reads the whole reply; a non-2xx reply becomes [`ClientError::Runner`].
pub async fn call(socket: &Path, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<Bytes, ClientError> {
    let response = request(socket, method, path, body).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    if status.is_success() {
        return Ok(bytes);
    }
    let message = serde_json::from_slice::<super::ErrorReply>(&bytes)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).trim().to_owned());
    Err(ClientError::Runner(message))
}
