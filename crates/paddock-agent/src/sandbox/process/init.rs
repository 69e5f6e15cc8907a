//! The sandbox init of each `process` run, forked by the zygote ([`super::zygote`]).
//!
//! Three processes, so that the task is confined and nothing outlives it:
//! 1. the **waiter** (the zygote's child, leader of the run's process group): joins the
//!    run's cgroups, enters the zygote's spare namespaces and creates the other new
//!    namespaces (mount, UTS, IPC, PID, and network when `networkMode` is `none`),
//!    forwards SIGTERM/SIGINT/SIGHUP to PID 1, and exits like it;
//! 2. **PID 1** of the new PID namespace: builds the root (a read-only view of the rootfs,
//!    `/work` read-write, fresh `/tmp`, `/dev`, `/proc`), pivots into it, starts the task,
//!    reaps orphans, forwards signals to everything in the namespace, writes the task's
//!    status and exits when the task does: the kernel then kills whatever the task left;
//! 3. the **task**: drops to the sandbox user, applies rlimits, `no_new_privs`, Landlock
//!    and seccomp, and executes the command.
//!
//! Outcomes are appended to the status file as lines: `setup <message>`, `spawn <message>`,
//! `exit <code>` or `signal <number>`.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork};
use serde::{Deserialize, Serialize};

use super::super::policy::{self, RootEntry};

/// What the init needs, from the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// The task's whole environment.
    pub env: Vec<(String, String)>,
    /// Root filesystem whose [`policy::HOST_ROOT_ENTRIES`] are shown read-only.
    pub rootfs: PathBuf,
    /// An empty host directory used as the new root's mount point.
    pub new_root: PathBuf,
    /// The run's work directory (mounted at `/work`).
    pub workdir: PathBuf,
    /// New, empty network namespace.
    pub network_none: bool,
    /// `cgroup.procs` files to join before anything else.
    pub cgroup_procs: Vec<PathBuf>,
    /// Identity of the task.
    pub uid: u32,
    /// Group of the task.
    pub gid: u32,
    /// Host name inside.
    pub hostname: String,
    /// Where outcomes are appended (a host path, opened before the namespaces change).
    pub status_file: PathBuf,
}

fn forwarded() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        set.add(s);
    }
    set
}

fn status_line(file: &mut File, line: &str) {
    let _ = writeln!(file, "{line}");
}

/// The waiter's work for `spec`, in a single-threaded process that is already the leader of
/// the run's process group. `entered` names the new namespaces this process has already
/// joined (the zygote's spares); the others are created here.
pub(super) fn run_waiter(spec: &InitSpec, entered: CloneFlags) -> Result<i32, String> {
    let mut status = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&spec.status_file)
        .map_err(|e| format!("status file {}: {e}", spec.status_file.display()))?;
    for procs in &spec.cgroup_procs {
        // This process is single-threaded, so moving its one thread moves it. On cgroup v1,
        // "0" (the writer) written to `tasks` moves one thread without the kernel's global
        // threadgroup lock, whose write side waits for an RCU grace period: 0.2 ms for the
        // three controllers, where writing the pid to `cgroup.procs` took up to 28 ms here.
        let tasks = procs.with_file_name("tasks");
        let target = if tasks.exists() { &tasks } else { procs };
        if let Err(e) = std::fs::write(target, "0") {
            status_line(
                &mut status,
                &format!("setup joining cgroup {}: {e}", procs.display()),
            );
            return Ok(125);
        }
    }
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWPID;
    if spec.network_none {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    flags &= !entered;
    if let Err(e) = unshare(flags) {
        status_line(&mut status, &format!("setup unshare: {e}"));
        return Ok(125);
    }
    let set = forwarded();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(|e| format!("sigprocmask: {e}"))?;
    // SAFETY: this process is single-threaded (a fresh exec of the binary that has not
    // started any runtime), so the child may run arbitrary code after fork.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            let code = pid1(spec, &mut status);
            std::process::exit(code)
        }
        ForkResult::Parent { child } => loop {
            match set.wait().map_err(|e| format!("sigwait: {e}"))? {
                Signal::SIGCHLD => match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                    Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
                    _ => {}
                },
                other => {
                    let _ = kill(child, other);
                }
            }
        },
    }
}

