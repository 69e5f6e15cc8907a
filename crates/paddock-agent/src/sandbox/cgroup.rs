//! Cgroups of sandbox runs, shared by the `process` and `oci` backends.
//!
//! - **Layout.** Where this host's hierarchies are: cgroup v1 (as on the dev machines: one
//!   hierarchy per controller) or v2 (unified), read from `/proc/self/mountinfo` and
//!   `/proc/self/cgroup`, never assumed ([`CgroupLayout`]). The agent's own cgroup of each
//!   controller is found relative to the mount's root, so a delegated subtree is enough.
//! - **A run's cgroup** ([`Cgroup`]): for `process`, `.../paddock/<name>` under the agent's
//!   own cgroup of memory, cpu and pids (v1) or of the unified hierarchy (v2), with the
//!   memory, CPU and process-count limits ([`Cgroup::create`]); for `oci` with a runtime
//!   that cannot keep its cgroup (crun without `--keep`), `<id>` under the agent's own v1
//!   cgroups of memory, pids, cpu and devices, with the limits and runc's default device
//!   allow-list ([`Cgroup::owned`], [`Cgroup::create_owned`]).
//! - **Afterwards**: the OOM and fork-limit counters ([`Counters`]), killing everything
//!   inside, and removing the directories.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::Limits;

/// The v1 controllers whose hierarchies are looked up: the ones a `process` run needs, and
/// the ones of a cgroup the `oci` backend creates itself.
pub(crate) const OWNED_CONTROLLERS: &[&str] = &["memory", "pids", "cpu", "devices"];

/// The controllers a `process` run needs.
const RUN_CONTROLLERS: &[&str] = &["memory", "cpu", "pids"];

/// CFS period for the CPU quota, in microseconds.
pub(crate) const CPU_PERIOD_US: u64 = 100_000;

/// How long removing a cgroup is retried (its last processes may still be exiting).
const REMOVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Device rules of an owned cgroup, after denying everything: the default allow-list of
/// runc (and crun), which the runtimes apply themselves when they manage the cgroup.
const DEVICE_ALLOW: &[&str] = &[
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",   // null
    "c 1:5 rwm",   // zero
    "c 1:7 rwm",   // full
    "c 1:8 rwm",   // random
    "c 1:9 rwm",   // urandom
    "c 5:0 rwm",   // tty
    "c 5:2 rwm",   // ptmx
    "c 136:* rwm", // pts
];

// ---------------------------------------------------------------------------------------
// Mounts.

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountInfo {
    /// The mounted directory of the file system (`/` unless a subtree is mounted).
    pub(crate) root: String,
    /// Where it is mounted.
    pub(crate) mount_point: PathBuf,
    /// File system type (`cgroup`, `cgroup2`, ...).
    pub(crate) fstype: String,
    /// Super block options (for `cgroup`: the controllers).
    pub(crate) super_opts: String,
}

impl MountInfo {
    /// Whether this is a cgroup v1 hierarchy with `controller`.
    pub(crate) fn is_v1_with(&self, controller: &str) -> bool {
        self.fstype == "cgroup" && self.super_opts.split(',').any(|o| o == controller)
    }
}

/// The mounts of this process.
pub(crate) fn mounts() -> Vec<MountInfo> {
    parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// The lines of a `/proc/<pid>/mountinfo` text.
pub(crate) fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next()?;
            let super_opts = right.next().unwrap_or_default();
            Some(MountInfo {
                root: unescape_mountinfo(left.get(3)?),
                mount_point: PathBuf::from(unescape_mountinfo(left.get(4)?)),
                fstype: fstype.to_string(),
                super_opts: super_opts.to_string(),
            })
        })
        .collect()
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo fields.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------
// Layout.

/// A cgroup v1 controller: its hierarchy's mount point and this process's cgroup in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct V1Controller {
    /// Controller name.
    pub(crate) name: String,
    /// Mount point of its hierarchy.
    pub(crate) mount: PathBuf,
    /// This process's cgroup in it.
    pub(crate) own: PathBuf,
}

