//! Kubernetes Events (events.k8s.io/v1) for the runner's transitions, through kube-runtime's
//! recorder, attached to the agent's `MinecraftServer`. The runner tells transitions only (see
//! `crate::runner::events`), so nothing here filters repeats; the recorder folds a repeat within a
//! few minutes into a series. Events that cannot be published (the API server down) wait in a short
//! queue and are tried again; the oldest are dropped past its bound.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::{AgentError, AgentMetrics};
use crate::api::MinecraftServer;
use crate::runner::RunnerEvent;

/// How many unpublished events are kept for a retry.
const QUEUE: usize = 32;
/// How long the events told before exit may take to publish.
const FINAL_PUBLISH: Duration = Duration::from_secs(5);

/// Publishes `events` for the resource `object` names until `finished`, then what is still queued
/// (for a few seconds).
pub fn spawn_recorder(
    client: kube::Client,
    reporter: Reporter,
    object: watch::Receiver<Arc<MinecraftServer>>,
    mut events: broadcast::Receiver<RunnerEvent>,
    metrics: AgentMetrics,
    finished: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let recorder = Recorder::new(client, reporter);
        let mut queue: VecDeque<RunnerEvent> = VecDeque::new();
        let mut retry = tokio::time::interval(Duration::from_secs(3));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = finished.cancelled() => break,
                received = events.recv() => match received {
                    Ok(event) => {
                        queue.push_back(event);
                        if queue.len() > QUEUE {
                            queue.pop_front();
                            metrics.events_dropped.inc();
                        }
                        publish_queued(&recorder, &object, &mut queue, &metrics).await;
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        metrics.events_dropped.inc_by(missed);
                        tracing::warn!(missed, "events came faster than they could be published; some were dropped");
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = retry.tick(), if !queue.is_empty() => publish_queued(&recorder, &object, &mut queue, &metrics).await,
            }
        }
        // What the runner told while stopping (Stopped) goes out before the agent exits.
        while let Ok(event) = events.try_recv() {
            queue.push_back(event);
        }
        let _ = tokio::time::timeout(FINAL_PUBLISH, publish_queued(&recorder, &object, &mut queue, &metrics)).await;
    })
}

/// Publishes the queue in order, stopping at the first failure (kept for the next attempt).
async fn publish_queued(
    recorder: &Recorder,
    object: &watch::Receiver<Arc<MinecraftServer>>,
    queue: &mut VecDeque<RunnerEvent>,
    metrics: &AgentMetrics,
) {
    while let Some(event) = queue.front() {
        let reference = object.borrow().object_ref(&());
        let published = recorder
            .publish(
                &Event {
                    type_: if event.warning { EventType::Warning } else { EventType::Normal },
                    reason: event.reason.to_owned(),
                    note: Some(note(&event.message)),
                    action: event.reason.to_owned(),
                    secondary: None,
                },
                &reference,
            )
            .await
            .map_err(|source| AgentError::PublishEvent { reason: event.reason, source });
        match published {
            Ok(()) => {
                metrics.events.with_label_values(&[event.reason]).inc();
                queue.pop_front();
            }
            Err(e) => {
                tracing::debug!(category = e.category(), "{e}; kept for a retry");
                return;
            }
        }
    }
}

/// An Event's note is at most 1 kB.
fn note(message: &str) -> String {
    let mut end = message.len().min(1000);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_owned()
}
