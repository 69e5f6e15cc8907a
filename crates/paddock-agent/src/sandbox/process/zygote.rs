//! The sandbox zygote: `paddock __sandbox-zygote`, one long-lived, single-threaded process
//! per `process` backend. It forks each run's waiter ([`super::init::run_waiter`]), so a run
//! costs a `fork` of a small process instead of an `exec` of the whole `paddock` binary (a
//! 100 MB PIE: relocations and page faults before `main`), and it keeps a set of fresh
//! namespaces ready for the next run (network, IPC, UTS: creating a network namespace is
//! the slowest part of a sandbox's start here, 1-4 ms), made while it is idle.
//!
//! The agent talks to it over a `SOCK_SEQPACKET` socket pair (fd 3 in the zygote), one JSON
//! record per packet:
//! - agent → zygote: [`Request`] with four descriptors (`SCM_RIGHTS`): a memfd holding the
//!   [`InitSpec`] as JSON, then the run's stdin, stdout and stderr;
//! - zygote → agent: [`Reply::Started`] (the waiter's pid, which leads its own process group)
//!   or [`Reply::Failed`], and later [`Reply::Exited`] with the raw wait status.
//!
//! A waiter dies with the zygote (`PR_SET_PDEATHSIG`), and PID 1 of each run with its waiter,
//! so nothing outlives the zygote. When the agent's end of the socket closes (the backend
//! was dropped, or the agent died), the zygote kills every run still going and exits.

#![allow(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::signal::{SigSet, Signal, killpg};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, dup2, fork, setpgid};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use super::init::{InitSpec, run_waiter};

/// First argument that makes the `paddock` binary run [`zygote_main`].
pub const ZYGOTE_ARG: &str = "__sandbox-zygote";

/// The zygote's end of the socket pair.
const SOCK_FD: RawFd = 3;

/// Largest JSON record on the socket (the spec itself travels in a memfd).
const MAX_RECORD: usize = 4096;

/// How long the zygote waits for the next request before it makes its spare namespaces:
/// a burst of runs is served first.
const SPARE_IDLE_MS: u16 = 2;

/// Namespaces made ahead of time: used by every run (network only when `networkMode` is
/// `none`), each set by one run only.
const SPARE_KINDS: [(CloneFlags, &str); 3] = [
    (CloneFlags::CLONE_NEWNET, "net"),
    (CloneFlags::CLONE_NEWIPC, "ipc"),
    (CloneFlags::CLONE_NEWUTS, "uts"),
];

/// One run to start.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Request {
    /// Chosen by the agent; echoed in the reply.
    pub id: u64,
    /// Whether the run gets a new, empty network namespace.
    pub net_none: bool,
}

/// What the zygote reports.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(super) enum Reply {
    /// Request `id`'s waiter runs as `pid`, leader of its own process group.
    Started { id: u64, pid: i32 },
    /// Request `id` could not be started.
    Failed { id: u64, error: String },
    /// Waiter `pid` ended with the raw wait status `status`.
    Exited { pid: i32, status: i32 },
}

/// Entry point of `paddock __sandbox-zygote`. Never returns.
pub fn zygote_main() -> ! {
    // SAFETY: the agent put the zygote's end of the socket pair at fd 3 (`pre_exec` below)
    // and nothing else in this fresh process owns that descriptor.
    let sock = unsafe { OwnedFd::from_raw_fd(SOCK_FD) };
    let code = match serve(&sock) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("paddock sandbox zygote: {e}");
            1
        }
    };
    std::process::exit(code)
}

/// A fresh set of namespaces, not yet used by any run.
struct Spare {
    fds: Vec<(CloneFlags, OwnedFd)>,
}

/// The zygote's own namespaces, to come back to after making a spare.
struct Home {
    fds: Vec<(CloneFlags, OwnedFd)>,
}

fn ns_file(kind: &str) -> Result<OwnedFd, String> {
    File::open(Path::new("/proc/self/ns").join(kind))
        .map(OwnedFd::from)
        .map_err(|e| format!("open /proc/self/ns/{kind}: {e}"))
}

impl Home {
    fn open() -> Result<Home, String> {
        let fds = SPARE_KINDS
            .iter()
            .map(|(flag, kind)| Ok((*flag, ns_file(kind)?)))
            .collect::<Result<_, String>>()?;
        Ok(Home { fds })
    }

