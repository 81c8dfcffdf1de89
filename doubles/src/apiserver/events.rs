//! The double's watch machinery: every change to a stored object becomes a [`Event`] kept in a
//! bounded history and broadcast to open watches, which stream them as `WatchEvent` JSON lines the
//! way kube-apiserver does (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`, and an `ERROR` event
//! carrying a 410 `Expired` status for a resourceVersion older than the history).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::fields::{FieldTerm, fields_match};

/// How many events the history keeps; a watch from an older resourceVersion gets 410 Gone.
const HISTORY: usize = 4096;
/// How many events a slow watcher may fall behind before its watch is closed (it re-watches).
const BACKLOG: usize = 1024;
/// How often an idle watch that allows bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(5);
/// How long a watch lasts when the client sets no `timeoutSeconds`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);
/// The annotation that marks the end of the initial events of a streaming list.
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// One change to one object.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    /// The store revision the change produced (the object's resourceVersion).
    pub(crate) revision: u64,
    /// The plural resource, e.g. `canbuses`.
    pub(crate) resource: &'static str,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub(crate) kind: &'static str,
    /// The object after the change (before it, for `DELETED`, with the deletion's revision).
    pub(crate) object: Value,
}

/// The history of changes and the channel that feeds open watches.
#[derive(Debug)]
pub(crate) struct EventLog {
    history: VecDeque<Arc<Event>>,
    /// The newest revision whose event has been dropped from the history.
    compacted: u64,
    sender: broadcast::Sender<Arc<Event>>,
    shutdown: watch::Sender<bool>,
}

impl Default for EventLog {
    fn default() -> Self {
        Self {
            history: VecDeque::new(),
            compacted: 0,
            sender: broadcast::channel(BACKLOG).0,
            shutdown: watch::channel(false).0,
        }
    }
}

impl EventLog {
    /// Records a change and hands it to open watches.
    pub(crate) fn push(&mut self, event: Event) {
        let event = Arc::new(event);
        if self.history.len() == HISTORY
            && let Some(dropped) = self.history.pop_front()
        {
            self.compacted = dropped.revision;
        }
        self.history.push_back(event.clone());
        // No open watch is not an error.
        let _ = self.sender.send(event);
    }

    /// Forgets the whole history up to `revision`, as an etcd compaction does.
    pub(crate) fn compact(&mut self, revision: u64) {
        self.history.clear();
        self.compacted = revision;
    }

    /// Ends every open watch (the server is going away).
    pub(crate) fn close(&self) {
        self.shutdown.send_replace(true);
    }
}

/// Which events one watch wants.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    pub(crate) resource: &'static str,
    pub(crate) namespace: Option<String>,
    pub(crate) fields: Vec<FieldTerm>,
}

/// The value of a dotted field path such as `spec.nodeName` in a JSON object ("" when absent).
pub(crate) fn json_field<'a>(object: &'a Value, path: &str) -> &'a str {
    path.split('.')
        .try_fold(object, |value, key| value.get(key))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

impl Filter {
    /// Whether an object of this filter's resource is selected.
    pub(crate) fn selects(&self, object: &Value) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| json_field(object, "metadata.namespace") == ns)
            && fields_match(&self.fields, object)
    }

    fn wants(&self, event: &Event) -> bool {
        event.resource == self.resource && self.selects(&event.object)
    }
}

/// What a new watch starts from, computed under the store lock so that no change falls between
/// the replayed events and the live ones.
#[derive(Debug)]
pub(crate) struct WatchStart {
    /// Events to send first: synthetic `ADDED` for the current objects, or the history replay.
    initial: Vec<(&'static str, Value)>,
    /// The initial events form a streaming list, ended by a marked bookmark.
    initial_list: bool,
    live: broadcast::Receiver<Arc<Event>>,
    shutdown: watch::Receiver<bool>,
    filter: Filter,
    bookmarks: bool,
    timeout: Duration,
    revision: u64,
    /// `apiVersion` and `kind` of the watched objects, for bookmarks.
    type_meta: (&'static str, &'static str),
}

/// The parameters of a watch request.
#[derive(Debug)]
pub(crate) struct WatchRequest<'a> {
    pub(crate) filter: Filter,
    pub(crate) resource_version: Option<&'a str>,
    pub(crate) bookmarks: bool,
    pub(crate) send_initial_events: bool,
    pub(crate) timeout_seconds: Option<u64>,
    pub(crate) type_meta: (&'static str, &'static str),
}

