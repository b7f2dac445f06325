//! Watch semantics: where a watch starts, which history it replays, and what each change looks
//! like to a watcher with selectors.
//!
//! Owns the decisions (start point from `resourceVersion`/`sendInitialEvents`, replay or 410,
//! ADDED/MODIFIED/DELETED translation when an object enters or leaves a selector, bookmark and
//! error objects, the newline-delimited wire form). Pure: the store feeds it data and the HTTP
//! layer writes what it returns.

use std::collections::VecDeque;
use std::sync::Arc;

use serde_json::{Value, json};

use super::error::ApiError;
use super::registry::ResourceType;
use super::request::Shape;
use super::selector::ObjectFilter;
use super::store::ObjectKey;

/// What a write did to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One write, as kept in a resource's history and sent to its watchers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Change {
    /// resourceVersion of the write.
    pub(crate) rv: u64,
    pub(crate) kind: ChangeType,
    pub(crate) key: ObjectKey,
    /// The object after the write; for a delete, the last state stamped with the delete's rv.
    pub(crate) object: Arc<Value>,
    /// The object before the write (`None` for an add).
    pub(crate) previous: Option<Arc<Value>>,
}

/// Where a watch begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WatchStart {
    /// `resourceVersion` unset or "0": synthetic ADDED for every current object, then live.
    CurrentState,
    /// `sendInitialEvents=true`: ADDED for every current object, a bookmark marking the end of the
    /// initial events, then live.
    InitialEvents,
    /// `sendInitialEvents=false` without a resourceVersion: live changes only.
    Now,
    /// A resourceVersion: every retained change after it, then live.
    After(u64),
}

/// Reads the start point from the query's `resourceVersion` and `sendInitialEvents`.
pub(crate) fn watch_start(
    rv: Option<&str>,
    send_initial_events: Option<bool>,
) -> Result<WatchStart, ApiError> {
    if send_initial_events == Some(true) {
        return Ok(WatchStart::InitialEvents);
    }
    match rv {
        None | Some("" | "0") if send_initial_events == Some(false) => Ok(WatchStart::Now),
        None | Some("" | "0") => Ok(WatchStart::CurrentState),
        Some(rv) => rv
            .parse()
            .map(WatchStart::After)
            .map_err(|_| ApiError::BadRequest(format!("invalid resource version: {rv:?}"))),
    }
}

/// The retained changes after `from`, or 410 if changes after `from` were already forgotten.
/// `since` is the resourceVersion up to which history was dropped: the history holds every change
/// with a greater resourceVersion.
pub(crate) fn replay(
    history: &VecDeque<Arc<Change>>,
    since: u64,
    from: u64,
) -> Result<Vec<Arc<Change>>, ApiError> {
    if from < since {
        return Err(ApiError::Expired {
            requested: from,
            oldest: since,
        });
    }
    Ok(history.iter().filter(|c| c.rv > from).cloned().collect())
}

/// The type field of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
    Bookmark,
    Error,
}

impl EventType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
            EventType::Bookmark => "BOOKMARK",
            EventType::Error => "ERROR",
        }
    }
}

/// One watch event, ready to be written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Frame {
    pub(crate) event: EventType,
    pub(crate) object: Arc<Value>,
}

impl Frame {
    pub(crate) fn added(object: Arc<Value>) -> Self {
        Frame {
            event: EventType::Added,
            object,
        }
    }

    /// A BOOKMARK: only the kind and a resourceVersion, plus the end-of-initial-events annotation
    /// for a streaming list.
    pub(crate) fn bookmark(rt: &ResourceType, rv: u64, initial_events_end: bool) -> Self {
        let mut metadata = json!({ "resourceVersion": rv.to_string() });
        if initial_events_end && let Some(map) = metadata.as_object_mut() {
            map.insert(
                "annotations".to_owned(),
                json!({ "k8s.io/initial-events-end": "true" }),
            );
        }
        let object =
            json!({ "kind": rt.kind, "apiVersion": rt.api_version(), "metadata": metadata });
        Frame {
            event: EventType::Bookmark,
            object: Arc::new(object),
        }
    }

    /// An ERROR event carrying a `Status`, e.g. 410 Expired.
    pub(crate) fn error(err: &ApiError) -> Self {
        Frame {
            event: EventType::Error,
            object: Arc::new(err.status()),
        }
    }

    /// The JSON line on the wire. Objects take the requested shape; bookmarks and errors do not.
    pub(crate) fn line(&self, shape: Shape) -> String {
        let object = match self.event {
            EventType::Bookmark | EventType::Error => (*self.object).clone(),
            _ => shape.object(&self.object),
        };
        let mut line = json!({ "type": self.event.as_str(), "object": object }).to_string();
        line.push('\n');
        line
    }
}