    /// Creates new namespaces of every spare kind, keeps a descriptor of each and returns to
    /// the zygote's own. An empty spare when they cannot be made (each run then creates its
    /// own); an error when the zygote could not return to its own namespaces (it must not
    /// serve any more runs).
    fn make_spare(&self) -> Result<Spare, String> {
        let all = SPARE_KINDS
            .iter()
            .fold(CloneFlags::empty(), |acc, (f, _)| acc | *f);
        if unshare(all).is_err() {
            return Ok(Spare { fds: Vec::new() });
        }
        let made: Result<Vec<_>, String> = SPARE_KINDS
            .iter()
            .map(|(flag, kind)| Ok((*flag, ns_file(kind)?)))
            .collect();
        for (flag, fd) in &self.fds {
            setns(fd, *flag).map_err(|e| format!("returning to its own namespaces: {e}"))?;
        }
        Ok(Spare {
            fds: made.unwrap_or_default(),
        })
    }
}

fn send_reply(sock: &OwnedFd, reply: &Reply) {
    if let Ok(bytes) = serde_json::to_vec(reply) {
        let _ = nix::sys::socket::send(sock.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL);
    }
}

/// A record and the descriptors that came with it.
type Received = (Vec<u8>, Vec<OwnedFd>);

/// Receives one record and its descriptors. `None` when the agent's end is closed.
fn receive(sock: &OwnedFd) -> Result<Option<Received>, Errno> {
    let mut buf = vec![0u8; MAX_RECORD];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let (len, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: descriptors received with SCM_RIGHTS are new in this process
                    // and owned by nobody else.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        (msg.bytes, fds)
    };
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    buf.truncate(len);
    Ok(Some((buf, fds)))
}

fn serve(sock: &OwnedFd) -> Result<(), String> {
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    chld.thread_block()
        .map_err(|e| format!("blocking SIGCHLD: {e}"))?;
    let sigfd = SignalFd::with_flags(&chld, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| format!("signalfd: {e}"))?;
    let home = Home::open()?;
    let mut spare: Option<Spare> = None;
    let mut live: HashSet<i32> = HashSet::new();
    loop {
        let (sock_ready, sig_ready) = {
            let mut fds = [
                PollFd::new(sock.as_fd(), PollFlags::POLLIN),
                PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
            ];
            let timeout = if spare.is_none() {
                PollTimeout::from(SPARE_IDLE_MS)
            } else {
                PollTimeout::NONE
            };
            match poll(&mut fds, timeout) {
                Ok(0) => {
                    // Idle: make the next run's namespaces now. A failure (a kernel without
                    // one of them) leaves the run to create them itself.
                    spare = Some(home.make_spare()?);
                    continue;
                }
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(format!("poll: {e}")),
            }
            let ready = |f: &PollFd<'_>| {
                f.revents().is_some_and(|r| {
                    r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
                })
            };
            (ready(&fds[0]), ready(&fds[1]))
        };
        if sig_ready {
            while let Ok(Some(_)) = sigfd.read_signal() {}
            reap(sock, &mut live);
        }
        if sock_ready {
            let (record, fds) = match receive(sock) {
                Ok(Some(got)) => got,
                Ok(None) | Err(Errno::ECONNRESET) => {
                    // The agent is gone: so are its runs.
                    for pid in &live {
                        let _ = killpg(Pid::from_raw(*pid), Signal::SIGKILL);
                    }
                    return Ok(());
                }
                Err(Errno::EINTR | Errno::EAGAIN) => continue,
                Err(e) => return Err(format!("recvmsg: {e}")),
            };
            let req: Request = match serde_json::from_slice(&record) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("paddock sandbox zygote: bad request: {e}");
                    continue;
                }
            };
            let usable = spare.take().filter(|s| !s.fds.is_empty());
            match start(sock, &sigfd, &req, fds, usable) {
                Ok(pid) => {
                    live.insert(pid.as_raw());
                    send_reply(
                        sock,
                        &Reply::Started {
                            id: req.id,
                            pid: pid.as_raw(),
                        },
                    );
                }
                Err(error) => send_reply(sock, &Reply::Failed { id: req.id, error }),
            }
        }
    }
}

/// Reports every waiter that ended.
fn reap(sock: &OwnedFd, live: &mut HashSet<i32>) {
    loop {
        let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, (code & 0xff) << 8),
            Ok(WaitStatus::Signaled(pid, sig, core)) => {
                (pid, sig as i32 | if core { 0x80 } else { 0 })
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => continue,
        };
        live.remove(&pid.as_raw());
        send_reply(
            sock,
            &Reply::Exited {
                pid: pid.as_raw(),
                status,
            },
        );
    }
}