/// The cgroup v2 hierarchy and this process's cgroup in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct V2Hierarchy {
    /// Mount point.
    pub(crate) mount: PathBuf,
    /// This process's cgroup in it.
    pub(crate) own: PathBuf,
    /// The controllers it offers (`cgroup.controllers` of its root; read by
    /// [`CgroupLayout::detect`]).
    pub(crate) controllers: Vec<String>,
}

/// Where the cgroups of this host are (as seen at start).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CgroupLayout {
    /// memory, pids, cpu and devices, where mounted as v1.
    pub(crate) v1: Vec<V1Controller>,
    /// The unified hierarchy, when it has the memory controller and v1 does not.
    pub(crate) v2: Option<V2Hierarchy>,
    /// v1 swap accounting (`memory.memsw.*`) exists.
    pub(crate) memsw: bool,
}

/// Where the cgroups of `process` runs go: under the agent's own cgroups of the v1 memory,
/// cpu and pids controllers, or of the unified hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RunLayout {
    /// One hierarchy per controller.
    V1(Vec<V1Controller>),
    /// The unified hierarchy.
    V2(V2Hierarchy),
}

impl CgroupLayout {
    /// The layout of this host.
    pub(crate) fn detect() -> CgroupLayout {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Self::detect_from(&mountinfo, &own)
    }

    /// The layout these texts of `/proc/self/mountinfo` and `/proc/self/cgroup` describe,
    /// completed from the file systems they name (`memory.memsw.*` on v1, the controllers of
    /// the unified hierarchy); the tests point them at a fixture tree.
    pub(crate) fn detect_from(mountinfo: &str, own: &str) -> CgroupLayout {
        let mut layout = Self::parse(mountinfo, own);
        if let Some(memory) = layout.v1("memory") {
            layout.memsw = memory.mount.join("memory.memsw.limit_in_bytes").exists();
        }
        if let Some(v2) = &mut layout.v2 {
            v2.controllers = fs::read_to_string(v2.mount.join("cgroup.controllers"))
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string)
                .collect();
        }
        let memory_on_v2 = layout
            .v2
            .as_ref()
            .is_some_and(|v2| v2.controllers.iter().any(|c| c == "memory"));
        if layout.v1("memory").is_some() || !memory_on_v2 {
            layout.v2 = None;
        }
        layout
    }

    /// The layout from the texts of `/proc/self/mountinfo` and `/proc/self/cgroup`.
    pub(crate) fn parse(mountinfo: &str, proc_cgroup: &str) -> CgroupLayout {
        let mounts = parse_mountinfo(mountinfo);
        let mut layout = CgroupLayout::default();
        for &name in OWNED_CONTROLLERS {
            let Some(mount) = mounts.iter().find(|m| m.is_v1_with(name)) else {
                continue;
            };
            let Some(path) = proc_cgroup.lines().find_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                controllers
                    .split(',')
                    .any(|c| c == name)
                    .then(|| path.to_string())
            }) else {
                continue;
            };
            layout.v1.push(V1Controller {
                name: name.to_string(),
                mount: mount.mount_point.clone(),
                own: own_dir(&mount.mount_point, &mount.root, &path),
            });
        }
        if let Some(mount) = mounts.iter().find(|m| m.fstype == "cgroup2") {
            let path = proc_cgroup
                .lines()
                .find_map(|line| line.strip_prefix("0::").map(str::to_string))
                .unwrap_or_else(|| "/".to_string());
            layout.v2 = Some(V2Hierarchy {
                mount: mount.mount_point.clone(),
                own: own_dir(&mount.mount_point, &mount.root, &path),
                controllers: Vec::new(),
            });
        }
        layout
    }

    /// The v1 controller `name`, if mounted.
    pub(crate) fn v1(&self, name: &str) -> Option<&V1Controller> {
        self.v1.iter().find(|c| c.name == name)
    }

    /// Where `process` runs get their cgroups: v1 if memory, cpu and pids are v1
    /// hierarchies, else v2 if the unified hierarchy offers memory, cpu and pids.
    ///
    /// # Errors
    /// Neither is usable.
    pub(crate) fn run_layout(&self) -> Result<RunLayout, String> {
        let v1: Vec<V1Controller> = RUN_CONTROLLERS
            .iter()
            .filter_map(|name| self.v1(name).cloned())
            .collect();
        if v1.len() == RUN_CONTROLLERS.len() {
            return Ok(RunLayout::V1(v1));
        }
        self.v2
            .as_ref()
            .filter(|v2| {
                RUN_CONTROLLERS
                    .iter()
                    .all(|c| v2.controllers.iter().any(|have| have == c))
            })
            .map(|v2| RunLayout::V2(v2.clone()))
            .ok_or_else(|| {
                "no usable cgroup hierarchy (need memory, cpu and pids, v1 or v2)".to_string()
            })
    }

    /// Whether the OCI `swap` (memory + swap) limit can be applied.
    pub(crate) fn swap_limit_supported(&self) -> bool {
        if self.v1("memory").is_some() {
            self.memsw
        } else {
            self.v2.is_some()
        }
    }

    /// Whether the counters are read from cgroup v2 files.
    pub(crate) fn counters_v2(&self) -> bool {
        self.v1("memory").is_none() && self.v2.is_some()
    }

    /// The directory of a runtime-created container cgroup (`cgroupsPath` = `id`, relative):
    /// runc puts it under its own cgroup, crun under the hierarchy's root.
    pub(crate) fn container_dir(&self, controller: &str, id: &str) -> Option<PathBuf> {
        let candidates = match (self.v1(controller), &self.v2) {
            (Some(c), _) => [c.own.join(id), c.mount.join(id)],
            (None, Some(v2)) => [v2.own.join(id), v2.mount.join(id)],
            (None, None) => return None,
        };
        candidates.into_iter().find(|dir| dir.is_dir())
    }

    /// `v1 (memory,pids,cpu,devices)`, `v2 (/sys/fs/cgroup)` or `none`, for logs.
    pub(crate) fn describe(&self) -> String {
        if self.v1("memory").is_some() {
            let names: Vec<&str> = self.v1.iter().map(|c| c.name.as_str()).collect();
            format!("v1 ({})", names.join(","))
        } else if let Some(v2) = &self.v2 {
            format!("v2 ({})", v2.mount.display())
        } else {
            "none".to_string()
        }
    }
}

