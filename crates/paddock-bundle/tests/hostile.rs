//! The hostile-archive corpus: one crafted archive per refusal, each checked for its code
//! and for leaving nothing behind (no destination, no temp dir, nothing outside touched).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Arena, RawTar, zst};
use paddock_bundle::{Digest, UnpackLimits, unpack, unpack_verified};
use tar::EntryType;

fn refused(archive: &[u8], limits: &UnpackLimits) -> &'static str {
    let arena = Arena::new();
    let err = unpack(archive, &arena.dest(), limits).expect_err("hostile archive accepted");
    arena.assert_untouched();
    err.code()
}

fn refused_default(archive: &[u8]) -> &'static str {
    refused(archive, &UnpackLimits::default())
}

#[test]
fn absolute_paths() {
    let a = RawTar::new()
        .file("ok.txt", b"x")
        .file("/tmp/evil", b"x")
        .zst();
    assert_eq!(refused_default(&a), "BUNDLE_PATH_ABSOLUTE");
    let a = RawTar::new().dir("/").zst();
    assert_eq!(refused_default(&a), "BUNDLE_PATH_ABSOLUTE");
}

#[test]
fn dot_dot_traversal() {
    for p in ["../evil", "a/../../evil", "./../outside/secret", "a/.."] {
        let a = RawTar::new().dir("a").file(p, b"pwned").zst();
        assert_eq!(refused_default(&a), "BUNDLE_PATH_TRAVERSAL", "{p}");
    }
}

#[test]
fn symlinks_out_of_the_tree() {
    for (link, target) in [
        ("l", "/etc/passwd"),
        ("l", ".."),
        ("l", "../outside/secret"),
        ("d/l", "../../outside"),
        ("d/l", "x/../../.."),
        ("l", ""),
    ] {
        let a = RawTar::new().dir("d").symlink(link, target).zst();
        assert_eq!(
            refused_default(&a),
            "BUNDLE_LINK_ESCAPE",
            "{link} -> {target}"
        );
    }
}

#[test]
fn writing_through_an_earlier_symlink() {
    // The classic: a link inside the archive, then an entry under it. Even a link that
    // stays inside is never written through.
    let a = RawTar::new()
        .dir("sub")
        .symlink("l", "sub")
        .file("l/x", b"x")
        .zst();
    assert_eq!(refused_default(&a), "BUNDLE_LINK_ESCAPE");
    // A link replaced by a file of the same name is a duplicate, not a write through it.
    let a = RawTar::new().symlink("l", "sub").file("l", b"x").zst();
    assert_eq!(refused_default(&a), "BUNDLE_CORRUPT");
}

#[test]
fn hardlinks_out_of_the_tree() {
    for target in ["/etc/passwd", "../outside/secret", "a/../../x"] {
        let a = RawTar::new().file("a", b"x").hardlink("h", target).zst();
        assert_eq!(refused_default(&a), "BUNDLE_LINK_ESCAPE", "{target}");
    }
    // To a directory or a symlink: refused too.
    let a = RawTar::new().dir("d").hardlink("h", "d").zst();
    assert_eq!(refused_default(&a), "BUNDLE_LINK_ESCAPE");
    let a = RawTar::new()
        .file("f", b"x")
        .symlink("s", "f")
        .hardlink("h", "s")
        .zst();
    assert_eq!(refused_default(&a), "BUNDLE_LINK_ESCAPE");
}

#[test]
fn special_files() {
    for kind in [
        EntryType::Char,
        EntryType::Block,
        EntryType::Fifo,
        EntryType::GNUSparse,
    ] {
        let a = RawTar::new().entry(b"dev", kind, b"", b"", 0o644).zst();
        assert_eq!(refused_default(&a), "BUNDLE_SPECIAL_FILE", "{kind:?}");
    }
    let a = RawTar::new()
        .entry(b"odd", EntryType::new(b'Z'), b"", b"", 0o644)
        .zst();
    assert_eq!(refused_default(&a), "BUNDLE_SPECIAL_FILE");
}

#[test]
fn entry_over_the_size_limit() {
    let limits = UnpackLimits {
        max_entry_size: 1024,
        ..UnpackLimits::default()
    };
    let a = RawTar::new()
        .file("small", &[1; 1024])
        .file("big", &[1; 1025])
        .zst();
    assert_eq!(refused(&a, &limits), "BUNDLE_ENTRY_TOO_LARGE");
    // Refused from the header alone, before any data is read: 1 TiB declared.
    let mut t = RawTar::new();
    t.header_only(b"huge", EntryType::Regular, 1 << 40);
    assert_eq!(refused_default(&zst(&t.bytes)), "BUNDLE_ENTRY_TOO_LARGE");
    // A GNU long name over the metadata cap (the tar crate would read it all into memory).
    let a = RawTar::new()
        .entry(
            b"././@LongLink",
            EntryType::GNULongName,
            b"",
            &vec![b'a'; 70_000],
            0o644,
        )
        .file("x", b"x")
        .zst();
    assert_eq!(refused_default(&a), "BUNDLE_ENTRY_TOO_LARGE");
}

#[test]
fn too_many_entries() {
    let limits = UnpackLimits {
        max_entries: 10,
        ..UnpackLimits::default()
    };
    let mut t = RawTar::new();
    for i in 0..10 {
        t.file(&format!("f{i}"), b"x");
    }
    let arena = Arena::new();
    unpack(&t.zst()[..], &arena.dest(), &limits).expect("10 entries are allowed");
    t.file("f10", b"x");
    assert_eq!(refused(&t.zst(), &limits), "BUNDLE_TOO_MANY_ENTRIES");
}

