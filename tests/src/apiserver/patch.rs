//! JSON patches: RFC 7386 merge patch and RFC 6902 JSON patch, on `serde_json::Value`.
//!
//! Owns only the document arithmetic; which content type selects which patch is the HTTP
//! layer's business. Strategic merge patches are served as merge patches (lists are replaced,
//! not merged by key). Pure: no I/O, never panics.

use serde_json::{Map, Value};

/// Why a JSON patch cannot be applied; the text goes to the client in a 400 `Status`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// The patch document is not a list of operations, or an operation lacks a field.
    #[error("invalid JSON patch: {0}")]
    Malformed(String),
    /// A path that names nothing (or whose parent does not exist).
    #[error("JSON patch {op} failed: path {path:?} does not exist")]
    NoSuchPath {
        /// The operation.
        op: String,
        /// The JSON pointer.
        path: String,
    },
    /// A `test` operation whose value differs.
    #[error("JSON patch test failed at {path:?}")]
    TestFailed {
        /// The JSON pointer.
        path: String,
    },
}

/// RFC 7386: `null` removes a key, objects merge recursively, anything else replaces.
pub fn merge_patch(target: &Value, patch: &Value) -> Value {
    let Value::Object(patch_map) = patch else {
        return patch.clone();
    };
    let mut result = match target {
        Value::Object(map) => map.clone(),
        _ => Map::new(),
    };
    for (key, value) in patch_map {
        if value.is_null() {
            result.remove(key);
        } else {
            let merged = merge_patch(result.get(key).unwrap_or(&Value::Null), value);
            result.insert(key.clone(), merged);
        }
    }
    Value::Object(result)
}

/// RFC 6902: applies `add`, `remove`, `replace`, `move`, `copy` and `test` in order; all or nothing.
pub fn json_patch(target: &Value, patch: &Value) -> Result<Value, PatchError> {
    let ops = patch.as_array().ok_or_else(|| {
        PatchError::Malformed("the patch must be a JSON array of operations".into())
    })?;
    let mut doc = target.clone();
    for op in ops {
        apply_op(&mut doc, op)?;
    }
    Ok(doc)
}

fn str_field<'a>(op: &'a Value, field: &str) -> Result<&'a str, PatchError> {
    op.get(field).and_then(Value::as_str).ok_or_else(|| {
        PatchError::Malformed(format!("operation {op} has no string field {field:?}"))
    })
}

fn apply_op(doc: &mut Value, op: &Value) -> Result<(), PatchError> {
    let name = str_field(op, "op")?;
    let path = str_field(op, "path")?;
    let value = || {
        op.get("value")
            .cloned()
            .ok_or_else(|| PatchError::Malformed(format!("operation {op} has no field \"value\"")))
    };
    let missing = || PatchError::NoSuchPath {
        op: name.to_owned(),
        path: path.to_owned(),
    };
    match name {
        "add" => add(doc, path, value()?).ok_or_else(missing),
        "remove" => remove(doc, path).map(drop).ok_or_else(missing),
        "replace" => {
            let slot = pointer_mut(doc, path).ok_or_else(missing)?;
            *slot = value()?;
            Ok(())
        }
        "move" => {
            let from = str_field(op, "from")?;
            if path.starts_with(from) && path[from.len()..].starts_with('/') {
                return Err(PatchError::Malformed(format!(
                    "cannot move {from:?} into its own child {path:?}"
                )));
            }
            let moved = remove(doc, from).ok_or_else(|| PatchError::NoSuchPath {
                op: name.to_owned(),
                path: from.to_owned(),
            })?;
            add(doc, path, moved).ok_or_else(missing)
        }
        "copy" => {
            let from = str_field(op, "from")?;
            let copied = pointer(doc, from)
                .cloned()
                .ok_or_else(|| PatchError::NoSuchPath {
                    op: name.to_owned(),
                    path: from.to_owned(),
                })?;
            add(doc, path, copied).ok_or_else(missing)
        }
        "test" => {
            let actual = pointer(doc, path).ok_or_else(missing)?;
            if *actual == value()? {
                Ok(())
            } else {
                Err(PatchError::TestFailed {
                    path: path.to_owned(),
                })
            }
        }
        other => Err(PatchError::Malformed(format!(
            "unknown operation {other:?}"
        ))),
    }
}

/// Splits a JSON pointer into unescaped reference tokens; `None` if it does not start with `/`.
fn tokens(path: &str) -> Option<Vec<String>> {
    if path.is_empty() {
        return Some(Vec::new());
    }
    let rest = path.strip_prefix('/')?;
    Some(
        rest.split('/')
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect(),
    )
}

fn pointer<'a>(doc: &'a Value, path: &str) -> Option<&'a Value> {
    let mut current = doc;
    for token in tokens(path)? {
        current = match current {
            Value::Object(map) => map.get(&token)?,
            Value::Array(items) => items.get(array_index(&token)?)?,
            _ => return None,
        };
    }
    Some(current)
}