/// `mount` + `path` relative to the mount's root.
fn own_dir(mount: &Path, root: &str, path: &str) -> PathBuf {
    let rel = if root != "/" {
        path.strip_prefix(root).unwrap_or(path)
    } else {
        path
    };
    mount.join(rel.trim_start_matches('/'))
}

// ---------------------------------------------------------------------------------------
// Counters.

/// Limit counters of a finished run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    /// Processes killed by the OOM killer.
    pub(crate) oom_kills: u64,
    /// Forks refused by the pids limit.
    pub(crate) pids_max: u64,
}

impl Counters {
    /// Reads `oom_kill` (v1 `memory.oom_control`, v2 `memory.events`) and `max` of
    /// `pids.events`; a missing directory or file counts 0.
    pub(crate) fn read(memory_dir: Option<&Path>, pids_dir: Option<&Path>, v2: bool) -> Counters {
        let memory_file = if v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        let field = |dir: Option<&Path>, file: &str, key: &str| -> u64 {
            dir.and_then(|d| fs::read_to_string(d.join(file)).ok())
                .and_then(|text| keyed_value(&text, key))
                .unwrap_or(0)
        };
        Counters {
            oom_kills: field(memory_dir, memory_file, "oom_kill"),
            pids_max: field(pids_dir, "pids.events", "max"),
        }
    }
}

/// The value of `key value` line `key` (`oom_kill 1`).
fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