#[test]
fn decompression_bomb_by_ratio() {
    // 64 MiB of zeros compress to a few KiB.
    let zeros = vec![0u8; 64 << 20];
    let a = RawTar::new().file("zeros", &zeros).zst();
    assert!(a.len() < 64 << 10, "{}", a.len());
    let limits = UnpackLimits {
        ratio_floor: 1 << 20,
        max_ratio: 100,
        ..UnpackLimits::default()
    };
    assert_eq!(refused(&a, &limits), "BUNDLE_DECOMPRESSION_BOMB");
    // The same archive passes when the ratio allows it.
    let arena = Arena::new();
    let generous = UnpackLimits {
        max_ratio: 1_000_000,
        ..limits
    };
    unpack(&a[..], &arena.dest(), &generous).unwrap();
}

#[test]
fn decompression_bomb_by_total() {
    // Incompressible data, so only the total limit can trip.
    let data: Vec<u8> = (0..(2u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let a = RawTar::new().file("a", &data).zst();
    let limits = UnpackLimits {
        max_total_size: 1 << 20,
        ..UnpackLimits::default()
    };
    assert_eq!(refused(&a, &limits), "BUNDLE_DECOMPRESSION_BOMB");
    // Padding zeros after the tar's end count too.
    let mut tar = RawTar::new().file("a", b"x").tar();
    tar.extend(std::iter::repeat_n(0u8, 2 << 20));
    assert_eq!(refused(&zst(&tar), &limits), "BUNDLE_DECOMPRESSION_BOMB");
}

#[test]
fn corrupt_archives() {
    let good = RawTar::new().file("a", &[7; 5000]).file("b", b"y").zst();
    // Not zstd at all.
    assert_eq!(refused_default(b"this is not a bundle"), "BUNDLE_CORRUPT");
    // Truncated zstd.
    assert_eq!(refused_default(&good[..good.len() / 2]), "BUNDLE_CORRUPT");
    // Trailing garbage after the zstd frame.
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"garbage");
    assert_eq!(refused_default(&trailing), "BUNDLE_CORRUPT");
    // Valid zstd, broken tar header checksum.
    let mut tar = RawTar::new().file("a", b"x").tar();
    tar[0] ^= 0x55;
    assert_eq!(refused_default(&zst(&tar)), "BUNDLE_CORRUPT");
    // Truncated tar inside valid zstd.
    let tar = RawTar::new().file("a", &[1; 4096]).tar();
    assert_eq!(refused_default(&zst(&tar[..1024])), "BUNDLE_CORRUPT");
    // Duplicate file.
    let a = RawTar::new().file("a", b"1").file("a", b"2").zst();
    assert_eq!(refused_default(&a), "BUNDLE_CORRUPT");
    // Hard link to an entry that does not exist.
    let a = RawTar::new().hardlink("h", "missing").zst();
    assert_eq!(refused_default(&a), "BUNDLE_CORRUPT");
    // A file under a file.
    let a = RawTar::new().file("f", b"1").file("f/x", b"2").zst();
    assert_eq!(refused_default(&a), "BUNDLE_CORRUPT");
}

#[test]
fn hash_mismatch_leaves_nothing() {
    let a = RawTar::new().file("a", b"hello").zst();
    let arena = Arena::new();
    let wrong = Digest::of(b"something else");
    let err = unpack_verified(&a[..], &wrong, &arena.dest(), &UnpackLimits::default()).unwrap_err();
    assert_eq!(err.code(), "BUNDLE_HASH_MISMATCH");
    arena.assert_untouched();
    let right = Digest::of(&a);
    let stats = unpack_verified(&a[..], &right, &arena.dest(), &UnpackLimits::default()).unwrap();
    assert_eq!(stats.digest, right);
    assert_eq!(std::fs::read(arena.dest().join("a")).unwrap(), b"hello");
}

#[test]
fn benign_links_and_odd_layouts_are_accepted() {
    let a = RawTar::new()
        .file("./top.txt", b"t")
        .file("deep/er/file", b"f")
        .symlink("deep/er/up", "../../top.txt")
        .symlink("deep/side", "er/file")
        .hardlink("deep/hard", "deep/er/file")
        .dir("deep")
        .dir("./")
        .zst();
    let arena = Arena::new();
    let stats = unpack(&a[..], &arena.dest(), &UnpackLimits::default()).unwrap();
    assert_eq!(stats.files, 3);
    let d = arena.dest();
    assert_eq!(std::fs::read(d.join("deep/er/up")).unwrap(), b"t");
    assert_eq!(std::fs::read(d.join("deep/side")).unwrap(), b"f");
    assert_eq!(std::fs::read(d.join("deep/hard")).unwrap(), b"f");
    arena.assert_outside_untouched();
}

#[test]
fn existing_non_empty_destination_is_refused_without_damage() {
    let arena = Arena::new();
    std::fs::create_dir(arena.dest()).unwrap();
    std::fs::write(arena.dest().join("keep"), b"mine").unwrap();
    let a = RawTar::new().file("a", b"x").zst();
    let err = unpack(&a[..], &arena.dest(), &UnpackLimits::default()).unwrap_err();
    assert_eq!(err.code(), "BUNDLE_IO");
    assert_eq!(std::fs::read(arena.dest().join("keep")).unwrap(), b"mine");
    assert!(!arena.dest().join("a").exists());
    let leftovers: Vec<_> = std::fs::read_dir(arena.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".paddock-unpack-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // An empty destination directory is replaced.
    std::fs::remove_file(arena.dest().join("keep")).unwrap();
    unpack(&a[..], &arena.dest(), &UnpackLimits::default()).unwrap();
    assert_eq!(std::fs::read(arena.dest().join("a")).unwrap(), b"x");
}
