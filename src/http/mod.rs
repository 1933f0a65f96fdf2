//! HTTP: the admin router (`/metrics`, `/healthz`, `/readyz`) on TCP, and the control API (status,
//! logs, console, stop, restart, backup) as HTTP+JSON on a Unix socket, with the client the CLI uses.

pub mod client;

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::runner::{ControlRequest, Shared};

/// `/metrics`, `/healthz` and `/readyz`.
pub fn admin_router(shared: Shared) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(shared)
}

async fn metrics(State(shared): State<Shared>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], crate::metrics::render(&shared.registry))
        .into_response()
}

async fn readyz(State(shared): State<Shared>) -> Response {
    if shared.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let phase = shared.snapshot().phase;
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {phase}\n")).into_response()
    }
}

/// The control API.
pub fn control_router(shared: Shared) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/logs", get(logs))
        .route("/v1/console", post(console))
        .route("/v1/stop", post(stop))
        .route("/v1/restart", post(restart))
        .route("/v1/backup", post(backup))
        .route("/v1/restored", post(restored))
        .with_state(shared)
}

async fn status(State(shared): State<Shared>) -> Response {
    axum::Json(shared.snapshot()).into_response()
}

/// Query of `/v1/logs`.
#[derive(Debug, Deserialize)]
pub struct LogsQuery {
    /// How many recent lines.
    #[serde(default = "default_tail")]
    pub tail: usize,
    /// Keep the response open and stream new lines.
    #[serde(default)]
    pub follow: bool,
}

fn default_tail() -> usize {
    100
}

async fn logs(State(shared): State<Shared>, Query(query): Query<LogsQuery>) -> Response {
    if !query.follow {
        let mut text = shared.logs.tail(query.tail).join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        return text.into_response();
    }
    let (tail, rx) = shared.logs.tail_and_follow(query.tail);
    let head = futures::stream::iter(tail.into_iter().map(|l| Ok::<_, Infallible>(format!("{l}\n"))));
    let live = futures::stream::unfold(rx, |mut rx| async move {
        let text = match rx.recv().await {
            Ok(line) => format!("{line}\n"),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => format!("[atlas-runner: {n} lines skipped]\n"),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok::<_, Infallible>(text), rx))
    });
    Body::from_stream(futures::StreamExt::chain(head, live)).into_response()
}

/// Body of `/v1/console`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ConsoleRequest {
    /// The command, without a leading `/`.
    pub command: String,
}

/// Reply of `/v1/console`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ConsoleReply {
    /// The server's reply.
    pub output: String,
}

/// An error reply: one line saying what went wrong.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What went wrong and what to do.
    pub error: String,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(ErrorReply { error: message.into() })).into_response()
}

async fn console(State(shared): State<Shared>, axum::Json(request): axum::Json<ConsoleRequest>) -> Response {
    let Some(rcon) = shared.rcon() else {
        return error(StatusCode::CONFLICT, "the server has not been started yet");
    };
    if !shared.is_ready() {
        return error(StatusCode::CONFLICT, format!("the server is not running (phase {})", shared.snapshot().phase));
    }
    let started = std::time::Instant::now();
    match rcon.command(request.command.trim_start_matches('/')).await {
        Ok(output) => {
            shared.metrics.rcon_latency.observe(started.elapsed().as_secs_f64());
            axum::Json(ConsoleReply { output }).into_response()
        }
        Err(e) => {
            shared.metrics.rcon_failures.with_label_values(&[e.category()]).inc();
            error(StatusCode::BAD_GATEWAY, format!("RCON: {e}"))
        }
    }
}

async fn stop(State(shared): State<Shared>) -> Response {
    send(&shared, ControlRequest::Stop).await
}

async fn restart(State(shared): State<Shared>) -> Response {
    send(&shared, ControlRequest::Restart).await
}

/// `POST /v1/backup`: takes a backup now and replies with its manifest.
async fn backup(State(shared): State<Shared>) -> Response {
    match shared.backups.create_now(&shared).await {
        Ok(manifest) => axum::Json(manifest).into_response(),
        Err(failure) => {
            let status = match failure.category {
                "busy" | "server_busy" | "not_ready" => StatusCode::CONFLICT,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            error(status, failure.message)
        }
    }
}

/// Body of `/v1/restored`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RestoredNotice {
    /// The backup the world was restored from.
    pub name: String,
}

/// `POST /v1/restored`: `backup restore` tells the runner it restored the world (the runner's
/// restart alone cannot tell a restore from any other restart).
async fn restored(State(shared): State<Shared>, axum::Json(notice): axum::Json<RestoredNotice>) -> Response {
    shared.emit(
        crate::runner::events::RESTORE_COMPLETED,
        format!("world restored from backup {} by `atlas-runner backup restore`", notice.name),
        false,
    );
    StatusCode::NO_CONTENT.into_response()
}

async fn send(shared: &Shared, make: fn(oneshot::Sender<Result<(), String>>) -> ControlRequest) -> Response {
    let (tx, rx) = oneshot::channel();
    if shared.requests.send(make(tx)).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the runner is shutting down");
    }
    // A stop may take the whole escalation; the client waits as long.
    match tokio::time::timeout(Duration::from_secs(300), rx).await {
        Ok(Ok(Ok(()))) => axum::Json(shared.snapshot()).into_response(),
        Ok(Ok(Err(e))) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Ok(Err(_)) | Err(_) => error(StatusCode::GATEWAY_TIMEOUT, "the runner did not answer"),
    }
}
