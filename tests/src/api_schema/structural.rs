//! What the API server's validation of an apiextensions.k8s.io/v1 CustomResourceDefinition
//! rejects beyond decoding: a name that is not `<plural>.<group>`, versions without exactly one
//! storage version, printer columns of unknown types, and above all a schema that is not
//! structural (Kubernetes documentation, "Specifying a structural schema"): every specified
//! field and array item has a type; logical junctors (`allOf`, `anyOf`, `oneOf`, `not`) only
//! restrict fields specified outside them and set no type, description, default, nullable or
//! additionalProperties; `metadata` restricts nothing but `name` and `generateName`; and none of
//! the JSON-Schema keywords CRDs forbid (`$ref`, `definitions`, `patternProperties`, ...).
//!
//! Paths are written as the API server writes them (`.properties[spec].properties[cidr].type`).

use serde_json::{Map, Value};

use super::Problem;

const TYPES: [&str; 6] = ["object", "array", "string", "integer", "number", "boolean"];
const FORBIDDEN: [&str; 7] = [
    "$ref",
    "$schema",
    "definitions",
    "dependencies",
    "additionalItems",
    "patternProperties",
    "id",
];
const NOT_IN_JUNCTORS: [&str; 5] = [
    "type",
    "description",
    "default",
    "additionalProperties",
    "nullable",
];
const PRINTER_COLUMN_TYPES: [&str; 5] = ["integer", "number", "string", "boolean", "date"];