/// Forks the waiter of `req`. In the child: a process group of its own, the run's stdio,
/// the spare namespaces, then [`run_waiter`].
fn start(
    sock: &OwnedFd,
    sigfd: &SignalFd,
    req: &Request,
    fds: Vec<OwnedFd>,
    spare: Option<Spare>,
) -> Result<Pid, String> {
    let [spec_fd, stdin, stdout, stderr]: [OwnedFd; 4] = fds
        .try_into()
        .map_err(|v: Vec<OwnedFd>| format!("expected 4 descriptors, got {}", v.len()))?;
    let mut text = String::new();
    let mut spec_file = File::from(spec_fd);
    spec_file
        .rewind()
        .and_then(|()| spec_file.read_to_string(&mut text))
        .map_err(|e| format!("reading the spec: {e}"))?;
    let spec: InitSpec = serde_json::from_str(&text).map_err(|e| format!("bad spec: {e}"))?;
    // SAFETY: the zygote is single-threaded, so the child may run arbitrary code.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Parent { child } => {
            // Also here, so that the group exists before the agent hears of the pid (the
            // child's own call may come later).
            let _ = setpgid(child, child);
            Ok(child)
        }
        ForkResult::Child => {
            let _ = nix::unistd::close(sock.as_raw_fd());
            let _ = nix::unistd::close(sigfd.as_fd().as_raw_fd());
            let code = match enter(&spec, req, [stdin, stdout, stderr], spare) {
                Ok(entered) => run_waiter(&spec, entered).unwrap_or_else(|e| {
                    eprintln!("paddock sandbox: {e}");
                    125
                }),
                Err(e) => {
                    if let Ok(mut f) = std::fs::OpenOptions::new()
                        .append(true)
                        .create(true)
                        .open(&spec.status_file)
                    {
                        let _ = writeln!(f, "setup {e}");
                    }
                    125
                }
            };
            std::process::exit(code)
        }
    }
}

/// In the forked waiter: process group, death signal, stdio, spare namespaces. Returns the
/// namespaces entered.
fn enter(
    spec: &InitSpec,
    req: &Request,
    stdio: [OwnedFd; 3],
    spare: Option<Spare>,
) -> Result<CloneFlags, String> {
    setpgid(Pid::from_raw(0), Pid::from_raw(0)).map_err(|e| format!("setpgid: {e}"))?;
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| format!("pdeathsig: {e}"))?;
    for (target, fd) in stdio.iter().enumerate() {
        dup2(fd.as_raw_fd(), target as RawFd).map_err(|e| format!("dup2: {e}"))?;
    }
    drop(stdio);
    let mut entered = CloneFlags::empty();
    for (flag, fd) in spare.map(|s| s.fds).unwrap_or_default() {
        if flag == CloneFlags::CLONE_NEWNET && !(req.net_none && spec.network_none) {
            continue;
        }
        setns(&fd, flag).map_err(|e| format!("setns: {e}"))?;
        entered |= flag;
    }
    Ok(entered)
}

