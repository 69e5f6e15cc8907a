//! Cgroups for one sandbox run: memory, CPU and process-count limits, OOM and fork-limit
//! counters, and killing everything inside. cgroup v1 (as on the dev machines: one hierarchy
//! per controller) and v2 (unified) are both handled; which one is detected from
//! `/proc/self/mountinfo`, never assumed. Each run's cgroup is created under the agent's own
//! cgroup of each controller (`.../paddock/<name>`), so a delegated subtree is enough.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::super::Limits;

/// Controllers a run needs.
const V1_CONTROLLERS: &[&str] = &["memory", "cpu", "pids"];

/// The cgroup layout of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Layout {
    /// One hierarchy per controller: controller -> mount point.
    V1(Vec<(String, PathBuf)>),
    /// The unified hierarchy at this mount point.
    V2(PathBuf),
}

/// Reads the layout from `/proc/self/mountinfo`: v1 if memory, cpu and pids controllers are
/// mounted as v1 hierarchies, else v2 if a cgroup2 mount offers memory, cpu and pids.
pub(crate) fn detect() -> Result<Layout, String> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("mountinfo: {e}"))?;
    let mut v1 = Vec::new();
    let mut v2 = None;
    for line in info.lines() {
        // ... mount_point ... - fstype source super_options
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = left.split(' ').nth(4).unwrap_or_default();
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or_default();
        let super_opts = r.nth(1).unwrap_or_default();
        match fstype {
            "cgroup" => {
                for opt in super_opts.split(',') {
                    if V1_CONTROLLERS.contains(&opt) {
                        v1.push((opt.to_string(), PathBuf::from(mount_point)));
                    }
                }
            }
            "cgroup2" => {
                let controllers =
                    std::fs::read_to_string(Path::new(mount_point).join("cgroup.controllers"))
                        .unwrap_or_default();
                let have: Vec<&str> = controllers.split_whitespace().collect();
                if V1_CONTROLLERS.iter().all(|c| have.contains(c)) {
                    v2 = Some(PathBuf::from(mount_point));
                }
            }
            _ => {}
        }
    }
    if V1_CONTROLLERS
        .iter()
        .all(|c| v1.iter().any(|(n, _)| n == c))
    {
        return Ok(Layout::V1(v1));
    }
    v2.map(Layout::V2).ok_or_else(|| {
        "no usable cgroup hierarchy (need memory, cpu and pids, v1 or v2)".to_string()
    })
}

/// This process's cgroup path in a v1 controller hierarchy or in v2 (`""` key).
fn own_path(controller: Option<&str>) -> String {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, list, path) = (
            parts.next(),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or("/"),
        );
        let matches = match controller {
            Some(c) => list.split(',').any(|x| x == c),
            None => list.is_empty(),
        };
        if matches {
            return path.trim_start_matches('/').to_string();
        }
    }
    String::new()
}

/// The cgroup of one run.
#[derive(Debug)]
pub(crate) struct Cgroup {
    layout_v2: bool,
    /// v1: one directory per controller (memory, cpu, pids); v2: one directory.
    dirs: Vec<(String, PathBuf)>,
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("writing {value:?} to {}: {e}", path.display()))
}