// ---------------------------------------------------------------------------------------
// The cgroup of one run.

/// The cgroup of one run: one directory per controller (v1), or one directory (v2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cgroup {
    v2: bool,
    /// Controller name (`unified` on v2) and directory.
    dirs: Vec<(String, PathBuf)>,
    /// v1 swap accounting: memory + swap gets the memory limit too.
    memsw: bool,
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    fs::write(path, value).map_err(|e| format!("cannot write {value} to {}: {e}", path.display()))
}

impl Cgroup {
    /// Creates the cgroup of `process` run `name` (`.../paddock/<name>`) with `limits`
    /// applied.
    pub(crate) fn create(
        layout: &RunLayout,
        name: &str,
        limits: &Limits,
    ) -> Result<Cgroup, String> {
        let mut cg = match layout {
            RunLayout::V1(controllers) => {
                let mut dirs = Vec::new();
                for controller in controllers {
                    let dir = controller.own.join("paddock").join(name);
                    fs::create_dir_all(&dir)
                        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
                    dirs.push((controller.name.clone(), dir));
                }
                Cgroup {
                    v2: false,
                    dirs,
                    memsw: false,
                }
            }
            RunLayout::V2(v2) => {
                let parent = v2.own.join("paddock");
                fs::create_dir_all(&parent)
                    .map_err(|e| format!("creating {}: {e}", parent.display()))?;
                // Controllers must be enabled in the parent's subtree to be set on the child.
                let _ = write(&parent.join("cgroup.subtree_control"), "+memory +cpu +pids");
                let dir = parent.join(name);
                fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
                Cgroup {
                    v2: true,
                    dirs: vec![("unified".into(), dir)],
                    memsw: false,
                }
            }
        };
        cg.memsw = !cg.v2
            && cg
                .dir("memory")
                .is_some_and(|d| d.join("memory.memsw.limit_in_bytes").exists());
        if let Err(e) = cg.apply_run_limits(limits) {
            cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    /// The cgroups the `oci` backend creates itself for container `id` (crun without
    /// `--keep`): `<id>` under the agent's own cgroup of each v1 controller of
    /// [`OWNED_CONTROLLERS`] that is mounted. Nothing is created yet
    /// ([`Cgroup::create_owned`]).
    pub(crate) fn owned(layout: &CgroupLayout, id: &str) -> Cgroup {
        let dirs = OWNED_CONTROLLERS
            .iter()
            .filter_map(|name| {
                layout
                    .v1(name)
                    .map(|c| ((*name).to_string(), c.own.join(id)))
            })
            .collect();
        Cgroup {
            v2: false,
            dirs,
            memsw: layout.memsw,
        }
    }

    /// Creates the cgroups of [`Cgroup::owned`] (removing a stale one of the same name) and
    /// writes the limits.
    pub(crate) fn create_owned(&self, limits: Limits) -> Result<(), String> {
        self.remove();
        for (_, dir) in &self.dirs {
            if dir.exists() {
                return Err(format!("stale cgroup {} cannot be removed", dir.display()));
            }
        }
        let result = self.create_with_owned_limits(limits);
        if result.is_err() {
            self.remove();
        }
        result
    }

    /// The directory of `controller` (v2: the one directory, whatever is asked).
    pub(crate) fn dir(&self, controller: &str) -> Option<&Path> {
        if self.v2 {
            return self.dirs.first().map(|(_, d)| d.as_path());
        }
        self.dirs
            .iter()
            .find(|(c, _)| c == controller)
            .map(|(_, d)| d.as_path())
    }

    /// A `process` run's limits: memory (swap included, no swappiness), CPU quota, pids.
    fn apply_run_limits(&self, l: &Limits) -> Result<(), String> {
        let quota = u64::from(l.cpu_millis) * CPU_PERIOD_US / 1000;
        if self.v2 {
            let d = self.dir("").ok_or("no cgroup directory")?;
            write(&d.join("memory.max"), &l.memory_bytes.to_string())?;
            let _ = write(&d.join("memory.swap.max"), "0");
            write(&d.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            write(&d.join("pids.max"), &l.pids.to_string())?;
            return Ok(());
        }
        let mem = self.dir("memory").ok_or("no memory cgroup")?;
        write(
            &mem.join("memory.limit_in_bytes"),
            &l.memory_bytes.to_string(),
        )?;
        // With swap accounting, memory+swap gets the same limit: no swap beyond it.
        if self.memsw {
            write(
                &mem.join("memory.memsw.limit_in_bytes"),
                &l.memory_bytes.to_string(),
            )?;
        }
        let _ = write(&mem.join("memory.swappiness"), "0");
        let cpu = self.dir("cpu").ok_or("no cpu cgroup")?;
        write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
        write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
        let pids = self.dir("pids").ok_or("no pids cgroup")?;
        write(&pids.join("pids.max"), &l.pids.to_string())?;
        Ok(())
    }

    /// Creates the owned cgroups with the limits a runtime would have applied (zero: no
    /// limit), one more process for the runtime living in them, and the device allow-list.
    fn create_with_owned_limits(&self, limits: Limits) -> Result<(), String> {
        for (name, dir) in &self.dirs {
            fs::create_dir(dir)
                .map_err(|err| format!("cannot create cgroup {}: {err}", dir.display()))?;
            match name.as_str() {
                "memory" if limits.memory_bytes > 0 => {
                    let bytes = limits.memory_bytes.min(i64::MAX as u64).to_string();
                    write(&dir.join("memory.limit_in_bytes"), &bytes)?;
                    if self.memsw {
                        write(&dir.join("memory.memsw.limit_in_bytes"), &bytes)?;
                    }
                }
                // One more process: crun itself lives in this cgroup.
                "pids" if limits.pids > 0 => {
                    write(
                        &dir.join("pids.max"),
                        &(u64::from(limits.pids) + 1).to_string(),
                    )?;
                }
                "devices" => {
                    write(&dir.join("devices.deny"), "a")?;
                    for rule in DEVICE_ALLOW {
                        write(&dir.join("devices.allow"), rule)?;
                    }
                }
                "cpu" if limits.cpu_millis > 0 => {
                    write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(
                        &dir.join("cpu.cfs_quota_us"),
                        &(u64::from(limits.cpu_millis) * CPU_PERIOD_US / 1000).to_string(),
                    )?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files a process writes its pid to, to join.
    pub(crate) fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|(_, d)| d.join("cgroup.procs"))
            .collect()
    }

    /// The limit counters of this cgroup.
    pub(crate) fn counters(&self) -> Counters {
        Counters::read(self.dir("memory"), self.dir("pids"), self.v2)
    }

    /// Processes in the cgroup.
    pub(crate) fn pids(&self) -> Vec<Pid> {
        let mut pids: Vec<Pid> = self
            .procs_files()
            .iter()
            .filter_map(|file| fs::read_to_string(file).ok())
            .flat_map(|text| {
                text.lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok())
                    .collect::<Vec<_>>()
            })
            .map(Pid::from_raw)
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Sends `signal` to every process in the cgroup except `except`.
    pub(crate) fn signal_all(&self, signal: Signal, except: Option<Pid>) {
        for pid in self.pids() {
            if Some(pid) != except {
                let _ = kill(pid, signal);
            }
        }
    }

    /// SIGKILLs everything in the cgroup until it is empty (bounded to about a second).
    pub(crate) fn kill_all(&self) {
        if self.v2
            && let Some(d) = self.dir("")
            && write(&d.join("cgroup.kill"), "1").is_ok()
        {
            return;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        let mut attempt = 0;
        while std::time::Instant::now() < deadline {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                let _ = kill(pid, Signal::SIGKILL);
            }
            std::thread::sleep(backoff(attempt));
            attempt += 1;
        }
    }

    /// Kills what is left and removes the directories, retrying while the last processes
    /// exit (at most [`REMOVE_TIMEOUT`]).
    pub(crate) fn remove(&self) {
        let deadline = std::time::Instant::now() + REMOVE_TIMEOUT;
        for (_, dir) in &self.dirs {
            let mut attempt = 0;
            loop {
                if !dir.exists() {
                    break;
                }
                let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(err) if err.kind() == io::ErrorKind::NotFound => break,
                    Err(err) => {
                        if std::time::Instant::now() > deadline {
                            tracing::warn!(cgroup = %dir.display(), error = %err, "cannot remove cgroup");
                            break;
                        }
                        std::thread::sleep(backoff(attempt));
                        attempt += 1;
                    }
                }
            }
        }
    }
}

/// Wait before retry `attempt` of a cgroup operation: a process that just exited leaves its
/// cgroup within microseconds, so start at 0.2 ms and double up to 10 ms.
fn backoff(attempt: u32) -> Duration {
    Duration::from_micros((200u64 << attempt.min(6)).min(10_000))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sandbox::outcome::format_bytes;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn detects_this_hosts_layout() {
        // The dev and CI machines have cgroup v1 controllers; elsewhere v2 is fine too.
        match CgroupLayout::detect().run_layout() {
            Ok(RunLayout::V1(m)) => assert!(m.iter().any(|c| c.name == "memory")),
            Ok(RunLayout::V2(p)) => assert!(p.mount.join("cgroup.controllers").exists()),
            Err(e) => eprintln!("no cgroups here: {e}"),
        }
    }

    #[test]
    fn creates_limits_and_removes() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: needs root");
            return;
        }
        let Ok(layout) = CgroupLayout::detect().run_layout() else {
            return;
        };
        let limits = Limits {
            memory_bytes: 64 << 20,
            cpu_millis: 500,
            pids: 32,
        };
        let cg = Cgroup::create(&layout, "unit-test-cg", &limits).unwrap();
        match &layout {
            RunLayout::V1(_) => {
                let mem = cg.dir("memory").unwrap();
                assert_eq!(
                    std::fs::read_to_string(mem.join("memory.limit_in_bytes"))
                        .unwrap()
                        .trim(),
                    "67108864"
                );
                let cpu = cg.dir("cpu").unwrap();
                assert_eq!(
                    std::fs::read_to_string(cpu.join("cpu.cfs_quota_us"))
                        .unwrap()
                        .trim(),
                    "50000"
                );
                let pids = cg.dir("pids").unwrap();
                assert_eq!(
                    std::fs::read_to_string(pids.join("pids.max"))
                        .unwrap()
                        .trim(),
                    "32"
                );
            }
            RunLayout::V2(_) => {
                let d = cg.dir("").unwrap();
                assert_eq!(
                    std::fs::read_to_string(d.join("pids.max")).unwrap().trim(),
                    "32"
                );
            }
        }
        assert_eq!(cg.counters().oom_kills, 0);
        assert!(cg.pids().is_empty());
        cg.remove();
        assert!(cg.dirs.iter().all(|(_, d)| !d.exists()));
    }

    #[test]
    fn counters_and_sizes_are_parsed() {
        let oom = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed_value(oom, "oom_kill"), Some(3));
        assert_eq!(keyed_value(oom, "oom"), None);
        assert_eq!(keyed_value("max 12\n", "max"), Some(12));
        assert_eq!(format_bytes(64 * MIB), "64 MiB");
        assert_eq!(format_bytes(1536 * 1024), "1536 KiB");
        assert_eq!(format_bytes(1000), "1000 bytes");
    }

    #[test]
    fn cgroup_layout_is_parsed() {
        let mountinfo = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 /docker/abc /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/uni\\040fied rw,relatime - cgroup2 cgroup2 rw";
        let proc_cgroup = "8:pids:/docker/abc/inner\n4:memory:/process_api/x\n1:cpu:/\n0::/\n";
        let layout = CgroupLayout::parse(mountinfo, proc_cgroup);
        assert_eq!(
            layout.v1("memory").unwrap().own,
            Path::new("/sys/fs/cgroup/memory/process_api/x")
        );
        assert_eq!(
            layout.v1("pids").unwrap().own,
            Path::new("/sys/fs/cgroup/pids/inner")
        );
        assert_eq!(
            layout.v1("cpu").unwrap().own,
            Path::new("/sys/fs/cgroup/cpu")
        );
        assert_eq!(
            layout.v2.as_ref().unwrap().mount,
            Path::new("/sys/fs/cgroup/uni fied")
        );
    }

    // cgroup v2: the dev and CI machines are v1-only, so the unified code paths run against
    // fixture texts of /proc/self/mountinfo and /proc/self/cgroup naming a fake cgroup2
    // tree in a temporary directory (plain files stand for the kernel's interface files).

    /// A fake cgroup2 mount at `<dir>/cgroup` offering `controllers`, with this process in
    /// `/agent.slice/paddock-agent.service`; the mountinfo and /proc/self/cgroup texts.
    fn fake_v2(dir: &Path, controllers: &str) -> (String, String) {
        let mount = dir.join("cgroup");
        fs::create_dir_all(mount.join("agent.slice/paddock-agent.service")).unwrap();
        fs::write(mount.join("cgroup.controllers"), controllers).unwrap();
        let mountinfo = format!(
            "22 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
             35 22 0:30 / {} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n",
            mount.display()
        );
        (
            mountinfo,
            "0::/agent.slice/paddock-agent.service\n".to_string(),
        )
    }

    #[test]
    fn v2_layout_is_detected_from_the_unified_mount() {
        let dir = tempfile::tempdir().unwrap();
        let (mountinfo, own) = fake_v2(dir.path(), "cpuset cpu io memory hugetlb pids rdma\n");
        let layout = CgroupLayout::detect_from(&mountinfo, &own);
        let mount = dir.path().join("cgroup");
        let v2 = layout.v2.clone().unwrap();
        assert_eq!(v2.mount, mount);
        assert_eq!(v2.own, mount.join("agent.slice/paddock-agent.service"));
        assert!(v2.controllers.iter().any(|c| c == "memory"));
        assert!(layout.v1.is_empty());
        assert!(layout.counters_v2());
        assert!(layout.swap_limit_supported());
        assert_eq!(layout.describe(), format!("v2 ({})", mount.display()));
        assert_eq!(layout.run_layout(), Ok(RunLayout::V2(v2.clone())));

        // A runtime's container cgroup: under the agent's own cgroup, else under the root.
        assert_eq!(layout.container_dir("memory", "c1"), None);
        fs::create_dir(mount.join("c1")).unwrap();
        assert_eq!(layout.container_dir("pids", "c1"), Some(mount.join("c1")));
        fs::create_dir(v2.own.join("c1")).unwrap();
        assert_eq!(layout.container_dir("pids", "c1"), Some(v2.own.join("c1")));
    }

    #[test]
    fn v2_without_the_needed_controllers_is_unusable() {
        let dir = tempfile::tempdir().unwrap();
        // memory delegated, but not pids: no run layout.
        let (mountinfo, own) = fake_v2(dir.path(), "cpu memory\n");
        let layout = CgroupLayout::detect_from(&mountinfo, &own);
        assert!(layout.v2.is_some());
        assert!(layout.run_layout().is_err());
        // No memory controller on the unified hierarchy: not used at all.
        let (mountinfo, own) = fake_v2(dir.path(), "cpu pids\n");
        let layout = CgroupLayout::detect_from(&mountinfo, &own);
        assert_eq!(layout.v2, None);
        assert_eq!(layout.describe(), "none");
        assert!(layout.run_layout().is_err());
    }

    #[test]
    fn hybrid_hosts_use_v1_and_ignore_the_empty_unified_mount() {
        let dir = tempfile::tempdir().unwrap();
        let (v2_mountinfo, _) = fake_v2(dir.path(), "");
        let memory = dir.path().join("memory");
        fs::create_dir_all(memory.join("agent")).unwrap();
        fs::write(memory.join("memory.memsw.limit_in_bytes"), "max").unwrap();
        let mountinfo = format!(
            "{v2_mountinfo}\
             40 22 0:40 / {mem} rw - cgroup cgroup rw,memory\n\
             41 22 0:41 / {d}/cpu rw - cgroup cgroup rw,cpu,cpuacct\n\
             42 22 0:42 / {d}/pids rw - cgroup cgroup rw,pids\n",
            mem = memory.display(),
            d = dir.path().display()
        );
        let own = "5:pids:/agent\n4:cpu,cpuacct:/agent\n3:memory:/agent\n0::/\n";
        let layout = CgroupLayout::detect_from(&mountinfo, own);
        assert_eq!(layout.v2, None);
        assert!(layout.memsw && layout.swap_limit_supported() && !layout.counters_v2());
        assert_eq!(layout.v1("memory").unwrap().own, memory.join("agent"));
        match layout.run_layout().unwrap() {
            RunLayout::V1(controllers) => assert_eq!(controllers.len(), 3),
            other @ RunLayout::V2(_) => panic!("expected v1, got {other:?}"),
        }
    }

    #[test]
    fn v2_subtree_mounts_resolve_the_own_cgroup() {
        // A container that sees only its part of the hierarchy mounted at /sys/fs/cgroup.
        let layout = CgroupLayout::parse(
            "35 22 0:30 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
            "0::/docker/abc/agent\n",
        );
        assert_eq!(layout.v2.unwrap().own, Path::new("/sys/fs/cgroup/agent"));
        // No `0::` line: the root.
        let layout =
            CgroupLayout::parse("35 22 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n", "");
        assert_eq!(layout.v2.unwrap().own, Path::new("/sys/fs/cgroup"));
    }

    #[test]
    fn v2_run_cgroup_gets_its_limits_counters_and_kill() {
        let dir = tempfile::tempdir().unwrap();
        let (mountinfo, own) = fake_v2(dir.path(), "cpu memory pids\n");
        let layout = CgroupLayout::detect_from(&mountinfo, &own)
            .run_layout()
            .unwrap();
        let limits = Limits {
            memory_bytes: 64 * MIB,
            cpu_millis: 1500,
            pids: 32,
        };
        let cg = Cgroup::create(&layout, "task-1", &limits).unwrap();
        let parent = dir
            .path()
            .join("cgroup/agent.slice/paddock-agent.service/paddock");
        let run = parent.join("task-1");
        let read = |p: &Path| fs::read_to_string(p).unwrap();
        assert_eq!(
            read(&parent.join("cgroup.subtree_control")),
            "+memory +cpu +pids"
        );
        assert_eq!(read(&run.join("memory.max")), "67108864");
        assert_eq!(read(&run.join("memory.swap.max")), "0");
        assert_eq!(read(&run.join("cpu.max")), "150000 100000");
        assert_eq!(read(&run.join("pids.max")), "32");
        // One directory, whatever the controller.
        assert_eq!(cg.dir("memory"), Some(run.as_path()));
        assert_eq!(cg.dir("pids"), Some(run.as_path()));
        assert_eq!(cg.procs_files(), vec![run.join("cgroup.procs")]);

        assert_eq!(cg.counters(), Counters::default());
        fs::write(
            run.join("memory.events"),
            "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\noom_group_kill 0\n",
        )
        .unwrap();
        fs::write(run.join("pids.events"), "max 7\n").unwrap();
        assert_eq!(
            cg.counters(),
            Counters {
                oom_kills: 1,
                pids_max: 7
            }
        );
        fs::write(run.join("cgroup.procs"), "").unwrap();
        assert!(cg.pids().is_empty());
        // v2 kills through cgroup.kill.
        cg.kill_all();
        assert_eq!(read(&run.join("cgroup.kill")), "1");
    }
}