/// PID 1 of the sandbox. Returns its exit code.
fn pid1(spec: &InitSpec, status: &mut File) -> i32 {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if let Err(e) = build_root(spec) {
        status_line(status, &format!("setup {e}"));
        return 125;
    }
    let _ = nix::unistd::sethostname(&spec.hostname);
    let set = forwarded();
    // SAFETY: PID 1 is single-threaded (forked from the single-threaded waiter).
    let task = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let err = exec_task(spec);
            status_line(status, &format!("spawn {err}"));
            eprintln!("paddock sandbox: {err}");
            std::process::exit(127)
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => {
            status_line(status, &format!("setup fork: {e}"));
            return 125;
        }
    };
    loop {
        let Ok(sig) = set.wait() else { return 125 };
        if sig != Signal::SIGCHLD {
            // Everyone in the namespace but PID 1.
            let _ = kill(Pid::from_raw(-1), sig);
            continue;
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == task => {
                    status_line(status, &format!("exit {code}"));
                    return code;
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == task => {
                    status_line(status, &format!("signal {}", sig as i32));
                    return 128 + sig as i32;
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

fn mnt(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    mount(src, target, fstype, flags, data).map_err(|e| format!("mount {}: {e}", target.display()))
}

fn mkdir(path: &Path, mode: u32) -> Result<(), String> {
    std::fs::create_dir_all(path).map_err(|e| format!("mkdir {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

fn bind(src: &Path, target: &Path, extra: MsFlags) -> Result<(), String> {
    mnt(Some(src), target, None, MsFlags::MS_BIND, None)?;
    mnt(
        None,
        target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | extra,
        None,
    )
}

/// Builds the new root under `spec.new_root` and pivots into it.
fn build_root(spec: &InitSpec) -> Result<(), String> {
    let nr = &spec.new_root;
    mnt(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    mnt(
        Some(Path::new("tmpfs")),
        nr,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=1m"),
    )?;
    for entry in policy::root_entries(&spec.rootfs) {
        match entry {
            RootEntry::Dir(d) => {
                let target = nr.join(&d);
                mkdir(&target, 0o755)?;
                bind(
                    &spec.rootfs.join(&d),
                    &target,
                    MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
                )?;
            }
            RootEntry::Link(name, dest) => {
                std::os::unix::fs::symlink(&dest, nr.join(&name))
                    .map_err(|e| format!("symlink {name}: {e}"))?;
            }
        }
    }
    let work = nr.join(policy::WORK_DIR.trim_start_matches('/'));
    mkdir(&work, 0o755)?;
    bind(&spec.workdir, &work, MsFlags::MS_NODEV)?;
    let tmp = nr.join("tmp");
    mkdir(&tmp, 0o1777)?;
    mnt(
        Some(Path::new("tmpfs")),
        &tmp,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    let dev = nr.join("dev");
    mkdir(&dev, 0o755)?;
    mnt(
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k"),
    )?;
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(node);
        File::create(&target).map_err(|e| format!("create {}: {e}", target.display()))?;
        bind(&Path::new("/dev").join(node), &target, MsFlags::MS_NOEXEC)?;
    }
    for (link, dest) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(dest, dev.join(link))
            .map_err(|e| format!("symlink /dev/{link}: {e}"))?;
    }
    let shm = dev.join("shm");
    mkdir(&shm, 0o1777)?;
    mnt(
        Some(Path::new("tmpfs")),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777,size=64m"),
    )?;
    mkdir(&nr.join("proc"), 0o555)?;
    let old = nr.join(".oldroot");
    mkdir(&old, 0o700)?;
    nix::unistd::pivot_root(nr, &old).map_err(|e| format!("pivot_root: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    umount2("/.oldroot", MntFlags::MNT_DETACH).map_err(|e| format!("umount old root: {e}"))?;
    std::fs::remove_dir("/.oldroot").map_err(|e| format!("rmdir /.oldroot: {e}"))?;
    mnt(
        Some(Path::new("proc")),
        Path::new("/proc"),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;
    mnt(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None,
    )
}

/// In the task process: confine, then execute. Returns only on failure.
fn exec_task(spec: &InitSpec) -> String {
    match confine_and_exec(spec) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn confine_and_exec(spec: &InitSpec) -> Result<std::convert::Infallible, String> {
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(|e| format!("sigprocmask: {e}"))?;
    use nix::sys::resource::{Resource, setrlimit};
    setrlimit(
        Resource::RLIMIT_NOFILE,
        policy::RLIMIT_NOFILE,
        policy::RLIMIT_NOFILE,
    )
    .map_err(|e| format!("rlimit: {e}"))?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|e| format!("rlimit: {e}"))?;
    nix::unistd::chdir(policy::WORK_DIR).map_err(|e| format!("chdir /work: {e}"))?;
    let program = resolve(&spec.argv[0], spec)?;
    nix::unistd::setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    nix::unistd::setgid(Gid::from_raw(spec.gid)).map_err(|e| format!("setgid: {e}"))?;
    nix::unistd::setuid(Uid::from_raw(spec.uid)).map_err(|e| format!("setuid: {e}"))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
    landlock_confine()?;
    for filter in super::seccomp::filters()? {
        seccompiler::apply_filter(&filter).map_err(|e| format!("seccomp: {e}"))?;
    }
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| cstring(a))
        .collect::<Result<_, _>>()?;
    let env: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| cstring(&format!("{k}={v}")))
        .collect::<Result<_, _>>()?;
    nix::unistd::execve(&program, &argv, &env)
        .map_err(|e| format!("cannot execute {}: {e}", spec.argv[0]))
}

fn cstring(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("argument or variable contains a NUL byte: {s:?}"))
}

/// `argv[0]` as a path: as given if it contains a slash, else searched in the task's `PATH`.
fn resolve(program: &str, spec: &InitSpec) -> Result<CString, String> {
    if program.contains('/') {
        return cstring(program);
    }
    let path = spec
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str());
    let found = super::super::find_in_path(program, path)
        .ok_or_else(|| format!("{program}: command not found in PATH"))?;
    CString::new(found.as_os_str().as_bytes()).map_err(|_| "NUL in path".to_string())
}

/// Landlock: read and execute everywhere, write only under `/work`, `/tmp` and `/dev`.
fn landlock_confine() -> Result<(), String> {
    use landlock::{
        ABI, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, path_beneath_rules,
    };
    let abi = ABI::V5;
    let err = |e: landlock::RulesetError| format!("landlock: {e}");
    Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi)))
        .map_err(err)?
        .add_rules(path_beneath_rules(
            [policy::WORK_DIR, "/tmp", "/dev"],
            AccessFs::from_all(abi),
        ))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(())
}
