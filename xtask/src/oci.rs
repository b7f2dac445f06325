//! OCI image archives without Docker: a layer tarball of files, the image config, the manifest
//! and `index.json`, laid out as an OCI image layout and tarred into one archive that
//! `ctr images import`, `podman load` and `skopeo copy oci-archive:` accept.
//!
//! [`build`] writes the archive; [`check`] reads one back and verifies its structure (layout
//! version, every descriptor's digest and size, config and rootfs diff ids, media types, the
//! entrypoint present and executable in the layers, the reference name). Both are plain
//! functions over files; this module never runs a container tool.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// The annotation `podman load`/skopeo read the image name from.
pub const ANNOTATION_REF: &str = "org.opencontainers.image.ref.name";
/// The annotation `ctr images import` reads the image name from.
pub const ANNOTATION_CONTAINERD: &str = "io.containerd.image.name";

/// The reference of ferrox's image, as the manifests name it.
pub fn image_ref() -> String {
    format!("ghcr.io/ferrox/ferrox:{}", env!("CARGO_PKG_VERSION"))
}

/// A file of the image's single layer.
#[derive(Clone, Debug)]
pub struct File {
    /// Absolute path in the image, e.g. `/usr/bin/ferrox`.
    pub path: String,
    pub source: PathBuf,
    pub mode: u32,
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub reference: String,
    pub files: Vec<File>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    /// Gzip the layer (what registries and runtimes expect); off makes a plain tar layer,
    /// which is faster to build and just as valid.
    pub gzip: bool,
}

/// The ferrox image: both binaries from `bin_dir`, `ferrox` as the entrypoint, `agent` as the
/// default command (the DaemonSet passes its own arguments).
pub fn ferrox_spec(bin_dir: &Path, gzip: bool) -> Spec {
    let bin = |name: &str| File {
        path: format!("/usr/bin/{name}"),
        source: bin_dir.join(name),
        mode: 0o755,
    };
    Spec {
        reference: image_ref(),
        files: vec![bin("ferrox"), bin("ferrox-cni")],
        entrypoint: vec!["/usr/bin/ferrox".into()],
        cmd: vec!["agent".into()],
        env: vec!["PATH=/usr/bin:/bin".into()],
        gzip,
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn descriptor(media_type: &str, bytes: &[u8]) -> Value {
    json!({
        "mediaType": media_type,
        "digest": format!("sha256:{}", sha256_hex(bytes)),
        "size": bytes.len(),
    })
}

/// The layer tarball: parent directories, then the files, owned by root, mtime 0 (the same
/// inputs give the same digest).
fn layer_tar(files: &[File]) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for f in files {
        let rel = f.path.trim_start_matches('/');
        let mut acc = String::new();
        let parts: Vec<&str> = rel.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            acc.push_str(part);
            acc.push('/');
            dirs.insert(acc.clone());
        }
    }
    for d in &dirs {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        h.set_path(d)?;
        h.set_cksum();
        b.append(&h, std::io::empty())?;
    }
    for f in files {
        let data =
            std::fs::read(&f.source).with_context(|| format!("reading {}", f.source.display()))?;
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(f.mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        h.set_path(f.path.trim_start_matches('/'))?;
        h.set_cksum();
        b.append(&h, data.as_slice())?;
    }
    Ok(b.into_inner()?)
}

/// What [`build`] wrote.
#[derive(Debug)]
pub struct Built {
    pub archive: PathBuf,
    pub archive_size: u64,
    pub manifest_digest: String,
    pub layer_size: usize,
    pub uncompressed_layer_size: usize,
}

/// Writes the image described by `spec` as an OCI archive at `out`.
pub fn build(spec: &Spec, out: &Path) -> anyhow::Result<Built> {
    let layer = layer_tar(&spec.files)?;
    let diff_id = format!("sha256:{}", sha256_hex(&layer));
    let uncompressed_layer_size = layer.len();
    let (layer_blob, layer_media) = if spec.gzip {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&layer)?;
        (gz.finish()?, MEDIA_LAYER_GZIP)
    } else {
        (layer, MEDIA_LAYER_TAR)
    };
    let config = json!({
        "created": "1970-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": spec.entrypoint,
            "Cmd": spec.cmd,
            "Env": spec.env,
            "Labels": {
                "org.opencontainers.image.title": "ferrox",
                "org.opencontainers.image.version": env!("CARGO_PKG_VERSION"),
            },
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [ { "created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask image" } ],
    });
    let config = serde_json::to_vec(&config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": descriptor(MEDIA_CONFIG, &config),
        "layers": [ descriptor(layer_media, &layer_blob) ],
    }))?;
    let mut manifest_desc = descriptor(MEDIA_MANIFEST, &manifest);
    manifest_desc["annotations"] = json!({
        ANNOTATION_REF: spec.reference,
        ANNOTATION_CONTAINERD: spec.reference,
    });
    manifest_desc["platform"] = json!({ "architecture": "amd64", "os": "linux" });
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [ manifest_desc ],
    }))?;

    let mut entries: Vec<(String, &[u8])> = vec![
        ("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#),
        ("index.json".into(), &index),
    ];
    for blob in [&config, &manifest, &layer_blob] {
        entries.push((
            format!("blobs/sha256/{}", sha256_hex(blob)),
            blob.as_slice(),
        ));
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = out.with_extension("tar.partial");
    {
        let f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut b = tar::Builder::new(std::io::BufWriter::new(f));
        for dir in ["blobs/", "blobs/sha256/"] {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_mtime(0);
            h.set_size(0);
            h.set_path(dir)?;
            h.set_cksum();
            b.append(&h, std::io::empty())?;
        }
        for (path, data) in &entries {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_size(data.len() as u64);
            h.set_path(path)?;
            h.set_cksum();
            b.append(&h, *data)?;
        }
        b.into_inner()?.flush()?;
    }
    std::fs::rename(&tmp, out)?;
    Ok(Built {
        archive: out.to_path_buf(),
        archive_size: std::fs::metadata(out)?.len(),
        manifest_digest: format!("sha256:{}", sha256_hex(&manifest)),
        layer_size: layer_blob.len(),
        uncompressed_layer_size,
    })
}

/// What [`check`] found in a valid archive.
#[derive(Debug)]
pub struct Report {
    pub reference: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// Every regular file of the layers, with its mode.
    pub files: BTreeMap<String, u32>,
    /// The entrypoint's ELF has no program interpreter (a static executable).
    pub entrypoint_static: bool,
}

fn read_archive(path: &Path) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut a = tar::Archive::new(f);
    let mut out = BTreeMap::new();
    for e in a.entries()? {
        let mut e = e?;
        if e.header().entry_type().is_dir() {
            continue;
        }
        let name = e
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        out.insert(name, data);
    }
    Ok(out)
}

