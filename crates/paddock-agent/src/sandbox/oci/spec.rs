//! The container's `config.json`: exactly the [`policy`] plus the request (root, mounts,
//! user, capabilities, rlimits, namespaces, cgroup resources, masked paths, and the
//! seccomp section of [`super::seccomp`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oci_spec::OciSpecError;
use oci_spec::runtime::{
    Capabilities, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder,
    LinuxDeviceCgroupBuilder, LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, Mount, MountBuilder, PosixRlimit,
    PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder,
    UserBuilder,
};
use paddock_proto::NetworkMode;

use super::super::Limits;
use super::super::cgroup::CPU_PERIOD_US;
use super::super::policy;
use super::seccomp::linux_seccomp;

/// Masked paths of `runc spec`.
const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
];

/// Read-only paths of `runc spec`.
const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Inputs of [`build_spec`].
pub(super) struct SpecParams<'a> {
    pub(super) argv: &'a [String],
    pub(super) env: &'a BTreeMap<String, String>,
    /// `root.path`.
    pub(super) root: &'a Path,
    /// Host directories bound read-only at the same place (host view only).
    pub(super) host_dirs: &'a [String],
    pub(super) workdir: &'a Path,
    pub(super) network: NetworkMode,
    pub(super) limits: Limits,
    pub(super) cgroups_path: &'a str,
    /// Apply the OCI `swap` (memory + swap) limit.
    pub(super) swap: bool,
}

fn mount(
    destination: &str,
    typ: &str,
    source: &Path,
    options: &[&str],
) -> Result<Mount, OciSpecError> {
    MountBuilder::default()
        .destination(destination)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|o| (*o).to_string()).collect::<Vec<_>>())
        .build()
}

fn rlimit(typ: PosixRlimitType, value: u64) -> Result<PosixRlimit, OciSpecError> {
    PosixRlimitBuilder::default()
        .typ(typ)
        .soft(value)
        .hard(value)
        .build()
}

fn namespace(typ: LinuxNamespaceType) -> Result<LinuxNamespace, OciSpecError> {
    LinuxNamespaceBuilder::default().typ(typ).build()
}

