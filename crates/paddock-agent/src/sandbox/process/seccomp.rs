//! The seccomp filters of the `process` backend, compiled from [`super::super::policy`]:
//! the denied system calls answer `EPERM`, `clone` with a namespace flag answers `EPERM`,
//! `clone3` answers `ENOSYS` (C libraries then fall back to `clone`). Everything else is
//! allowed.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::super::policy::{CLONE_NAMESPACE_FLAGS, DENIED_SYSCALLS};

/// The syscall number of `name` on this architecture, if it has one.
fn number(name: &str) -> Option<i64> {
    macro_rules! table {
        ($($n:ident),* $(,)?) => {
            match name {
                $(stringify!($n) => Some(paste_sys!($n)),)*
                _ => arch_specific(name),
            }
        };
    }
    macro_rules! paste_sys {
        (mount) => {
            libc::SYS_mount
        };
        (umount2) => {
            libc::SYS_umount2
        };
        (pivot_root) => {
            libc::SYS_pivot_root
        };
        (chroot) => {
            libc::SYS_chroot
        };
        (move_mount) => {
            libc::SYS_move_mount
        };
        (open_tree) => {
            libc::SYS_open_tree
        };
        (fsopen) => {
            libc::SYS_fsopen
        };
        (fsconfig) => {
            libc::SYS_fsconfig
        };
        (fsmount) => {
            libc::SYS_fsmount
        };
        (fspick) => {
            libc::SYS_fspick
        };
        (mount_setattr) => {
            libc::SYS_mount_setattr
        };
        (unshare) => {
            libc::SYS_unshare
        };
        (setns) => {
            libc::SYS_setns
        };
        (ptrace) => {
            libc::SYS_ptrace
        };
        (process_vm_readv) => {
            libc::SYS_process_vm_readv
        };
        (process_vm_writev) => {
            libc::SYS_process_vm_writev
        };
        (kexec_load) => {
            libc::SYS_kexec_load
        };
        (kexec_file_load) => {
            libc::SYS_kexec_file_load
        };
        (init_module) => {
            libc::SYS_init_module
        };
        (finit_module) => {
            libc::SYS_finit_module
        };
        (delete_module) => {
            libc::SYS_delete_module
        };
        (bpf) => {
            libc::SYS_bpf
        };
        (perf_event_open) => {
            libc::SYS_perf_event_open
        };
        (userfaultfd) => {
            libc::SYS_userfaultfd
        };
        (keyctl) => {
            libc::SYS_keyctl
        };
        (add_key) => {
            libc::SYS_add_key
        };
        (request_key) => {
            libc::SYS_request_key
        };
        (open_by_handle_at) => {
            libc::SYS_open_by_handle_at
        };
        (name_to_handle_at) => {
            libc::SYS_name_to_handle_at
        };
        (swapon) => {
            libc::SYS_swapon
        };
        (swapoff) => {
            libc::SYS_swapoff
        };
        (reboot) => {
            libc::SYS_reboot
        };
        (acct) => {
            libc::SYS_acct
        };
        (quotactl) => {
            libc::SYS_quotactl
        };
        (settimeofday) => {
            libc::SYS_settimeofday
        };
        (clock_settime) => {
            libc::SYS_clock_settime
        };
        (clock_adjtime) => {
            libc::SYS_clock_adjtime
        };
        (adjtimex) => {
            libc::SYS_adjtimex
        };
        (syslog) => {
            libc::SYS_syslog
        };
        (vhangup) => {
            libc::SYS_vhangup
        };
        (lookup_dcookie) => {
            libc::SYS_lookup_dcookie
        };
        (io_uring_setup) => {
            libc::SYS_io_uring_setup
        };
        (io_uring_enter) => {
            libc::SYS_io_uring_enter
        };
        (io_uring_register) => {
            libc::SYS_io_uring_register
        };
        (pidfd_getfd) => {
            libc::SYS_pidfd_getfd
        };
    }
    table!(
        mount,
        umount2,
        pivot_root,
        chroot,
        move_mount,
        open_tree,
        fsopen,
        fsconfig,
        fsmount,
        fspick,
        mount_setattr,
        unshare,
        setns,
        ptrace,
        process_vm_readv,
        process_vm_writev,
        kexec_load,
        kexec_file_load,
        init_module,
        finit_module,
        delete_module,
        bpf,
        perf_event_open,
        userfaultfd,
        keyctl,
        add_key,
        request_key,
        open_by_handle_at,
        name_to_handle_at,
        swapon,
        swapoff,
        reboot,
        acct,
        quotactl,
        settimeofday,
        clock_settime,
        clock_adjtime,
        adjtimex,
        syslog,
        vhangup,
        lookup_dcookie,
        io_uring_setup,
        io_uring_enter,
        io_uring_register,
        pidfd_getfd,
    )
}

#[cfg(target_arch = "x86_64")]
fn arch_specific(name: &str) -> Option<i64> {
    match name {
        "iopl" => Some(libc::SYS_iopl),
        "ioperm" => Some(libc::SYS_ioperm),
        "uselib" => Some(libc::SYS_uselib),
        _ => None,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn arch_specific(_name: &str) -> Option<i64> {
    None
}

fn target() -> Result<TargetArch, String> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| format!("seccomp: {e:?}"))
}

/// The two filters to install, in order.
pub(crate) fn filters() -> Result<Vec<BpfProgram>, String> {
    let arch = target()?;
    let mut deny: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for name in DENIED_SYSCALLS {
        if let Some(n) = number(name) {
            deny.insert(n, Vec::new());
        }
    }
    let mut clone_rules = Vec::new();
    for flag in CLONE_NAMESPACE_FLAGS {
        let cond = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(*flag),
            *flag,
        )
        .map_err(|e| format!("seccomp: {e}"))?;
        clone_rules.push(SeccompRule::new(vec![cond]).map_err(|e| format!("seccomp: {e}"))?);
    }
    deny.insert(libc::SYS_clone, clone_rules);
    let eperm = SeccompFilter::new(
        deny,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| format!("seccomp: {e}"))?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|e| format!("seccomp: {e}"))?;
    Ok(vec![
        eperm.try_into().map_err(|e| format!("seccomp: {e:?}"))?,
        clone3.try_into().map_err(|e| format!("seccomp: {e:?}"))?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_denied_name_resolves_on_x86_64() {
        if cfg!(target_arch = "x86_64") {
            for name in DENIED_SYSCALLS {
                assert!(number(name).is_some(), "{name} has no number");
            }
        }
        assert_eq!(filters().unwrap().len(), 2);
    }
}