/// The blob a descriptor names, after checking its digest and size.
fn blob<'a>(
    files: &'a BTreeMap<String, Vec<u8>>,
    desc: &Value,
    what: &str,
) -> anyhow::Result<&'a [u8]> {
    let digest = desc["digest"]
        .as_str()
        .with_context(|| format!("{what}: descriptor without a digest"))?;
    let hex = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("{what}: digest {digest} is not sha256"))?;
    ensure!(
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{what}: malformed digest {digest}"
    );
    let data = files
        .get(&format!("blobs/sha256/{hex}"))
        .with_context(|| format!("{what}: blob {digest} missing from the archive"))?;
    let size = desc["size"]
        .as_u64()
        .with_context(|| format!("{what}: descriptor without a size"))?;
    ensure!(
        data.len() as u64 == size,
        "{what}: blob {digest} has {} bytes, its descriptor says {size}",
        data.len()
    );
    let actual = sha256_hex(data);
    ensure!(
        actual == hex,
        "{what}: blob {digest} hashes to sha256:{actual}"
    );
    Ok(data)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// True when `elf` is an ELF executable without a `PT_INTERP` program header.
fn elf_is_static(elf: &[u8]) -> anyhow::Result<bool> {
    ensure!(elf.get(..4) == Some(b"\x7fELF"), "not an ELF file");
    ensure!(elf.get(4) == Some(&2), "not a 64-bit ELF file");
    let u16_at = |o: usize| -> anyhow::Result<u16> {
        Ok(u16::from_le_bytes(
            elf.get(o..o + 2).context("truncated ELF")?.try_into()?,
        ))
    };
    let u64_at = |o: usize| -> anyhow::Result<u64> {
        Ok(u64::from_le_bytes(
            elf.get(o..o + 8).context("truncated ELF")?.try_into()?,
        ))
    };
    let phoff = usize::try_from(u64_at(0x20)?)?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let p_type = u32::from_le_bytes(
            elf.get(phoff + i * phentsize..phoff + i * phentsize + 4)
                .context("truncated program headers")?
                .try_into()?,
        );
        if p_type == 3 {
            return Ok(false); // PT_INTERP: needs a dynamic loader
        }
    }
    Ok(true)
}

