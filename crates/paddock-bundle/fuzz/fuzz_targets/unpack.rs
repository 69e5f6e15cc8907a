//! Feeds arbitrary bytes to the unpacker, both as a bundle (zstd) and wrapped in zstd (so
//! the tar layer is reached), with small limits. Asserts no panic, and that a refused
//! archive leaves nothing and an accepted one stays inside its destination.
#![no_main]

use libfuzzer_sys::fuzz_target;
use paddock_bundle::{UnpackLimits, unpack};

fn run(input: &[u8]) {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    let limits = UnpackLimits {
        max_entries: 64,
        max_entry_size: 1 << 20,
        max_total_size: 8 << 20,
        max_ratio: 250,
        ratio_floor: 1 << 20,
    };
    let ok = unpack(input, &dest, &limits).is_ok();
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    if ok {
        assert_eq!(names, vec![std::ffi::OsString::from("dest")]);
        let root = dest.canonicalize().unwrap();
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let m = std::fs::symlink_metadata(&p).unwrap();
                if m.file_type().is_symlink() {
                    if let Ok(real) = p.canonicalize() {
                        assert!(real.starts_with(&root), "{} escapes", p.display());
                    }
                } else if m.is_dir() {
                    stack.push(p);
                }
            }
        }
    } else {
        assert!(names.is_empty(), "refused unpack left {names:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    run(data);
    if let Ok(z) = zstd::encode_all(data, 1) {
        run(&z);
    }
});
