//! The path rules shared by packing and unpacking: what an entry path and a link target may
//! look like so that nothing refers outside the tree.

use std::path::{Component, Path, PathBuf};

/// Why an entry path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathProblem {
    /// Starts at `/` (or a prefix).
    Absolute,
    /// Contains a `..` component.
    Traversal,
}

/// Normalises an entry path to its plain components (dropping `.`), relative to the tree
/// root. Any `..`, even one that would stay inside, is refused: a packer never writes one.
/// An empty result is the root itself (`./`).
pub(crate) fn normalise_entry(raw: &Path) -> Result<PathBuf, PathProblem> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => return Err(PathProblem::Absolute),
            Component::ParentDir => return Err(PathProblem::Traversal),
            Component::CurDir => {}
            Component::Normal(n) => out.push(n),
        }
    }
    Ok(out)
}

/// Whether a symbolic link at `link` (a normalised entry path) pointing to `target` stays
/// inside the tree, whatever the other links in the tree are.
///
/// The rule is stricter than lexical normalisation, on purpose: the target must be relative,
/// and its `..` components may only come first (`../../lib/x`, not `a/../../x`), no more of
/// them than the link's depth. A leading `..` then climbs real directories (the link's
/// parents are directories, never links, see `unpack`), and what follows only descends by
/// name from a directory inside the tree; each name is a file, a directory, or a link that
/// obeys the same rule. So no chain of links can resolve outside the root. (With `..`
/// after a name, `a/..` where `a -> .` at the root would resolve to the root's parent.)
pub(crate) fn link_target_stays_inside(link: &Path, target: &Path) -> bool {
    if target.as_os_str().is_empty() {
        return false;
    }
    let depth = link.parent().map_or(0, |p| p.components().count());
    let mut ups = 0usize;
    let mut seen_name = false;
    for c in target.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => return false,
            Component::CurDir => {}
            Component::ParentDir => {
                if seen_name {
                    return false;
                }
                ups += 1;
                if ups > depth {
                    return false;
                }
            }
            Component::Normal(_) => seen_name = true,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths() {
        let ok = |s: &str| normalise_entry(Path::new(s)).unwrap();
        assert_eq!(ok("a/b"), PathBuf::from("a/b"));
        assert_eq!(ok("./a/./b/"), PathBuf::from("a/b"));
        assert_eq!(ok("./"), PathBuf::new());
        let err = |s: &str| normalise_entry(Path::new(s)).unwrap_err();
        assert_eq!(err("/etc/passwd"), PathProblem::Absolute);
        assert_eq!(err("../x"), PathProblem::Traversal);
        assert_eq!(err("a/../../x"), PathProblem::Traversal);
        assert_eq!(err("a/../b"), PathProblem::Traversal);
    }

    #[test]
    fn link_targets() {
        let inside = |l: &str, t: &str| link_target_stays_inside(Path::new(l), Path::new(t));
        assert!(inside("a", "b"));
        assert!(inside("a", "./b/c"));
        assert!(inside("d/a", "../b"));
        assert!(inside("d/e/a", "../../b/c"));
        assert!(!inside("a", "../b"));
        assert!(!inside("d/a", "../../b"));
        assert!(!inside("a", "/etc/passwd"));
        assert!(!inside("a", ""));
        assert!(!inside("d/a", "x/../../b"));
        assert!(!inside("a", "x/.."));
    }
}