fn pointer_mut<'a>(doc: &'a mut Value, path: &str) -> Option<&'a mut Value> {
    let mut current = doc;
    for token in tokens(path)? {
        current = match current {
            Value::Object(map) => map.get_mut(&token)?,
            Value::Array(items) => items.get_mut(array_index(&token)?)?,
            _ => return None,
        };
    }
    Some(current)
}

/// An array index token: digits only, no leading zero.
fn array_index(token: &str) -> Option<usize> {
    if token.is_empty()
        || !token.bytes().all(|b| b.is_ascii_digit())
        || (token.len() > 1 && token.starts_with('0'))
    {
        return None;
    }
    token.parse().ok()
}

/// The parent container of `path` and the last token; `None` for the root.
fn parent_mut<'a>(doc: &'a mut Value, path: &str) -> Option<(&'a mut Value, String)> {
    let mut tokens = tokens(path)?;
    let last = tokens.pop()?;
    let mut current = doc;
    for token in tokens {
        current = match current {
            Value::Object(map) => map.get_mut(&token)?,
            Value::Array(items) => items.get_mut(array_index(&token)?)?,
            _ => return None,
        };
    }
    Some((current, last))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Option<()> {
    if path.is_empty() {
        *doc = value;
        return Some(());
    }
    let (parent, last) = parent_mut(doc, path)?;
    match parent {
        Value::Object(map) => {
            map.insert(last, value);
        }
        Value::Array(items) if last == "-" => items.push(value),
        Value::Array(items) => {
            let index = array_index(&last).filter(|i| *i <= items.len())?;
            items.insert(index, value);
        }
        _ => return None,
    }
    Some(())
}

fn remove(doc: &mut Value, path: &str) -> Option<Value> {
    let (parent, last) = parent_mut(doc, path)?;
    match parent {
        Value::Object(map) => map.remove(&last),
        Value::Array(items) => {
            let index = array_index(&last).filter(|i| *i < items.len())?;
            Some(items.remove(index))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn merge_patch_rfc7386_examples() {
        // The examples of RFC 7386 appendix A: (target, patch, result).
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (target, patch, want) in cases {
            assert_eq!(merge_patch(&target, &patch), want, "{target} + {patch}");
        }
    }

    #[test]
    fn json_patch_operations() {
        let doc = json!({ "metadata": { "labels": { "a": "1" } }, "list": [1, 2, 3] });
        let patch = json!([
            { "op": "test", "path": "/metadata/labels/a", "value": "1" },
            { "op": "add", "path": "/metadata/labels/b~1c", "value": "2" },
            { "op": "replace", "path": "/list/0", "value": 10 },
            { "op": "remove", "path": "/list/1" },
            { "op": "add", "path": "/list/-", "value": 4 },
            { "op": "add", "path": "/list/0", "value": 0 },
            { "op": "copy", "from": "/metadata/labels/a", "path": "/copied" },
            { "op": "move", "from": "/copied", "path": "/moved" },
        ]);
        let got = json_patch(&doc, &patch).unwrap();
        assert_eq!(
            got,
            json!({ "metadata": { "labels": { "a": "1", "b/c": "2" } }, "list": [0, 10, 3, 4], "moved": "1" })
        );
    }

    #[test]
    fn json_patch_errors_leave_no_partial_result() {
        let doc = json!({ "a": 1, "list": [1] });
        let cases = [
            (json!({ "op": "add" }), "not an array"),
            (json!([{ "op": "remove", "path": "/nope" }]), "missing path"),
            (
                json!([{ "op": "replace", "path": "/nope", "value": 1 }]),
                "replace needs the path",
            ),
            (
                json!([{ "op": "add", "path": "/x/y", "value": 1 }]),
                "missing parent",
            ),
            (
                json!([{ "op": "add", "path": "/list/5", "value": 1 }]),
                "index past the end",
            ),
            (
                json!([{ "op": "add", "path": "/list/01", "value": 1 }]),
                "leading zero",
            ),
            (
                json!([{ "op": "test", "path": "/a", "value": 2 }]),
                "test mismatch",
            ),
            (json!([{ "op": "frobnicate", "path": "/a" }]), "unknown op"),
            (json!([{ "op": "add", "path": "/b" }]), "no value"),
            (
                json!([{ "op": "move", "from": "/list", "path": "/list/0" }]),
                "move into own child",
            ),
            (
                json!([{ "op": "add", "path": "a", "value": 1 }]),
                "pointer without slash",
            ),
        ];
        for (patch, why) in cases {
            assert!(json_patch(&doc, &patch).is_err(), "{why}: {patch}");
        }
    }

    #[test]
    fn json_patch_can_replace_the_root() {
        let got = json_patch(
            &json!({ "a": 1 }),
            &json!([{ "op": "add", "path": "", "value": [1] }]),
        )
        .unwrap();
        assert_eq!(got, json!([1]));
    }
}