/// The agent's side: starts the zygote, sends it runs and routes its replies.
#[derive(Debug)]
pub(super) struct Zygote {
    shared: Arc<Shared>,
    child: Mutex<Option<std::process::Child>>,
    reader: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Routes {
    /// Requests sent, waiting for `started`/`failed`.
    pending: HashMap<u64, oneshot::Sender<Result<ZygoteRun, String>>>,
    /// Started waiters, waiting for `exited`.
    exits: HashMap<i32, oneshot::Sender<i32>>,
}

#[derive(Debug)]
struct Shared {
    sock: AsyncFd<OwnedFd>,
    routes: Mutex<Routes>,
    next_id: AtomicU64,
    dead: AtomicBool,
}

/// A run the zygote started.
#[derive(Debug)]
pub(super) struct ZygoteRun {
    /// The waiter, leader of the run's process group.
    pub pid: Pid,
    /// Its exit status.
    pub exit: oneshot::Receiver<i32>,
}

impl Zygote {
    /// Starts `init_exe __sandbox-zygote`. Needs a Tokio runtime (the reply reader).
    pub(super) fn spawn(init_exe: &Path) -> io::Result<Zygote> {
        let (agent_end, zygote_end) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )?;
        // The zygote blocks on its end.
        nix::fcntl::fcntl(
            zygote_end.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )?;
        let raw = zygote_end.as_raw_fd();
        let mut cmd = std::process::Command::new(init_exe);
        cmd.arg(ZYGOTE_ARG)
            .env_clear()
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        // SAFETY: `dup2` is async-signal-safe, and the closure touches nothing else.
        unsafe {
            cmd.pre_exec(move || {
                if raw == SOCK_FD {
                    // dup2 onto itself keeps CLOEXEC: clear it instead.
                    nix::fcntl::fcntl(
                        raw,
                        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                    )?;
                } else {
                    dup2(raw, SOCK_FD)?;
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(zygote_end);
        // SAFETY: an `OwnedFd` keeps its descriptor open and unchanged for as long as the
        // `AsyncFd` owns it.
        let sock = unsafe { AsyncFd::register(agent_end) }.map_err(io::Error::from)?;
        let shared = Arc::new(Shared {
            sock,
            routes: Mutex::new(Routes::default()),
            next_id: AtomicU64::new(1),
            dead: AtomicBool::new(false),
        });
        let reader = tokio::spawn(read_replies(shared.clone()));
        Ok(Zygote {
            shared,
            child: Mutex::new(Some(child)),
            reader,
        })
    }

    /// Whether the zygote still answers (its socket is open).
    pub(super) fn alive(&self) -> bool {
        !self.shared.dead.load(Ordering::SeqCst)
    }

    /// Starts one run: `spec` (written to a memfd), with the given stdio descriptors.
    pub(super) async fn start(
        &self,
        spec: &InitSpec,
        stdio: [OwnedFd; 3],
    ) -> Result<ZygoteRun, String> {
        let json = serde_json::to_vec(spec).map_err(|e| e.to_string())?;
        let memfd = nix::sys::memfd::memfd_create(
            c"paddock-spec",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .map_err(|e| format!("memfd: {e}"))?;
        let mut file = File::from(memfd);
        file.write_all(&json)
            .map_err(|e| format!("writing the spec: {e}"))?;
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let record = serde_json::to_vec(&Request {
            id,
            net_none: spec.network_none,
        })
        .map_err(|e| e.to_string())?;
        let (tx, rx) = oneshot::channel();
        lock(&self.shared.routes).pending.insert(id, tx);
        let fds = [
            file.as_raw_fd(),
            stdio[0].as_raw_fd(),
            stdio[1].as_raw_fd(),
            stdio[2].as_raw_fd(),
        ];
        let sent = loop {
            let mut guard = match self.shared.sock.writable().await {
                Ok(g) => g,
                Err(e) => break Err(e),
            };
            match guard.try_io(|sock| {
                sendmsg::<()>(
                    sock.get_ref().as_raw_fd(),
                    &[IoSlice::new(&record)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            }) {
                Ok(result) => break result,
                Err(_would_block) => continue,
            }
        };
        if let Err(e) = sent {
            lock(&self.shared.routes).pending.remove(&id);
            self.shared.dead.store(true, Ordering::SeqCst);
            return Err(format!("sending to the sandbox zygote: {e}"));
        }
        // The zygote has its own copies now.
        drop(stdio);
        drop(file);
        match rx.await {
            Ok(Ok(run)) => Ok(run),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the sandbox zygote exited".into()),
        }
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some(mut child) = lock(&self.child).take() {
            let _ = child.kill();
            // Reaped off the caller's thread: it exits at once after SIGKILL.
            std::thread::spawn(move || child.wait());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads the zygote's replies until its socket closes; then every waiting run fails.
async fn read_replies(shared: Arc<Shared>) {
    let mut buf = vec![0u8; MAX_RECORD];
    loop {
        let Ok(mut guard) = shared.sock.readable().await else {
            break;
        };
        let got = guard.try_io(|sock| {
            nix::sys::socket::recv(sock.get_ref().as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(io::Error::from)
        });
        let len = match got {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => n,
            Err(_would_block) => continue,
        };
        let Ok(reply) = serde_json::from_slice::<Reply>(&buf[..len]) else {
            tracing::warn!("sandbox zygote sent an unreadable reply");
            continue;
        };
        let mut routes = lock(&shared.routes);
        match reply {
            Reply::Started { id, pid } => {
                let (tx, rx) = oneshot::channel();
                routes.exits.insert(pid, tx);
                let started = routes.pending.remove(&id);
                let run = ZygoteRun {
                    pid: Pid::from_raw(pid),
                    exit: rx,
                };
                if started.is_none_or(|s| s.send(Ok(run)).is_err()) {
                    // Nobody waits for this run any more (its future was dropped).
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            Reply::Failed { id, error } => {
                if let Some(s) = routes.pending.remove(&id) {
                    let _ = s.send(Err(error));
                }
            }
            Reply::Exited { pid, status } => {
                if let Some(s) = routes.exits.remove(&pid) {
                    let _ = s.send(status);
                }
            }
        }
    }
    shared.dead.store(true, Ordering::SeqCst);
    let mut routes = lock(&shared.routes);
    routes.pending.clear();
    routes.exits.clear();
}

/// The exit status of a zygote run, as `Child::wait` would give it.
pub(super) async fn exit_status(exit: oneshot::Receiver<i32>) -> io::Result<ExitStatus> {
    exit.await
        .map(ExitStatus::from_raw)
        .map_err(|_| io::Error::other("the sandbox zygote exited before the run ended"))
}
