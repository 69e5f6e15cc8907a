//! Packing: determinism across mtimes, owners, modes and creation order; what is refused;
//! round trips through our unpacker and GNU tar.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::{Arena, snapshot};
use paddock_bundle::{UnpackLimits, pack, pack_in, unpack, unpack_verified};

/// Writes the same logical tree, in the given order of creation.
fn make_tree(root: &Path, reversed: bool) {
    let mut steps: Vec<Box<dyn Fn()>> = vec![
        Box::new(|| fs::create_dir_all(root.join("src/lib")).unwrap()),
        Box::new(|| fs::create_dir_all(root.join("empty")).unwrap()),
        Box::new(|| fs::write(root.join("package.json"), b"{\"name\":\"x\"}").unwrap()),
        Box::new(|| fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap()),
        Box::new(|| fs::write(root.join("src/lib/a.js"), vec![b'a'; 100_000]).unwrap()),
        Box::new(|| fs::write(root.join("src/index.js"), b"require('./lib/a')").unwrap()),
        Box::new(|| symlink("lib/a.js", root.join("src/alias.js")).unwrap()),
        Box::new(|| {
            let long = "n".repeat(150);
            fs::write(root.join("src/lib").join(long), b"long name").unwrap()
        }),
    ];
    if reversed {
        // Directories first still, then files in reverse order.
        let dirs: Vec<_> = steps.drain(..2).collect();
        steps.reverse();
        for s in dirs.iter().chain(steps.iter()) {
            s();
        }
    } else {
        for s in &steps {
            s();
        }
    }
}