/// The outcome of opening a watch: a stream, or 410 Gone for a compacted resourceVersion.
#[derive(Debug)]
pub(crate) enum Opened {
    Stream(Box<WatchStart>),
    Expired { requested: u64, oldest: u64 },
}

impl EventLog {
    /// Opens a watch. `current` lists the objects of the watched resource as they are now, for a
    /// watch without a resourceVersion (or `0`, or a streaming list), which starts with them.
    pub(crate) fn open(
        &self,
        request: WatchRequest<'_>,
        current: impl FnOnce() -> Vec<Value>,
        revision: u64,
    ) -> Result<Opened, String> {
        let from = match request.resource_version {
            None | Some("" | "0") => None,
            Some(rv) => Some(
                rv.parse::<u64>()
                    .map_err(|_| format!("invalid resourceVersion {rv:?}"))?,
            ),
        };
        let initial = match from {
            Some(from) if !request.send_initial_events => {
                if from < self.compacted {
                    return Ok(Opened::Expired {
                        requested: from,
                        oldest: self.compacted,
                    });
                }
                self.history
                    .iter()
                    .filter(|e| e.revision > from && request.filter.wants(e))
                    .map(|e| (e.kind, e.object.clone()))
                    .collect()
            }
            _ => current()
                .into_iter()
                .filter(|o| request.filter.selects(o))
                .map(|o| ("ADDED", o))
                .collect(),
        };
        Ok(Opened::Stream(Box::new(WatchStart {
            initial,
            initial_list: request.send_initial_events,
            live: self.sender.subscribe(),
            shutdown: self.shutdown.subscribe(),
            filter: request.filter,
            bookmarks: request.bookmarks || request.send_initial_events,
            timeout: request
                .timeout_seconds
                .map_or(DEFAULT_TIMEOUT, Duration::from_secs),
            revision,
            type_meta: request.type_meta,
        })))
    }
}

fn line(kind: &str, object: &Value) -> Result<Bytes, Infallible> {
    let mut text = json!({ "type": kind, "object": object }).to_string();
    text.push('\n');
    Ok(Bytes::from(text))
}

/// The `ERROR` event kube-apiserver sends for a watch from a compacted resourceVersion.
pub(crate) fn expired_body(requested: u64, oldest: u64) -> Body {
    let status = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": format!("too old resource version: {requested} ({oldest})"),
        "reason": "Expired",
        "code": 410,
    });
    Body::from(line("ERROR", &status).unwrap_or_default())
}

fn bookmark(start: &WatchStart, revision: u64, end_of_initial: bool) -> Result<Bytes, Infallible> {
    let mut metadata = json!({ "resourceVersion": revision.to_string() });
    if end_of_initial {
        metadata["annotations"] = json!({ INITIAL_EVENTS_END: "true" });
    }
    line(
        "BOOKMARK",
        &json!({ "apiVersion": start.type_meta.0, "kind": start.type_meta.1, "metadata": metadata }),
    )
}

/// Streams a watch: the initial events, then live changes, until the timeout, the client leaves,
/// the watcher falls too far behind, or the server stops.
pub(crate) fn stream(mut start: WatchStart) -> Body {
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(async move {
        let initial = std::mem::take(&mut start.initial);
        for (kind, object) in &initial {
            if tx.send(line(kind, object)).await.is_err() {
                return;
            }
        }
        let mut revision = start.revision;
        if start.bookmarks
            && tx
                .send(bookmark(&start, revision, start.initial_list))
                .await
                .is_err()
        {
            return;
        }
        let deadline = tokio::time::sleep(start.timeout);
        tokio::pin!(deadline);
        let mut ticks = tokio::time::interval(BOOKMARK_EVERY);
        ticks.tick().await;
        loop {
            let sent = tokio::select! {
                () = &mut deadline => break,
                _ = start.shutdown.changed() => break,
                _ = ticks.tick(), if start.bookmarks => tx.send(bookmark(&start, revision, false)).await,
                event = start.live.recv() => match event {
                    Ok(event) => {
                        revision = revision.max(event.revision);
                        if !start.filter.wants(&event) {
                            continue;
                        }
                        tx.send(line(event.kind, &event.object)).await
                    }
                    // Lagged or closed: end the watch; a client re-watches from its last version.
                    Err(_) => break,
                },
            };
            if sent.is_err() {
                break;
            }
        }
    });
    Body::from_stream(ReceiverStream::new(rx))
}
