//! A document decoded into a typed Kubernetes object as the API server decodes a request body
//! with strict field validation (`kubectl apply`'s default): a value of the wrong type fails,
//! and so does every field the type does not declare. Both are reported with their path.

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::Problem;

/// Every problem the API server's strict decoding of `doc` into `K` reports: the type error
/// (decoding stops at the first, as Go's does) or every unknown field.
pub fn decode<K: DeserializeOwned>(doc: &Value) -> Result<(), Vec<Problem>> {
    if let Err(e) = serde_path_to_error::deserialize::<_, K>(doc) {
        return Err(vec![Problem::new(
            error_path(e.path()),
            format!("wrong value: {}", e.inner()),
        )]);
    }
    let mut unknown = Vec::new();
    let decoded: Result<K, _> = serde_ignored::deserialize(doc, |path| {
        unknown.push(Problem::new(
            ignored_path(&path),
            "unknown field (strict field validation rejects it)",
        ));
    });
    if let Err(e) = decoded {
        return Err(vec![Problem::new(".", format!("wrong value: {e}"))]);
    }
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(unknown)
    }
}

/// `.spec.containers[0].name`, the API server's way of writing a field path.
fn error_path(path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            serde_path_to_error::Segment::Map { key } => {
                out.push('.');
                out.push_str(key);
            }
            serde_path_to_error::Segment::Enum { variant } => {
                out.push('.');
                out.push_str(variant);
            }
            serde_path_to_error::Segment::Unknown => out.push_str(".?"),
        }
    }
    if out.is_empty() { ".".into() } else { out }
}

fn ignored_path(path: &serde_ignored::Path<'_>) -> String {
    fn walk(path: &serde_ignored::Path<'_>, out: &mut String) {
        match path {
            serde_ignored::Path::Root => {}
            serde_ignored::Path::Seq { parent, index } => {
                walk(parent, out);
                out.push_str(&format!("[{index}]"));
            }
            serde_ignored::Path::Map { parent, key } => {
                walk(parent, out);
                out.push('.');
                out.push_str(key);
            }
            serde_ignored::Path::Some { parent }
            | serde_ignored::Path::NewtypeStruct { parent }
            | serde_ignored::Path::NewtypeVariant { parent } => walk(parent, out),
        }
    }
    let mut out = String::new();
    walk(path, &mut out);
    if out.is_empty() { ".".into() } else { out }
}
