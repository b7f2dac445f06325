//! List pagination: `limit`, and the opaque `continue` token that resumes a list.
//!
//! A token carries the resourceVersion of the list's first page and the key of the last object
//! returned, so every page of one list is cut from the same snapshot and each object is returned
//! exactly once. Pure: no I/O.

use std::collections::BTreeMap;
use std::ops::Bound;

use super::error::ApiError;
use super::store::ObjectKey;

/// Where a paginated list resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContinueToken {
    /// resourceVersion of the snapshot the list is cut from.
    pub(crate) rv: u64,
    /// The last key already returned.
    pub(crate) after: ObjectKey,
}

impl ContinueToken {
    /// Hex of `rv \n namespace \n name`: opaque to clients and safe in a query string.
    pub(crate) fn encode(&self) -> String {
        let plain = format!("{}\n{}\n{}", self.rv, self.after.namespace, self.after.name);
        plain.bytes().map(|b| format!("{b:02x}")).collect()
    }

    pub(crate) fn decode(token: &str) -> Result<Self, ApiError> {
        let invalid = || ApiError::BadRequest(format!("continue key is not valid: {token:?}"));
        if !token.len().is_multiple_of(2) || !token.is_ascii() {
            return Err(invalid());
        }
        let bytes = (0..token.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&token[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| invalid())?;
        let plain = String::from_utf8(bytes).map_err(|_| invalid())?;
        let mut parts = plain.splitn(3, '\n');
        let (Some(rv), Some(namespace), Some(name)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        let rv = rv.parse().map_err(|_| invalid())?;
        Ok(Self {
            rv,
            after: ObjectKey {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            },
        })
    }
}

/// One page: up to `limit` matching objects after `after` (exclusive), in key order, and the key to
/// resume from if more matching objects follow. `limit` of `None` or 0 means everything.
pub(crate) fn page<V: Clone>(
    objects: &BTreeMap<ObjectKey, V>,
    matches: impl Fn(&V) -> bool,
    after: Option<&ObjectKey>,
    limit: Option<usize>,
) -> (Vec<V>, Option<ObjectKey>) {
    let start = match after {
        Some(key) => Bound::Excluded(key),
        None => Bound::Unbounded,
    };
    let limit = limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
    let mut items = Vec::new();
    let mut last = None;
    for (key, value) in objects
        .range((start, Bound::Unbounded))
        .filter(|(_, v)| matches(v))
    {
        if items.len() == limit {
            return (items, last);
        }
        items.push(value.clone());
        last = Some(key.clone());
    }
    (items, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, name: &str) -> ObjectKey {
        ObjectKey {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    #[test]
    fn token_round_trips_and_is_query_safe() {
        let token = ContinueToken {
            rv: 1234,
            after: key("kube-system", "coredns"),
        };
        let encoded = token.encode();
        assert!(encoded.bytes().all(|b| b.is_ascii_hexdigit()), "{encoded}");
        assert_eq!(ContinueToken::decode(&encoded).unwrap(), token);
        let cluster = ContinueToken {
            rv: 7,
            after: key("", "node-1"),
        };
        assert_eq!(ContinueToken::decode(&cluster.encode()).unwrap(), cluster);
    }

    #[test]
    fn garbage_tokens_are_bad_requests() {
        for bad in ["", "abc", "zz", "6869", "é1"] {
            let err = ContinueToken::decode(bad).unwrap_err();
            assert_eq!(err.code(), 400, "{bad:?}");
        }
    }

    #[test]
    fn pages_cover_every_match_exactly_once() {
        let mut objects = BTreeMap::new();
        for (ns, name, v) in [
            ("a", "1", 1),
            ("a", "2", 2),
            ("b", "1", 3),
            ("b", "2", 4),
            ("c", "1", 5),
        ] {
            objects.insert(key(ns, name), v);
        }
        let odd = |v: &i32| v % 2 == 1;
        let (first, next) = page(&objects, odd, None, Some(2));
        assert_eq!(first, vec![1, 3]);
        let next = next.expect("more pages");
        assert_eq!(next, key("b", "1"));
        let (second, next) = page(&objects, odd, Some(&next), Some(2));
        assert_eq!(second, vec![5]);
        assert_eq!(next, None, "the last page has no continue token");
    }

    #[test]
    fn exact_fit_has_no_continue_and_zero_means_all() {
        let mut objects = BTreeMap::new();
        objects.insert(key("", "x"), 1);
        objects.insert(key("", "y"), 2);
        assert_eq!(page(&objects, |_| true, None, Some(2)), (vec![1, 2], None));
        assert_eq!(page(&objects, |_| true, None, Some(0)), (vec![1, 2], None));
        assert_eq!(page(&objects, |_| true, None, None), (vec![1, 2], None));
        assert_eq!(
            page(&objects, |_| true, Some(&key("", "y")), Some(1)),
            (vec![], None)
        );
    }
}
