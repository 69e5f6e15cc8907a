//! The seccomp part of the [`policy`](super::super::policy) for container runtimes, walked
//! once ([`rules`]) and written in the two forms that use it: the OCI spec's
//! `linux.seccomp` ([`linux_seccomp`], for crun and runc) and Docker's seccomp profile
//! ([`docker_profile`], passed as `--security-opt seccomp=<json>`), which is the same JSON.
//!
//! Allow by default; [`DENIED_SYSCALLS`] fail with `EPERM`, `clone3` with `ENOSYS` (so C
//! libraries fall back to `clone`), and a `clone` with any of [`CLONE_NAMESPACE_FLAGS`] with
//! `EPERM`. `SCMP_CMP_MASKED_EQ` matches when `(arg & value) == valueTwo`: with both set to
//! the flag, when the flag is set. Architectures: the native one and its compat ABIs, as in
//! Docker's own profile, so 32-bit system calls are filtered the same way.

use oci_spec::OciSpecError;
use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder,
    LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};

use super::super::policy::{CLONE_NAMESPACE_FLAGS, DENIED_SYSCALLS};

/// `EPERM`, for denied system calls.
const ERRNO_EPERM: u32 = 1;
/// `ENOSYS`, for `clone3` (so C libraries fall back to `clone`, whose flags can be checked).
const ERRNO_ENOSYS: u32 = 38;

/// One rule: the system calls `names` fail with `errno`; with `flag`, only when their first
/// argument has that flag set.
struct ErrnoRule {
    names: &'static [&'static str],
    errno: u32,
    flag: Option<u64>,
}

/// The rules of the policy, in order.
fn rules() -> impl Iterator<Item = ErrnoRule> {
    [
        ErrnoRule {
            names: DENIED_SYSCALLS,
            errno: ERRNO_EPERM,
            flag: None,
        },
        ErrnoRule {
            names: &["clone3"],
            errno: ERRNO_ENOSYS,
            flag: None,
        },
    ]
    .into_iter()
    .chain(CLONE_NAMESPACE_FLAGS.iter().map(|&flag| ErrnoRule {
        names: &["clone"],
        errno: ERRNO_EPERM,
        flag: Some(flag),
    }))
}

/// The native architecture and its compat ABIs.
fn architectures() -> Option<Vec<Arch>> {
    if cfg!(target_arch = "x86_64") {
        Some(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ])
    } else if cfg!(target_arch = "aarch64") {
        Some(vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm])
    } else {
        None
    }
}

impl ErrnoRule {
    fn to_oci(&self) -> Result<LinuxSyscall, OciSpecError> {
        let mut builder = LinuxSyscallBuilder::default()
            .names(
                self.names
                    .iter()
                    .map(|n| (*n).to_string())
                    .collect::<Vec<_>>(),
            )
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(self.errno);
        if let Some(flag) = self.flag {
            builder = builder.args(vec![
                LinuxSeccompArgBuilder::default()
                    .index(0usize)
                    .value(flag)
                    .value_two(flag)
                    .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
                    .build()?,
            ]);
        }
        builder.build()
    }

    fn to_docker(&self) -> serde_json::Value {
        let mut rule = serde_json::json!({
            "names": self.names,
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": self.errno,
        });
        if let Some(flag) = self.flag {
            rule["args"] = serde_json::json!([{
                "index": 0,
                "value": flag,
                "valueTwo": flag,
                "op": "SCMP_CMP_MASKED_EQ",
            }]);
        }
        rule
    }
}

/// The `linux.seccomp` section of an OCI spec.
pub(super) fn linux_seccomp() -> Result<LinuxSeccomp, OciSpecError> {
    let syscalls = rules()
        .map(|rule| rule.to_oci())
        .collect::<Result<Vec<_>, _>>()?;
    let mut builder = LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .syscalls(syscalls);
    if let Some(arches) = architectures() {
        builder = builder.architectures(arches);
    }
    builder.build()
}

/// The seccomp profile in Docker's JSON format.
pub fn docker_profile() -> serde_json::Value {
    let syscalls: Vec<serde_json::Value> = rules().map(|rule| rule.to_docker()).collect();
    let mut profile = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": syscalls,
    });
    if let Some(arches) = architectures() {
        profile["architectures"] = serde_json::json!(arches);
    }
    profile
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seccomp_profile_implements_the_policy() {
        let p = docker_profile();
        assert_eq!(p["defaultAction"], "SCMP_ACT_ALLOW");
        let rules = p["syscalls"].as_array().unwrap();
        let denied: Vec<&str> = rules[0]["names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        assert_eq!(denied, DENIED_SYSCALLS);
        assert_eq!(rules[0]["action"], "SCMP_ACT_ERRNO");
        assert_eq!(rules[0]["errnoRet"], 1);
        assert_eq!(rules[1]["names"], serde_json::json!(["clone3"]));
        assert_eq!(rules[1]["errnoRet"], 38);
        let clone_rules: Vec<&serde_json::Value> = rules[2..].iter().collect();
        assert_eq!(clone_rules.len(), CLONE_NAMESPACE_FLAGS.len());
        for (rule, flag) in clone_rules.iter().zip(CLONE_NAMESPACE_FLAGS) {
            assert_eq!(rule["names"], serde_json::json!(["clone"]));
            assert_eq!(rule["errnoRet"], 1);
            let arg = &rule["args"][0];
            assert_eq!(arg["index"], 0);
            assert_eq!(arg["value"], *flag);
            assert_eq!(arg["valueTwo"], *flag);
            assert_eq!(arg["op"], "SCMP_CMP_MASKED_EQ");
        }
    }

    #[test]
    fn both_forms_are_the_same_json() {
        let oci = serde_json::to_value(linux_seccomp().unwrap()).unwrap();
        assert_eq!(oci, docker_profile());
    }
}
