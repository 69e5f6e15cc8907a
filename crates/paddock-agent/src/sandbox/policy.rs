//! What every isolating backend (process, oci, docker) enforces, defined once: the view of the
//! file system, the unprivileged identity, and the system calls a task may not make.

/// Top-level entries of the host root (or a given rootfs) shown read-only to tasks. Home
/// directories, `/root` (where the agent keeps its token), `/var`, `/srv`, `/mnt` and the
/// kernel interfaces of the host are not shown; `/proc`, `/dev`, `/tmp` and `/work` are made
/// fresh for each run.
pub const HOST_ROOT_ENTRIES: &[&str] = &[
    "bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "opt",
];

/// User and group the task runs as (`nobody`/`nogroup`).
pub const SANDBOX_UID: u32 = 65534;
/// Group the task runs as.
pub const SANDBOX_GID: u32 = 65534;

/// Host name inside the sandbox.
pub const SANDBOX_HOSTNAME: &str = "paddock";

/// Where the work directory is mounted (read-write).
pub const WORK_DIR: &str = "/work";

/// Open files a task may hold.
pub const RLIMIT_NOFILE: u64 = 4096;

/// System calls refused with `EPERM`: the ones used to escape or attack the kernel (mounts,
/// namespaces, tracing, kernel modules and kexec, BPF, keyrings, `io_uring`, handle-based
/// opens, clock and swap administration). Names as in the kernel's syscall table; names that
/// do not exist on an architecture are skipped.
pub const DENIED_SYSCALLS: &[&str] = &[
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "open_by_handle_at",
    "name_to_handle_at",
    "swapon",
    "swapoff",
    "reboot",
    "acct",
    "quotactl",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "syslog",
    "vhangup",
    "iopl",
    "ioperm",
    "uselib",
    "lookup_dcookie",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "pidfd_getfd",
];

/// `clone` flags that create namespaces; a `clone` with any of them is refused, and
/// `clone3` (whose flags sit in memory a filter cannot read) answers `ENOSYS` so C libraries
/// fall back to `clone`.
pub const CLONE_NAMESPACE_FLAGS: &[u64] = &[
    0x0002_0000, // CLONE_NEWNS
    0x0200_0000, // CLONE_NEWCGROUP
    0x0400_0000, // CLONE_NEWUTS
    0x0800_0000, // CLONE_NEWIPC
    0x1000_0000, // CLONE_NEWUSER
    0x2000_0000, // CLONE_NEWPID
    0x4000_0000, // CLONE_NEWNET
];

/// One entry of the read-only root view: a directory to bind, or a symlink to recreate
/// (Debian's merged `/usr` makes `/bin` a link to `usr/bin`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootEntry {
    /// Bind this directory read-only at the same name.
    Dir(String),
    /// Recreate this symlink.
    Link(String, std::path::PathBuf),
}

/// The entries of [`HOST_ROOT_ENTRIES`] that exist under `root`.
pub fn root_entries(root: &std::path::Path) -> Vec<RootEntry> {
    HOST_ROOT_ENTRIES
        .iter()
        .filter_map(|name| {
            let path = root.join(name);
            let meta = std::fs::symlink_metadata(&path).ok()?;
            if meta.file_type().is_symlink() {
                Some(RootEntry::Link(
                    (*name).to_string(),
                    std::fs::read_link(&path).ok()?,
                ))
            } else if meta.is_dir() {
                Some(RootEntry::Dir((*name).to_string()))
            } else {
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_root_view_has_usr_and_no_secrets() {
        let entries = root_entries(std::path::Path::new("/"));
        assert!(
            entries
                .iter()
                .any(|e| matches!(e, RootEntry::Dir(d) if d == "usr"))
        );
        for e in &entries {
            let name = match e {
                RootEntry::Dir(d) | RootEntry::Link(d, _) => d,
            };
            assert!(!["root", "home", "proc", "sys", "var"].contains(&name.as_str()));
        }
    }

    #[test]
    fn denied_list_has_no_duplicates() {
        let mut v = DENIED_SYSCALLS.to_vec();
        v.sort_unstable();
        v.dedup();
        assert_eq!(v.len(), DENIED_SYSCALLS.len());
        assert!(!DENIED_SYSCALLS.contains(&"execve"));
    }
}