/// Verifies the archive at `path` is a well-formed OCI image layout whose single image is named
/// `reference` and can start: see the module doc for the list.
pub fn check(path: &Path, reference: &str) -> anyhow::Result<Report> {
    let files = read_archive(path)?;
    let layout: Value = serde_json::from_slice(files.get("oci-layout").context("no oci-layout")?)
        .context("oci-layout is not JSON")?;
    ensure!(
        layout["imageLayoutVersion"] == "1.0.0",
        "oci-layout: imageLayoutVersion {}",
        layout["imageLayoutVersion"]
    );
    let index: Value = serde_json::from_slice(files.get("index.json").context("no index.json")?)
        .context("index.json is not JSON")?;
    ensure!(index["schemaVersion"] == 2, "index.json: schemaVersion");
    let manifests = index["manifests"]
        .as_array()
        .context("index.json: no manifests")?;
    ensure!(
        manifests.len() == 1,
        "index.json: {} manifests, expected 1",
        manifests.len()
    );
    let mdesc = &manifests[0];
    ensure!(
        mdesc["mediaType"] == MEDIA_MANIFEST,
        "index.json: manifest media type {}",
        mdesc["mediaType"]
    );
    for key in [ANNOTATION_REF, ANNOTATION_CONTAINERD] {
        ensure!(
            mdesc["annotations"][key] == reference,
            "index.json: annotation {key} is {}, expected {reference}",
            mdesc["annotations"][key]
        );
    }
    let manifest: Value = serde_json::from_slice(blob(&files, mdesc, "manifest")?)?;
    ensure!(manifest["schemaVersion"] == 2, "manifest: schemaVersion");
    ensure!(
        manifest["mediaType"] == MEDIA_MANIFEST,
        "manifest: mediaType"
    );
    ensure!(
        manifest["config"]["mediaType"] == MEDIA_CONFIG,
        "manifest: config media type {}",
        manifest["config"]["mediaType"]
    );
    let config: Value = serde_json::from_slice(blob(&files, &manifest["config"], "config")?)?;
    ensure!(
        config["os"] == "linux" && config["architecture"] == "amd64",
        "config: platform {}/{}",
        config["os"],
        config["architecture"]
    );
    ensure!(config["rootfs"]["type"] == "layers", "config: rootfs.type");
    let diff_ids = strings(&config["rootfs"]["diff_ids"]);
    let layers = manifest["layers"]
        .as_array()
        .context("manifest: no layers")?;
    ensure!(
        !layers.is_empty() && layers.len() == diff_ids.len(),
        "manifest has {} layers, config {} diff ids",
        layers.len(),
        diff_ids.len()
    );
    let mut contents: BTreeMap<String, (u32, Vec<u8>)> = BTreeMap::new();
    for (i, (ldesc, diff_id)) in layers.iter().zip(&diff_ids).enumerate() {
        let what = format!("layer {i}");
        let data = blob(&files, ldesc, &what)?;
        let tar_bytes = match ldesc["mediaType"].as_str() {
            Some(MEDIA_LAYER_GZIP) => {
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(data)
                    .read_to_end(&mut out)
                    .with_context(|| format!("{what}: not gzip"))?;
                out
            }
            Some(MEDIA_LAYER_TAR) => data.to_vec(),
            other => bail!("{what}: media type {other:?}"),
        };
        let actual = format!("sha256:{}", sha256_hex(&tar_bytes));
        ensure!(
            &actual == diff_id,
            "{what}: uncompressed digest {actual}, config says {diff_id}"
        );
        let mut a = tar::Archive::new(tar_bytes.as_slice());
        for e in a.entries().with_context(|| format!("{what}: not a tar"))? {
            let mut e = e?;
            if e.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let path = format!("/{}", e.path()?.to_string_lossy().trim_start_matches("./"));
            let mode = e.header().mode()?;
            let mut data = Vec::new();
            e.read_to_end(&mut data)?;
            contents.insert(path, (mode, data));
        }
    }
    let entrypoint = strings(&config["config"]["Entrypoint"]);
    let program = entrypoint.first().context("config: no Entrypoint")?;
    let (mode, exe) = contents
        .get(program)
        .with_context(|| format!("the entrypoint {program} is not in the layers"))?;
    ensure!(
        mode & 0o111 != 0,
        "the entrypoint {program} is not executable (mode {mode:o})"
    );
    let entrypoint_static =
        elf_is_static(exe).with_context(|| format!("the entrypoint {program}"))?;
    Ok(Report {
        reference: reference.to_owned(),
        cmd: strings(&config["config"]["Cmd"]),
        entrypoint,
        files: contents.iter().map(|(p, (m, _))| (p.clone(), *m)).collect(),
        entrypoint_static,
    })
}