impl Cgroup {
    /// Creates the run's cgroup with `limits` applied.
    pub(crate) fn create(layout: &Layout, name: &str, limits: &Limits) -> Result<Cgroup, String> {
        let cg = match layout {
            Layout::V1(mounts) => {
                let mut dirs = Vec::new();
                for (controller, mount) in mounts {
                    let dir = mount
                        .join(own_path(Some(controller)))
                        .join("paddock")
                        .join(name);
                    std::fs::create_dir_all(&dir)
                        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
                    dirs.push((controller.clone(), dir));
                }
                Cgroup {
                    layout_v2: false,
                    dirs,
                }
            }
            Layout::V2(mount) => {
                let parent = mount.join(own_path(None)).join("paddock");
                std::fs::create_dir_all(&parent)
                    .map_err(|e| format!("creating {}: {e}", parent.display()))?;
                // Controllers must be enabled in the parent's subtree to be set on the child.
                let _ = write(&parent.join("cgroup.subtree_control"), "+memory +cpu +pids");
                let dir = parent.join(name);
                std::fs::create_dir_all(&dir)
                    .map_err(|e| format!("creating {}: {e}", dir.display()))?;
                Cgroup {
                    layout_v2: true,
                    dirs: vec![("unified".into(), dir)],
                }
            }
        };
        if let Err(e) = cg.apply(limits) {
            cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    fn dir(&self, controller: &str) -> Option<&Path> {
        if self.layout_v2 {
            return self.dirs.first().map(|(_, d)| d.as_path());
        }
        self.dirs
            .iter()
            .find(|(c, _)| c == controller)
            .map(|(_, d)| d.as_path())
    }

    fn apply(&self, l: &Limits) -> Result<(), String> {
        let quota = u64::from(l.cpu_millis) * 100; // period 100 ms
        if self.layout_v2 {
            let d = self.dir("").ok_or("no cgroup directory")?;
            write(&d.join("memory.max"), &l.memory_bytes.to_string())?;
            let _ = write(&d.join("memory.swap.max"), "0");
            write(&d.join("cpu.max"), &format!("{quota} 100000"))?;
            write(&d.join("pids.max"), &l.pids.to_string())?;
            return Ok(());
        }
        let mem = self.dir("memory").ok_or("no memory cgroup")?;
        write(
            &mem.join("memory.limit_in_bytes"),
            &l.memory_bytes.to_string(),
        )?;
        // With swap accounting, memory+swap gets the same limit: no swap beyond it.
        let memsw = mem.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            write(&memsw, &l.memory_bytes.to_string())?;
        }
        let _ = write(&mem.join("memory.swappiness"), "0");
        let cpu = self.dir("cpu").ok_or("no cpu cgroup")?;
        write(&cpu.join("cpu.cfs_period_us"), "100000")?;
        write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
        let pids = self.dir("pids").ok_or("no pids cgroup")?;
        write(&pids.join("pids.max"), &l.pids.to_string())?;
        Ok(())
    }

    /// The `cgroup.procs` files a process writes its pid to, to join.
    pub(crate) fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|(_, d)| d.join("cgroup.procs"))
            .collect()
    }

    fn read_counter(&self, controller: &str, file: &str, key: &str) -> u64 {
        let Some(dir) = self.dir(controller) else {
            return 0;
        };
        std::fs::read_to_string(dir.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok()).flatten()
            })
            .unwrap_or(0)
    }

    /// Processes killed by the OOM killer in this cgroup.
    pub(crate) fn oom_kills(&self) -> u64 {
        if self.layout_v2 {
            self.read_counter("", "memory.events", "oom_kill")
        } else {
            self.read_counter("memory", "memory.oom_control", "oom_kill")
        }
    }

    /// Forks refused because of `pids.max`.
    pub(crate) fn pids_limit_hits(&self) -> u64 {
        self.read_counter("pids", "pids.events", "max")
    }

    /// Pids still in the cgroup.
    pub(crate) fn pids(&self) -> Vec<i32> {
        let dir = if self.layout_v2 {
            self.dir("")
        } else {
            self.dir("pids")
        };
        let Some(dir) = dir else { return Vec::new() };
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// SIGKILLs everything in the cgroup until it is empty (bounded to about a second).
    pub(crate) fn kill_all(&self) {
        if self.layout_v2
            && let Some(d) = self.dir("")
            && write(&d.join("cgroup.kill"), "1").is_ok()
        {
            return;
        }
        for _ in 0..100 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Removes the cgroup directories (retrying briefly while the last processes exit).
    pub(crate) fn remove(&self) {
        for (_, dir) in &self.dirs {
            for _ in 0..50 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_this_hosts_layout() {
        // The dev and CI machines have cgroup v1 controllers; elsewhere v2 is fine too.
        match detect() {
            Ok(Layout::V1(m)) => assert!(m.iter().any(|(c, _)| c == "memory")),
            Ok(Layout::V2(p)) => assert!(p.join("cgroup.controllers").exists()),
            Err(e) => eprintln!("no cgroups here: {e}"),
        }
    }

    #[test]
    fn creates_limits_and_removes() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: needs root");
            return;
        }
        let Ok(layout) = detect() else { return };
        let limits = Limits {
            memory_bytes: 64 << 20,
            cpu_millis: 500,
            pids: 32,
        };
        let cg = Cgroup::create(&layout, "unit-test-cg", &limits).unwrap();
        match &layout {
            Layout::V1(_) => {
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
            Layout::V2(_) => {
                let d = cg.dir("").unwrap();
                assert_eq!(
                    std::fs::read_to_string(d.join("pids.max")).unwrap().trim(),
                    "32"
                );
            }
        }
        assert_eq!(cg.oom_kills(), 0);
        assert!(cg.pids().is_empty());
        cg.remove();
        assert!(cg.dirs.iter().all(|(_, d)| !d.exists()));
    }
}