#[test]
fn same_tree_same_digest_whatever_the_metadata() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    make_tree(a.path(), false);
    make_tree(b.path(), true);
    // a: executable script 0755; b: 0700 (still "executable") and other modes scrambled.
    fs::set_permissions(a.path().join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(b.path().join("run.sh"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(
        b.path().join("package.json"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    fs::set_permissions(b.path().join("src"), fs::Permissions::from_mode(0o700)).unwrap();
    // Different mtimes and owners.
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    for entry in [
        "package.json",
        "run.sh",
        "src/index.js",
        "src/lib/a.js",
        "empty",
    ] {
        let f = fs::File::open(b.path().join(entry)).unwrap();
        f.set_modified(old).unwrap();
        std::os::unix::fs::chown(b.path().join(entry), Some(1234), Some(4321)).unwrap();
    }
    let pa = pack(a.path()).unwrap();
    let pb = pack(b.path()).unwrap();
    assert_eq!(pa.digest, pb.digest);
    assert_eq!(pa.size, pb.size);
    assert_eq!(fs::read(pa.path()).unwrap(), fs::read(pb.path()).unwrap());
    // Packing again gives the same bytes.
    assert_eq!(pack(a.path()).unwrap().digest, pa.digest);
    // The digest is the SHA-256 of the file.
    assert_eq!(
        paddock_bundle::Digest::of(&fs::read(pa.path()).unwrap()),
        pa.digest
    );

    // Content and the execute bit are part of the identity.
    fs::write(b.path().join("src/index.js"), b"changed").unwrap();
    assert_ne!(pack(b.path()).unwrap().digest, pa.digest);
    make_tree_fix(b.path());
    assert_eq!(pack(b.path()).unwrap().digest, pa.digest);
    fs::set_permissions(b.path().join("run.sh"), fs::Permissions::from_mode(0o644)).unwrap();
    assert_ne!(pack(b.path()).unwrap().digest, pa.digest);
}

fn make_tree_fix(root: &Path) {
    fs::write(root.join("src/index.js"), b"require('./lib/a')").unwrap();
}

#[test]
fn header_fields_are_normalised() {
    let a = tempfile::tempdir().unwrap();
    make_tree(a.path(), false);
    fs::set_permissions(a.path().join("run.sh"), fs::Permissions::from_mode(0o711)).unwrap();
    std::os::unix::fs::chown(a.path().join("run.sh"), Some(1000), Some(1000)).unwrap();
    let p = pack(a.path()).unwrap();
    let tar = zstd::decode_all(fs::File::open(p.path()).unwrap()).unwrap();
    let mut ar = tar::Archive::new(&tar[..]);
    let mut paths = Vec::new();
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        let h = e.header();
        assert_eq!(h.mtime().unwrap(), 0);
        assert_eq!(h.uid().unwrap(), 0);
        assert_eq!(h.gid().unwrap(), 0);
        assert_eq!(h.username().unwrap().unwrap_or(""), "");
        assert_eq!(h.groupname().unwrap().unwrap_or(""), "");
        let mode = h.mode().unwrap();
        match h.entry_type() {
            tar::EntryType::Directory => assert_eq!(mode, 0o755),
            tar::EntryType::Symlink => assert_eq!(mode, 0o777),
            _ => assert!(mode == 0o644 || mode == 0o755, "{mode:o}"),
        }
        let path = e.path().unwrap().to_string_lossy().into_owned();
        if path == "run.sh" {
            assert_eq!(mode, 0o755);
        }
        paths.push(path);
    }
    let mut sorted = paths.clone();
    sorted.sort_by(|a, b| {
        // Byte order of path components (a directory comes right before its contents).
        let ka: Vec<&[u8]> = a
            .trim_end_matches('/')
            .split('/')
            .map(str::as_bytes)
            .collect();
        let kb: Vec<&[u8]> = b
            .trim_end_matches('/')
            .split('/')
            .map(str::as_bytes)
            .collect();
        ka.cmp(&kb)
    });
    assert_eq!(paths, sorted);
    assert!(
        !paths
            .iter()
            .any(|p| p.starts_with("./") || p.starts_with('/'))
    );
}

#[test]
fn round_trip_through_our_unpacker_and_gnu_tar() {
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path(), false);
    fs::set_permissions(src.path().join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    let p = pack(src.path()).unwrap();
    let arena = Arena::new();
    let stats = unpack_verified(
        fs::File::open(p.path()).unwrap(),
        &p.digest,
        &arena.dest(),
        &UnpackLimits::default(),
    )
    .unwrap();
    assert_eq!(stats.digest, p.digest);
    assert_eq!(stats.compressed, p.size);
    assert_eq!(snapshot(src.path()), snapshot(&arena.dest()));
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&arena.dest().join("run.sh")), 0o755);
    assert_eq!(mode(&arena.dest().join("package.json")), 0o644);
    assert_eq!(mode(&arena.dest()), 0o755);
    arena.assert_outside_untouched();

    // GNU tar reads our archives...
    let gnu = tempfile::tempdir().unwrap();
    let st = std::process::Command::new("tar")
        .arg("--zstd")
        .arg("-xf")
        .arg(p.path())
        .arg("-C")
        .arg(gnu.path())
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(snapshot(src.path()), snapshot(gnu.path()));
    // ... and we read GNU tar's (with its `./` entries, long names, owners).
    let gnu_archive = tempfile::NamedTempFile::new().unwrap();
    let st = std::process::Command::new("tar")
        .arg("--zstd")
        .arg("-cf")
        .arg(gnu_archive.path())
        .arg("-C")
        .arg(src.path())
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let arena2 = Arena::new();
    unpack(
        fs::File::open(gnu_archive.path()).unwrap(),
        &arena2.dest(),
        &UnpackLimits::default(),
    )
    .unwrap();
    assert_eq!(snapshot(src.path()), snapshot(&arena2.dest()));
}

#[test]
fn pax_long_paths_are_understood() {
    let long = format!("{}/{}", "d".repeat(120), "f".repeat(120));
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("path", long.as_bytes())])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_path("short").unwrap();
    h.set_size(3);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    b.append(&h, &b"pax"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let arena = Arena::new();
    unpack(
        &common::zst(&tar)[..],
        &arena.dest(),
        &UnpackLimits::default(),
    )
    .unwrap();
    assert_eq!(fs::read(arena.dest().join(&long)).unwrap(), b"pax");
    assert!(!arena.dest().join("short").exists());
}

#[test]
fn special_files_and_escaping_links_are_refused() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("ok"), b"x").unwrap();
    let st = std::process::Command::new("mkfifo")
        .arg(d.path().join("fifo"))
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(pack(d.path()).unwrap_err().code(), "BUNDLE_SPECIAL_FILE");
    fs::remove_file(d.path().join("fifo")).unwrap();

    let _sock = std::os::unix::net::UnixListener::bind(d.path().join("sock")).unwrap();
    assert_eq!(pack(d.path()).unwrap_err().code(), "BUNDLE_SPECIAL_FILE");
    fs::remove_file(d.path().join("sock")).unwrap();

    for target in ["/etc/passwd", "../outside", "a/../../x"] {
        symlink(target, d.path().join("l")).unwrap();
        assert_eq!(
            pack(d.path()).unwrap_err().code(),
            "BUNDLE_LINK_ESCAPE",
            "{target}"
        );
        fs::remove_file(d.path().join("l")).unwrap();
    }
    // Not a directory.
    assert_eq!(
        pack(&d.path().join("ok")).unwrap_err().code(),
        "BUNDLE_PACK_FAILED"
    );
    // A temp file left behind by a failed pack? None in the chosen temp dir.
    let out = tempfile::tempdir().unwrap();
    symlink("/etc", d.path().join("l")).unwrap();
    assert!(pack_in(d.path(), out.path(), 3).is_err());
    assert_eq!(fs::read_dir(out.path()).unwrap().count(), 0);
}
