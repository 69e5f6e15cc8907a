//! Generative tests of the unpacker: random entry lists (hostile paths, links, types) built
//! with raw headers, then optionally mutated (byte flips, truncation) before or after
//! compression. Whatever the input: no panic, and nothing outside the destination is
//! created or changed; on success every link in the tree resolves inside it, on failure
//! nothing is left.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Arena, RawTar, zst};
use paddock_bundle::{UnpackLimits, unpack};
use proptest::prelude::*;

fn path_part() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("..".to_string()),
        Just(".".to_string()),
        Just("".to_string()),
        Just("outside".to_string()),
        Just("secret".to_string()),
        "[a-c]{1,3}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    (any::<bool>(), prop::collection::vec(path_part(), 1..4))
        .prop_map(|(abs, parts)| format!("{}{}", if abs { "/" } else { "" }, parts.join("/")))
}

#[derive(Debug, Clone)]
enum Ent {
    File(String, Vec<u8>),
    Dir(String),
    Sym(String, String),
    Hard(String, String),
    Other(String, u8),
}

fn ent() -> impl Strategy<Value = Ent> {
    prop_oneof![
        3 => (path(), prop::collection::vec(any::<u8>(), 0..600)).prop_map(|(p, d)| Ent::File(p, d)),
        2 => path().prop_map(Ent::Dir),
        2 => (path(), path()).prop_map(|(p, t)| Ent::Sym(p, t)),
        1 => (path(), path()).prop_map(|(p, t)| Ent::Hard(p, t)),
        1 => (path(), any::<u8>()).prop_map(|(p, t)| Ent::Other(p, t)),
    ]
}

fn build(ents: &[Ent]) -> Vec<u8> {
    let mut t = RawTar::new();
    for e in ents {
        match e {
            Ent::File(p, d) => {
                t.file(p, d);
            }
            Ent::Dir(p) => {
                t.dir(p);
            }
            Ent::Sym(p, l) => {
                t.symlink(p, l);
            }
            Ent::Hard(p, l) => {
                t.hardlink(p, l);
            }
            Ent::Other(p, k) => {
                t.entry(p.as_bytes(), tar::EntryType::new(*k), b"", b"", 0o644);
            }
        }
    }
    t.tar()
}

#[derive(Debug, Clone)]
enum Mutation {
    None,
    FlipTar(usize, u8),
    FlipZst(usize, u8),
    TruncateZst(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => Just(Mutation::None),
        2 => (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Mutation::FlipTar(i, x)),
        1 => (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Mutation::FlipZst(i, x)),
        1 => any::<usize>().prop_map(Mutation::TruncateZst),
    ]
}

fn check(archive: &[u8]) {
    let arena = Arena::new();
    let limits = UnpackLimits {
        max_entries: 50,
        max_entry_size: 1 << 20,
        max_total_size: 4 << 20,
        ..UnpackLimits::default()
    };
    match unpack(archive, &arena.dest(), &limits) {
        Ok(_) => {
            arena.assert_outside_untouched();
            // Every link resolves (if at all) inside dest.
            let dest = arena.dest().canonicalize().unwrap();
            for (rel, kind) in common::snapshot(&dest) {
                if kind.starts_with("link:")
                    && let Ok(real) = dest.join(&rel).canonicalize()
                {
                    assert!(real.starts_with(&dest), "{rel} -> {}", real.display());
                }
            }
        }
        Err(_) => arena.assert_untouched(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn random_entry_lists(ents in prop::collection::vec(ent(), 0..12), m in mutation()) {
        let mut tar = build(&ents);
        if let Mutation::FlipTar(i, x) = m {
            let i = i % tar.len();
            tar[i] ^= x;
        }
        let mut z = zst(&tar);
        match m {
            Mutation::FlipZst(i, x) => {
                let i = i % z.len();
                z[i] ^= x;
            }
            Mutation::TruncateZst(n) => z.truncate(n % (z.len() + 1)),
            _ => {}
        }
        check(&z);
    }

    #[test]
    fn random_bytes(data in prop::collection::vec(any::<u8>(), 0..2048), compress in any::<bool>()) {
        let input = if compress { zst(&data) } else { data };
        check(&input);
    }
}
