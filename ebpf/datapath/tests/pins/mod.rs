//! Pinned maps written the way another version (or another process) would: through bpftool,
//! with no help from the crate under test.
#![allow(dead_code, reason = "each test crate uses part of it")]

use std::{path::Path, process::Command};

pub fn bpftool(args: &[&str]) {
    let out = Command::new("bpftool").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn hex(bytes: &[u8]) -> Vec<String> {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: the ABI types are plain integers without implicit padding.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(v).cast::<u8>(), size_of::<T>()) }
        .to_vec()
}

/// Creates and pins a map: `kind` as bpftool names it (`hash`, `lru_hash`), sizes in bytes.
pub fn create(pin: &Path, kind: &str, key: usize, value: usize, entries: u32, name: &str) {
    bpftool(&[
        "map",
        "create",
        &pin.display().to_string(),
        "type",
        kind,
        "key",
        &key.to_string(),
        "value",
        &value.to_string(),
        "entries",
        &entries.to_string(),
        "name",
        name,
    ]);
}

/// Writes one entry into the map pinned at `pin`.
pub fn update<K: Copy, V: Copy>(pin: &Path, k: &K, v: &V) {
    let mut args = vec![
        "map".to_owned(),
        "update".to_owned(),
        "pinned".to_owned(),
        pin.display().to_string(),
        "key".to_owned(),
        "hex".to_owned(),
    ];
    args.extend(hex(&bytes_of(k)));
    args.extend(["value".to_owned(), "hex".to_owned()]);
    args.extend(hex(&bytes_of(v)));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    bpftool(&args);
}