/// What a watcher with `filter` sees of `change`: an object that starts matching is ADDED, one that
/// stops matching is DELETED, one that never matched is nothing.
pub(crate) fn translate(filter: &ObjectFilter, change: &Change) -> Option<Frame> {
    let is = filter.matches(&change.object);
    let was = change
        .previous
        .as_deref()
        .is_some_and(|p| filter.matches(p));
    let event = match (change.kind, was, is) {
        (ChangeType::Added, _, true) | (ChangeType::Modified, false, true) => EventType::Added,
        (ChangeType::Modified, true, true) => EventType::Modified,
        (ChangeType::Modified, true, false) => EventType::Deleted,
        (ChangeType::Deleted, was, is) if was || is => EventType::Deleted,
        _ => return None,
    };
    Some(Frame {
        event,
        object: Arc::clone(&change.object),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::selector::LabelSelector;

    fn change(
        rv: u64,
        kind: ChangeType,
        labels_before: Option<&str>,
        labels_after: &str,
    ) -> Change {
        let obj = |app: &str, rv: u64| {
            Arc::new(
                json!({ "metadata": { "name": "x", "namespace": "default", "labels": { "app": app }, "resourceVersion": rv.to_string() } }),
            )
        };
        Change {
            rv,
            kind,
            key: ObjectKey {
                namespace: "default".into(),
                name: "x".into(),
            },
            object: obj(labels_after, rv),
            previous: labels_before.map(|app| obj(app, rv - 1)),
        }
    }

    fn web_filter() -> ObjectFilter {
        ObjectFilter {
            labels: LabelSelector::parse("app=web").unwrap(),
            ..Default::default()
        }
    }

    #[test]
    fn start_points() {
        assert_eq!(watch_start(None, None), Ok(WatchStart::CurrentState));
        assert_eq!(watch_start(Some(""), None), Ok(WatchStart::CurrentState));
        assert_eq!(watch_start(Some("0"), None), Ok(WatchStart::CurrentState));
        assert_eq!(
            watch_start(Some("0"), Some(true)),
            Ok(WatchStart::InitialEvents)
        );
        assert_eq!(
            watch_start(Some("123"), Some(true)),
            Ok(WatchStart::InitialEvents)
        );
        assert_eq!(watch_start(None, Some(false)), Ok(WatchStart::Now));
        assert_eq!(
            watch_start(Some("123"), Some(false)),
            Ok(WatchStart::After(123))
        );
        assert_eq!(watch_start(Some("123"), None), Ok(WatchStart::After(123)));
        assert_eq!(watch_start(Some("abc"), None).unwrap_err().code(), 400);
    }

    #[test]
    fn replay_returns_changes_after_the_version() {
        let history: VecDeque<_> = (101..=105)
            .map(|rv| Arc::new(change(rv, ChangeType::Modified, Some("web"), "web")))
            .collect();
        let rvs = |from| {
            replay(&history, 100, from)
                .unwrap()
                .iter()
                .map(|c| c.rv)
                .collect::<Vec<_>>()
        };
        assert_eq!(rvs(100), vec![101, 102, 103, 104, 105]);
        assert_eq!(rvs(103), vec![104, 105]);
        assert_eq!(rvs(105), Vec::<u64>::new());
        assert_eq!(
            rvs(999),
            Vec::<u64>::new(),
            "a future version waits for live events"
        );
    }

    #[test]
    fn replay_from_before_the_retained_history_is_gone() {
        let err = replay(&VecDeque::new(), 150, 120).unwrap_err();
        assert_eq!(
            err,
            ApiError::Expired {
                requested: 120,
                oldest: 150
            }
        );
        assert_eq!(err.code(), 410);
        assert!(
            replay(&VecDeque::new(), 150, 150).unwrap().is_empty(),
            "exactly `since` is still servable"
        );
    }

    #[test]
    fn selector_transitions() {
        let filter = web_filter();
        let event = |c: Change| translate(&filter, &c).map(|f| f.event);
        assert_eq!(
            event(change(2, ChangeType::Added, None, "web")),
            Some(EventType::Added)
        );
        assert_eq!(event(change(2, ChangeType::Added, None, "db")), None);
        assert_eq!(
            event(change(2, ChangeType::Modified, Some("web"), "web")),
            Some(EventType::Modified)
        );
        assert_eq!(
            event(change(2, ChangeType::Modified, Some("db"), "web")),
            Some(EventType::Added)
        );
        assert_eq!(
            event(change(2, ChangeType::Modified, Some("web"), "db")),
            Some(EventType::Deleted)
        );
        assert_eq!(
            event(change(2, ChangeType::Modified, Some("db"), "db")),
            None
        );
        assert_eq!(
            event(change(2, ChangeType::Deleted, Some("web"), "web")),
            Some(EventType::Deleted)
        );
        assert_eq!(
            event(change(2, ChangeType::Deleted, Some("db"), "db")),
            None
        );
        assert_eq!(
            event(change(2, ChangeType::Modified, Some("db"), "db")),
            None
        );
    }

    #[test]
    fn a_selector_leaver_is_deleted_with_its_new_state() {
        let frame = translate(
            &web_filter(),
            &change(9, ChangeType::Modified, Some("web"), "db"),
        )
        .unwrap();
        assert_eq!(
            frame.object["metadata"]["resourceVersion"], "9",
            "carries the new resourceVersion"
        );
    }

    #[test]
    fn bookmark_and_error_lines() {
        let rt =
            ResourceType::namespaced("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice");
        let line = Frame::bookmark(&rt, 42, false).line(Shape::Full);
        assert!(line.ends_with('\n'));
        let parsed: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            parsed,
            json!({ "type": "BOOKMARK", "object": { "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1", "metadata": { "resourceVersion": "42" } } })
        );
        let end: Value =
            serde_json::from_str(&Frame::bookmark(&rt, 42, true).line(Shape::Metadata)).unwrap();
        assert_eq!(
            end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
            "true"
        );
        assert_eq!(
            end["object"]["kind"], "EndpointSlice",
            "bookmarks are not reshaped"
        );

        let gone: Value = serde_json::from_str(
            &Frame::error(&ApiError::Expired {
                requested: 1,
                oldest: 2,
            })
            .line(Shape::Full),
        )
        .unwrap();
        assert_eq!(gone["type"], "ERROR");
        assert_eq!(gone["object"]["code"], 410);
        assert_eq!(gone["object"]["reason"], "Expired");
    }
}
