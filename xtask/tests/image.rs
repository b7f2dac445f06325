//! The OCI image archive: built by the same code as `cargo xtask image` from the binaries the
//! test build already has (a plain tar layer, so it takes seconds; `cargo xtask image` gzips
//! static musl builds), checked structurally, and unpacked by umoci, an independent OCI reader.
//! The checker itself must catch broken archives, and the manifests must name this image.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::Command,
};

use xtask::oci;

/// target/<profile>, where `cargo build --bins` put `ferrox` and `ferrox-cni`.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    for b in ["ferrox", "ferrox-cni"] {
        assert!(
            dir.join(b).exists(),
            "{} missing: build the binaries first (cargo xtask test does)",
            dir.join(b).display()
        );
    }
    dir
}

/// A minimal static x86-64 ELF header (no program headers, so no interpreter).
fn tiny_elf() -> Vec<u8> {
    let mut e = vec![0u8; 64];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // 64-bit
    e[5] = 1; // little endian
    e[0x36] = 56; // e_phentsize
    e
}

fn spec_with(dir: &Path, entry_mode: u32, entrypoint: &str) -> oci::Spec {
    std::fs::write(dir.join("app"), tiny_elf()).unwrap();
    oci::Spec {
        reference: "example.test/app:1".into(),
        files: vec![oci::File {
            path: "/usr/bin/app".into(),
            source: dir.join("app"),
            mode: entry_mode,
        }],
        entrypoint: vec![entrypoint.into()],
        cmd: vec![],
        env: vec![],
        gzip: true,
    }
}

/// Rewrites the archive at `path`, passing each (name, bytes) through `edit`.
fn edit_archive(path: &Path, edit: impl Fn(&str, &mut Vec<u8>)) {
    let mut entries = Vec::new();
    let mut a = tar::Archive::new(std::fs::File::open(path).unwrap());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().to_string();
        let header = e.header().clone();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        edit(&name, &mut data);
        entries.push((header, name, data));
    }
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (mut h, name, data) in entries {
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.finish().unwrap();
}

/// Reads one file of the archive.
fn archive_file(path: &Path, want: &str) -> Vec<u8> {
    let mut a = tar::Archive::new(std::fs::File::open(path).unwrap());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_string_lossy() == want {
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            return data;
        }
    }
    panic!("{want} not in {}", path.display())
}

/// The hex digest of the manifest, config or layer blob.
fn blob_digest(path: &Path, which: &str) -> String {
    let json = |b: Vec<u8>| -> serde_json::Value { serde_json::from_slice(&b).unwrap() };
    let hex = |d: &serde_json::Value| d.as_str().unwrap().trim_start_matches("sha256:").to_owned();
    let index = json(archive_file(path, "index.json"));
    let manifest_hex = hex(&index["manifests"][0]["digest"]);
    let manifest = json(archive_file(path, &format!("blobs/sha256/{manifest_hex}")));
    match which {
        "manifest" => manifest_hex,
        "config" => hex(&manifest["config"]["digest"]),
        _ => hex(&manifest["layers"][0]["digest"]),
    }
}

#[test]
fn the_ferrox_image_passes_the_structural_check_and_umoci_unpacks_it() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = oci::ferrox_spec(&bin_dir(), false);
    let out = tmp.path().join("ferrox.tar");
    let built = oci::build(&spec, &out).unwrap();
    let report = oci::check(&out, &oci::image_ref()).unwrap();
    assert_eq!(report.entrypoint, ["/usr/bin/ferrox"]);
    assert_eq!(report.cmd, ["agent"]);
    for f in ["/usr/bin/ferrox", "/usr/bin/ferrox-cni"] {
        assert_eq!(report.files.get(f), Some(&0o755), "{f}: {:?}", report.files);
    }
    eprintln!(
        "image {} {}: {} bytes",
        report.reference, built.manifest_digest, built.archive_size
    );

    // umoci reads the layout, verifies every blob, and unpacks a runtime bundle.
    let layout = tmp.path().join("layout");
    std::fs::create_dir(&layout).unwrap();
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&out)
        .arg("-C")
        .arg(&layout)
        .status()
        .unwrap();
    assert!(st.success());
    let bundle = tmp.path().join("bundle");
    let o = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{}", layout.display(), oci::image_ref()))
        .arg(&bundle)
        .output()
        .expect("umoci (installed by cargo xtask setup)");
    assert!(o.status.success(), "umoci unpack: {o:?}");
    let runtime: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        runtime["process"]["args"],
        serde_json::json!(["/usr/bin/ferrox", "agent"])
    );
    assert_eq!(
        std::fs::read(bundle.join("rootfs/usr/bin/ferrox-cni")).unwrap(),
        std::fs::read(bin_dir().join("ferrox-cni")).unwrap()
    );
}

#[test]
fn the_structural_check_catches_broken_archives() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("app.tar");
    let spec = spec_with(tmp.path(), 0o755, "/usr/bin/app");
    oci::build(&spec, &out).unwrap();
    let ok = oci::check(&out, "example.test/app:1").unwrap();
    assert!(ok.entrypoint_static);

    let err =
        |out: &Path, reference: &str| format!("{:#}", oci::check(out, reference).unwrap_err());
    assert!(err(&out, "example.test/app:2").contains("annotation"));

    // A flipped byte in any blob: the manifest index.json names, its config, its layer.
    for victim in ["manifest", "config", "layer"] {
        let copy = tmp.path().join(format!("{victim}.tar"));
        oci::build(&spec, &copy).unwrap();
        let digest = blob_digest(&copy, victim);
        edit_archive(&copy, |name, data| {
            if name == format!("blobs/sha256/{digest}") {
                let last = data.len() - 1;
                data[last] ^= 1;
            }
        });
        let e = err(&copy, "example.test/app:1");
        assert!(e.contains("hashes to"), "{victim}: {e}");
    }

    // An entrypoint that is not in the layers, or not executable.
    let missing = tmp.path().join("missing.tar");
    oci::build(&spec_with(tmp.path(), 0o755, "/usr/bin/nope"), &missing).unwrap();
    assert!(err(&missing, "example.test/app:1").contains("not in the layers"));
    let noexec = tmp.path().join("noexec.tar");
    oci::build(&spec_with(tmp.path(), 0o644, "/usr/bin/app"), &noexec).unwrap();
    assert!(err(&noexec, "example.test/app:1").contains("not executable"));

    // A dynamically linked entrypoint is told apart (cargo xtask image requires static).
    let dynamic = tmp.path().join("dynamic.tar");
    let mut s = spec_with(tmp.path(), 0o755, "/usr/bin/app");
    s.files[0].source = bin_dir().join("ferrox-cni");
    s.gzip = false;
    oci::build(&s, &dynamic).unwrap();
    let r = oci::check(&dynamic, "example.test/app:1").unwrap();
    assert!(
        !r.entrypoint_static,
        "a debug build links glibc dynamically"
    );
}

#[test]
fn the_manifests_run_the_image_this_builds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    let mut images = Vec::new();
    for f in std::fs::read_dir(&dir).unwrap() {
        let path = f.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            let spec = &v["spec"]["template"]["spec"];
            for list in ["containers", "initContainers"] {
                for c in spec[list].as_array().into_iter().flatten() {
                    images.push((path.display().to_string(), c["image"].clone()));
                }
            }
        }
    }
    assert!(images.len() >= 3, "{images:?}");
    for (file, image) in images {
        assert_eq!(image, oci::image_ref().as_str(), "{file}");
    }
}