/// Everything the API server's CRD validation rejects in `crd` (a decoded JSON document).
pub fn check_crd(crd: &Value) -> Vec<Problem> {
    let mut out = Vec::new();
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or_default();
    let plural = spec["names"]["plural"].as_str().unwrap_or_default();
    let want = format!("{plural}.{group}");
    if crd["metadata"]["name"].as_str() != Some(want.as_str()) {
        out.push(Problem::new(
            ".metadata.name",
            format!("must be spec.names.plural+\".\"+spec.group: {want:?}"),
        ));
    }
    if !matches!(spec["scope"].as_str(), Some("Cluster" | "Namespaced")) {
        out.push(Problem::new(".spec.scope", "must be Cluster or Namespaced"));
    }
    let versions = spec["versions"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if versions.is_empty() {
        out.push(Problem::new(
            ".spec.versions",
            "must have at least one version",
        ));
    }
    let storage = versions.iter().filter(|v| v["storage"] == true).count();
    if !versions.is_empty() && storage != 1 {
        out.push(Problem::new(
            ".spec.versions",
            format!("must have exactly one version marked as storage version, not {storage}"),
        ));
    }
    for (i, v) in versions.iter().enumerate() {
        let at = format!(".spec.versions[{i}]");
        if versions[..i].iter().any(|w| w["name"] == v["name"]) {
            out.push(Problem::new(format!("{at}.name"), "duplicate version name"));
        }
        for (j, c) in v["additionalPrinterColumns"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let at = format!("{at}.additionalPrinterColumns[{j}]");
            if !c["type"]
                .as_str()
                .is_some_and(|t| PRINTER_COLUMN_TYPES.contains(&t))
            {
                out.push(Problem::new(
                    format!("{at}.type"),
                    format!("must be one of {PRINTER_COLUMN_TYPES:?}"),
                ));
            }
            if !c["jsonPath"].as_str().is_some_and(|p| p.starts_with('.')) {
                out.push(Problem::new(
                    format!("{at}.jsonPath"),
                    "must be a JSON path starting with .",
                ));
            }
        }
        let at = format!("{at}.schema.openAPIV3Schema");
        match &v["schema"]["openAPIV3Schema"] {
            Value::Null => out.push(Problem::new(at, "schemas are required")),
            root => structural_root(root, &at, &mut out),
        }
    }
    out
}

/// The fields of `crd`'s printer columns that its schema does not have: the API server accepts
/// them, but the column then stays empty.
pub fn printer_columns_without_field(crd: &Value) -> Vec<Problem> {
    let mut out = Vec::new();
    for (i, v) in crd["spec"]["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let schema = &v["schema"]["openAPIV3Schema"];
        for (j, c) in v["additionalPrinterColumns"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let path = c["jsonPath"].as_str().unwrap_or_default();
            let mut node = schema;
            for field in path.trim_start_matches('.').split('.') {
                node = &node["properties"][field];
            }
            if node.is_null() {
                out.push(Problem::new(
                    format!(".spec.versions[{i}].additionalPrinterColumns[{j}].jsonPath"),
                    format!("{path} is no field of the version's schema"),
                ));
            }
        }
    }
    out
}

fn structural_root(root: &Value, at: &str, out: &mut Vec<Problem>) {
    if root["type"] != "object" {
        out.push(Problem::new(
            format!("{at}.type"),
            "must be object at the root",
        ));
    }
    if let Some(meta) = root["properties"].get("metadata") {
        let only_names = meta.as_object().is_some_and(|m| {
            m.keys().all(|k| k == "type" || k == "properties")
                && m.get("properties").is_none_or(|p| {
                    p.as_object()
                        .is_some_and(|p| p.keys().all(|k| k == "name" || k == "generateName"))
                })
        });
        if !only_names {
            out.push(Problem::new(
                format!("{at}.properties[metadata]"),
                "must not specify anything other than name and generateName",
            ));
        }
    }
    node(root, at, Place::Specified, out);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Place<'a> {
    /// The root, a field of `properties`, `additionalProperties` or `items`: needs a type.
    Specified,
    /// Inside a logical junctor of the schema `outside`, which its fields must also be in.
    InJunctor { outside: &'a Map<String, Value> },
}

fn node(schema: &Value, at: &str, place: Place<'_>, out: &mut Vec<Problem>) {
    let Some(s) = schema.as_object() else {
        out.push(Problem::new(at, "must be a schema object"));
        return;
    };
    for k in FORBIDDEN {
        if s.contains_key(k) {
            out.push(Problem::new(
                format!("{at}.{k}"),
                "Forbidden: not supported in CRD schemas",
            ));
        }
    }
    if s.get("uniqueItems") == Some(&Value::Bool(true)) {
        out.push(Problem::new(
            format!("{at}.uniqueItems"),
            "Forbidden: uniqueItems cannot be set to true",
        ));
    }
    if s.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(false)) {
        out.push(Problem::new(
            format!("{at}.x-kubernetes-preserve-unknown-fields"),
            "must be true or undefined",
        ));
    }
    let int_or_string = s.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    let preserve = s.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    let ty = s.get("type").and_then(Value::as_str).unwrap_or_default();
    match place {
        Place::Specified => {
            if ty.is_empty() && !int_or_string && !preserve {
                out.push(Problem::new(
                    format!("{at}.type"),
                    "Required value: must not be empty for specified fields",
                ));
            }
            if !ty.is_empty() && !TYPES.contains(&ty) {
                out.push(Problem::new(
                    format!("{at}.type"),
                    format!("must be one of {TYPES:?}"),
                ));
            }
            if ty == "array" && !s.contains_key("items") {
                out.push(Problem::new(
                    format!("{at}.items"),
                    "Required value: must be specified for an array",
                ));
            }
        }
        Place::InJunctor { outside } => {
            for k in NOT_IN_JUNCTORS {
                if s.contains_key(k) {
                    out.push(Problem::new(
                        format!("{at}.{k}"),
                        "Forbidden: must not be set inside allOf, anyOf, oneOf or not",
                    ));
                }
            }
            let outside_fields = outside.get("properties").and_then(Value::as_object);
            for k in s
                .get("properties")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                if !outside_fields.is_some_and(|f| f.contains_key(k.0)) {
                    out.push(Problem::new(
                        format!("{at}.properties[{}]", k.0),
                        "Required value: must be specified outside the logical junctors too",
                    ));
                }
            }
            if s.contains_key("items") && !outside.contains_key("items") {
                out.push(Problem::new(
                    format!("{at}.items"),
                    "Required value: must be specified outside the logical junctors too",
                ));
            }
        }
    }
    if s.contains_key("properties") && s.contains_key("additionalProperties") {
        out.push(Problem::new(
            format!("{at}.additionalProperties"),
            "Forbidden: additionalProperties and properties are mutually exclusive",
        ));
    }
    // A default must be valid (the API server checks it against the schema; the type here).
    if let Some(v) = s.get("default")
        && !value_fits(v, ty)
    {
        out.push(Problem::new(
            format!("{at}.default"),
            format!("{v} is not of type {ty}"),
        ));
    }

    // Recurse: specified fields and items need their own types; inside a junctor, what a
    // field restricts must be specified by the same field outside it.
    let child = |key: &str, name: Option<&str>| -> Option<Place<'_>> {
        match place {
            Place::Specified => Some(Place::Specified),
            Place::InJunctor { outside } => {
                let o = outside.get(key)?;
                let o = match name {
                    Some(n) => o.get(n)?,
                    None => o,
                };
                o.as_object().map(|outside| Place::InJunctor { outside })
            }
        }
    };
    for (k, v) in s
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        if let Some(p) = child("properties", Some(k)) {
            node(v, &format!("{at}.properties[{k}]"), p, out);
        }
    }
    match s.get("additionalProperties") {
        Some(v @ Value::Object(_)) => {
            if let Some(p) = child("additionalProperties", None) {
                node(v, &format!("{at}.additionalProperties"), p, out);
            }
        }
        Some(Value::Bool(_)) | None => {}
        Some(_) => out.push(Problem::new(
            format!("{at}.additionalProperties"),
            "must be a schema or a boolean",
        )),
    }
    match s.get("items") {
        Some(v @ Value::Object(_)) => {
            if let Some(p) = child("items", None) {
                node(v, &format!("{at}.items"), p, out);
            }
        }
        Some(Value::Array(_)) => out.push(Problem::new(
            format!("{at}.items"),
            "Forbidden: items must be a schema object and not an array",
        )),
        Some(_) => out.push(Problem::new(
            format!("{at}.items"),
            "must be a schema object",
        )),
        None => {}
    }
    let junctor = Place::InJunctor { outside: s };
    for key in ["allOf", "anyOf", "oneOf"] {
        for (i, v) in s
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            // The one exception: x-kubernetes-int-or-string spelled out as
            // anyOf: [{type: integer}, {type: string}].
            if int_or_string && is_int_or_string_branch(v) {
                continue;
            }
            node(v, &format!("{at}.{key}[{i}]"), junctor, out);
        }
    }
    if let Some(v) = s.get("not") {
        node(v, &format!("{at}.not"), junctor, out);
    }
}

fn is_int_or_string_branch(v: &Value) -> bool {
    v.as_object().is_some_and(|m| {
        m.len() == 1
            && matches!(
                m.get("type").and_then(Value::as_str),
                Some("integer" | "string")
            )
    })
}

/// Whether `v` is a JSON value of the schema type `ty` (anything fits an untyped node).
fn value_fits(v: &Value, ty: &str) -> bool {
    match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.as_i64().is_some() || v.as_u64().is_some(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => true,
    }
}
