//! `bundle.run` tasks (seed 001): fetch the bundle into the digest cache (resuming, verified
//! while streaming), unpack it into the run's work directory (hostile archives refused, each
//! with its code), install its dependencies, and build the entrypoint's command.
//!
//! Dependencies are installed by a first run in the task's own sandbox, so install scripts
//! get no more than the task does: node runs `npm ci` with a lockfile (`npm install` with
//! only a `package.json`), python makes a venv and `pip install -r requirements.txt`. A
//! failure there is `BUNDLE_INSTALL_FAILED` with the end of its output.

use std::path::{Path, PathBuf};

use paddock_bundle::{BundleCache, Digest, UnpackLimits};
use paddock_proto::{BundleTask, ErrorCode};

/// Directory inside the work directory that holds the unpacked bundle.
pub const APP_DIR: &str = "app";

/// What the sandbox runs for a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleCommands {
    /// The install step, if the runtime needs one (run with `sh -c`, in `app/`).
    pub install: Option<String>,
    /// The entrypoint's argv.
    pub run: Vec<String>,
}

/// A refusal, with the stable code the task fails with.
pub type Refusal = (ErrorCode, String);

fn code_of(e: &paddock_bundle::BundleError) -> ErrorCode {
    serde_json::from_value(serde_json::Value::String(e.code().into()))
        .unwrap_or(ErrorCode::BundleIo)
}

/// Fetches (or finds in the cache) and unpacks the bundle into `workdir/app`.
///
/// # Errors
/// The bundle's code (`BUNDLE_HASH_MISMATCH`, `BUNDLE_DOWNLOAD_FAILED`, `BUNDLE_PATH_*`...).
pub async fn prepare(
    bundle: &BundleTask,
    workdir: &Path,
    cache_dir: &Path,
    cache_max_bytes: u64,
) -> Result<PathBuf, Refusal> {
    let digest: Digest = bundle
        .sha256
        .parse()
        .map_err(|e| (code_of(&e), format!("{e}")))?;
    let cache =
        BundleCache::new(cache_dir, cache_max_bytes).map_err(|e| (code_of(&e), e.to_string()))?;
    let cached = paddock_bundle::fetch(&bundle.url, &digest, &cache, &mut |_| {})
        .await
        .map_err(|e| (code_of(&e), e.to_string()))?;
    let dest = workdir.join(APP_DIR);
    let file = cached.file;
    let dest2 = dest.clone();
    // The cached file was verified when it entered the cache; unpacking checks it again, so
    // a file altered in the cache is refused too.
    tokio::task::spawn_blocking(move || {
        paddock_bundle::unpack_verified(file, &digest, &dest2, &UnpackLimits::default())
    })
    .await
    .map_err(|e| (ErrorCode::BundleIo, format!("unpack task failed: {e}")))?
    .map_err(|e| (code_of(&e), e.to_string()))?;
    Ok(dest)
}

/// The install step and the entrypoint's argv for a runtime; paths are relative to the
/// work directory (the sandbox's working directory).
pub fn commands(bundle: &BundleTask, app: &Path) -> BundleCommands {
    let entry = format!("{APP_DIR}/{}", bundle.entrypoint);
    let mut run: Vec<String> = match bundle.runtime.as_str() {
        "node" => vec!["node".into(), entry],
        "python" => {
            let py = if app.join("requirements.txt").is_file() {
                format!("{APP_DIR}/.venv/bin/python")
            } else {
                "python3".into()
            };
            vec![py, entry]
        }
        "shell" => vec!["/bin/sh".into(), entry],
        _ => vec![format!("./{entry}")],
    };
    run.extend(bundle.args.iter().cloned());
    let install = match bundle.runtime.as_str() {
        "node" if app.join("package-lock.json").is_file() => {
            Some("cd app && npm ci --no-audit --no-fund --loglevel=error".to_string())
        }
        "node" if app.join("package.json").is_file() => {
            Some("cd app && npm install --no-audit --no-fund --loglevel=error".to_string())
        }
        "python" if app.join("requirements.txt").is_file() => Some(
            "cd app && python3 -m venv .venv && .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt"
                .to_string(),
        ),
        _ => None,
    };
    BundleCommands { install, run }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(runtime: &str) -> BundleTask {
        BundleTask {
            url: "http://127.0.0.1/x".into(),
            sha256: "0".repeat(64),
            size: 1,
            runtime: runtime.into(),
            entrypoint: "main.x".into(),
            args: vec!["--flag".into()],
            ..Default::default()
        }
    }

    #[test]
    fn commands_per_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path();
        let c = commands(&task("node"), app);
        assert_eq!(c.run, vec!["node", "app/main.x", "--flag"]);
        assert_eq!(c.install, None);
        std::fs::write(app.join("package.json"), "{}").unwrap();
        assert!(
            commands(&task("node"), app)
                .install
                .unwrap()
                .contains("npm install")
        );
        std::fs::write(app.join("package-lock.json"), "{}").unwrap();
        assert!(
            commands(&task("node"), app)
                .install
                .unwrap()
                .contains("npm ci")
        );
        assert_eq!(commands(&task("python"), app).run[0], "python3");
        std::fs::write(app.join("requirements.txt"), "").unwrap();
        let py = commands(&task("python"), app);
        assert_eq!(py.run[0], "app/.venv/bin/python");
        assert!(py.install.unwrap().contains("pip install"));
        assert_eq!(
            commands(&task("shell"), app).run[..2],
            ["/bin/sh", "app/main.x"]
        );
        assert_eq!(commands(&task("binary"), app).run[0], "./app/main.x");
    }
}