/// The container's `config.json`: exactly the [`policy`] plus the request.
pub(super) fn build_spec(p: &SpecParams<'_>) -> Result<Spec, OciSpecError> {
    let mut mounts = vec![
        mount(
            "/proc",
            "proc",
            Path::new("proc"),
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/dev",
            "tmpfs",
            Path::new("tmpfs"),
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            Path::new("devpts"),
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            Path::new("shm"),
            &["nosuid", "noexec", "nodev", "mode=1777", "size=64m"],
        )?,
    ];
    for dir in p.host_dirs {
        let path = Path::new("/").join(dir);
        mounts.push(mount(
            &format!("/{dir}"),
            "bind",
            &path,
            &["bind", "ro", "nosuid", "nodev"],
        )?);
    }
    mounts.push(mount(
        "/tmp",
        "tmpfs",
        Path::new("tmpfs"),
        &["nosuid", "nodev", "mode=1777"],
    )?);
    mounts.push(mount(
        policy::WORK_DIR,
        "bind",
        p.workdir,
        &["bind", "rw", "nosuid", "nodev"],
    )?);

    let no_caps = LinuxCapabilitiesBuilder::default()
        .bounding(Capabilities::new())
        .effective(Capabilities::new())
        .inheritable(Capabilities::new())
        .permitted(Capabilities::new())
        .ambient(Capabilities::new())
        .build()?;
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(policy::SANDBOX_UID)
                .gid(policy::SANDBOX_GID)
                .build()?,
        )
        .args(p.argv.to_vec())
        .env(
            p.env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
        )
        .cwd(policy::WORK_DIR)
        .no_new_privileges(true)
        .capabilities(no_caps)
        .rlimits(vec![
            rlimit(PosixRlimitType::RlimitNofile, policy::RLIMIT_NOFILE)?,
            rlimit(PosixRlimitType::RlimitCore, 0)?,
        ])
        .build()?;

    let mut namespaces = vec![
        namespace(LinuxNamespaceType::Pid)?,
        namespace(LinuxNamespaceType::Ipc)?,
        namespace(LinuxNamespaceType::Uts)?,
        namespace(LinuxNamespaceType::Mount)?,
    ];
    if p.network == NetworkMode::None {
        namespaces.push(namespace(LinuxNamespaceType::Network)?);
    }

    let mut resources = LinuxResourcesBuilder::default().devices(vec![
        LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()?,
    ]);
    if p.limits.memory_bytes > 0 {
        let bytes = i64::try_from(p.limits.memory_bytes).unwrap_or(i64::MAX);
        let mut memory = LinuxMemoryBuilder::default().limit(bytes);
        if p.swap {
            memory = memory.swap(bytes);
        }
        resources = resources.memory(memory.build()?);
    }
    if p.limits.cpu_millis > 0 {
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(i64::from(p.limits.cpu_millis) * (CPU_PERIOD_US as i64) / 1000)
                .period(CPU_PERIOD_US)
                .build()?,
        );
    }
    if p.limits.pids > 0 {
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(i64::from(p.limits.pids))
                .build()?,
        );
    }

    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources.build()?)
        .cgroups_path(PathBuf::from(p.cgroups_path))
        .masked_paths(
            MASKED_PATHS
                .iter()
                .map(|s| (*s).to_string())
                .collect::<Vec<_>>(),
        )
        .readonly_paths(
            READONLY_PATHS
                .iter()
                .map(|s| (*s).to_string())
                .collect::<Vec<_>>(),
        )
        .seccomp(linux_seccomp()?)
        .build()?;

    SpecBuilder::default()
        .version("1.0.2")
        .root(RootBuilder::default().path(p.root).readonly(true).build()?)
        .mounts(mounts)
        .process(process)
        .hostname(policy::SANDBOX_HOSTNAME)
        .linux(linux)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn spec_json(network: NetworkMode, limits: Limits) -> serde_json::Value {
        let env = BTreeMap::from([("A".to_string(), "1".to_string())]);
        let argv = vec!["/bin/echo".to_string(), "hi".to_string()];
        let spec = build_spec(&SpecParams {
            argv: &argv,
            env: &env,
            root: Path::new("/b/rootfs"),
            host_dirs: &["usr".to_string(), "etc".to_string()],
            workdir: Path::new("/w/run-1"),
            network,
            limits,
            cgroups_path: "paddock-t-1",
            swap: true,
        })
        .unwrap();
        serde_json::to_value(&spec).unwrap()
    }

    #[test]
    fn spec_applies_the_policy() {
        let limits = Limits {
            memory_bytes: 64 * MIB,
            cpu_millis: 500,
            pids: 32,
        };
        let j = spec_json(NetworkMode::None, limits);
        assert_eq!(j["root"]["path"], "/b/rootfs");
        assert_eq!(j["root"]["readonly"], true);
        assert_eq!(j["hostname"], "paddock");
        let p = &j["process"];
        assert_eq!(p["args"], serde_json::json!(["/bin/echo", "hi"]));
        assert_eq!(p["env"], serde_json::json!(["A=1"]));
        assert_eq!(p["cwd"], "/work");
        assert_eq!(p["terminal"], false);
        assert_eq!(p["noNewPrivileges"], true);
        assert_eq!(p["user"]["uid"], 65534);
        assert_eq!(p["user"]["gid"], 65534);
        assert!(p["user"].get("additionalGids").is_none());
        for set in [
            "bounding",
            "effective",
            "inheritable",
            "permitted",
            "ambient",
        ] {
            assert_eq!(p["capabilities"][set], serde_json::json!([]), "{set}");
        }
        assert_eq!(
            p["rlimits"],
            serde_json::json!([
                {"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096},
                {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
            ])
        );
        let mounts: Vec<(String, String)> = j["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["destination"].as_str().unwrap().to_string(),
                    m["options"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|o| o.as_str().unwrap())
                        .collect::<Vec<_>>()
                        .join(","),
                )
            })
            .collect();
        let dests: Vec<&str> = mounts.iter().map(|(d, _)| d.as_str()).collect();
        assert_eq!(
            dests,
            [
                "/proc", "/dev", "/dev/pts", "/dev/shm", "/usr", "/etc", "/tmp", "/work"
            ]
        );
        assert_eq!(mounts[4].1, "bind,ro,nosuid,nodev");
        assert_eq!(j["mounts"][4]["source"], "/usr");
        assert_eq!(j["mounts"][7]["source"], "/w/run-1");
        assert_eq!(mounts[7].1, "bind,rw,nosuid,nodev");
        assert_eq!(mounts[6].1, "nosuid,nodev,mode=1777");

        let l = &j["linux"];
        let ns: Vec<&str> = l["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["pid", "ipc", "uts", "mount", "network"]);
        assert_eq!(l["cgroupsPath"], "paddock-t-1");
        let r = &l["resources"];
        assert_eq!(r["memory"]["limit"], 64 * MIB);
        assert_eq!(r["memory"]["swap"], 64 * MIB);
        assert_eq!(r["cpu"]["quota"], 50_000);
        assert_eq!(r["cpu"]["period"], 100_000);
        assert_eq!(r["pids"]["limit"], 32);
        assert_eq!(
            r["devices"],
            serde_json::json!([{"allow": false, "access": "rwm"}])
        );
        assert_eq!(
            l["maskedPaths"].as_array().unwrap().len(),
            MASKED_PATHS.len()
        );
        assert!(
            l["readonlyPaths"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!("/proc/sys"))
        );

        let s = &l["seccomp"];
        assert_eq!(s["defaultAction"], "SCMP_ACT_ALLOW");
        if cfg!(target_arch = "x86_64") {
            assert_eq!(
                s["architectures"],
                serde_json::json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"])
            );
        }
        let rules = s["syscalls"].as_array().unwrap();
        assert_eq!(rules.len(), 2 + policy::CLONE_NAMESPACE_FLAGS.len());
        assert_eq!(rules[0]["action"], "SCMP_ACT_ERRNO");
        assert_eq!(rules[0]["errnoRet"], 1);
        assert_eq!(
            rules[0]["names"].as_array().unwrap().len(),
            policy::DENIED_SYSCALLS.len()
        );
        assert_eq!(rules[1]["names"], serde_json::json!(["clone3"]));
        assert_eq!(rules[1]["errnoRet"], 38);
        for (rule, flag) in rules[2..].iter().zip(policy::CLONE_NAMESPACE_FLAGS) {
            assert_eq!(rule["names"], serde_json::json!(["clone"]));
            assert_eq!(rule["errnoRet"], 1);
            assert_eq!(
                rule["args"],
                serde_json::json!([
                    {"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}
                ])
            );
        }
    }

    #[test]
    fn default_network_shares_the_host_namespace_and_zero_limits_are_unset() {
        let j = spec_json(
            NetworkMode::Default,
            Limits {
                memory_bytes: 0,
                cpu_millis: 0,
                pids: 0,
            },
        );
        let ns: Vec<&str> = j["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["pid", "ipc", "uts", "mount"]);
        let r = &j["linux"]["resources"];
        assert!(r.get("memory").is_none() && r.get("cpu").is_none() && r.get("pids").is_none());
    }
}
