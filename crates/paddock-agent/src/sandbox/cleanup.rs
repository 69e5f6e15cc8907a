//! Clean-up after a run, off the result's critical path.
//!
//! Removing what a run created (the runtime's container, cgroups, bundles, status files) is
//! not needed to report its outcome, and on some file systems it is the slowest part of a
//! run (ext4 mounted with `discard`: several milliseconds per removed directory). Backends
//! therefore hand these jobs to [`Cleanups`], which runs them on the blocking pool (or a
//! thread, outside a runtime) and counts them until they are done. [`Cleanups::settle`]
//! waits until none is pending: tests call it (through [`super::Sandbox::settle`]) before
//! checking that nothing is left, and the agent before it exits.
//!
//! Only removal is deferred: everything a run's outcome depends on (its exit status, the
//! cgroup counters, the runtime's log) is read before the job is handed over, and no process
//! of the run is alive by then.

use std::sync::Arc;

use tokio::sync::watch;

/// Pending clean-up jobs of one backend.
#[derive(Debug, Clone)]
pub(crate) struct Cleanups {
    /// The number of pending jobs.
    pending: Arc<watch::Sender<usize>>,
}

impl Default for Cleanups {
    fn default() -> Self {
        Cleanups {
            pending: Arc::new(watch::Sender::new(0)),
        }
    }
}

/// Counts one pending job until dropped (also when the job panics).
struct Pending(Arc<watch::Sender<usize>>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Cleanups {
    /// Runs the blocking `job` in the background: on the blocking pool of the current
    /// runtime, or on a new thread when there is none (a `Drop` outside a runtime).
    pub(crate) fn spawn(&self, name: &'static str, job: impl FnOnce() + Send + 'static) {
        self.pending.send_modify(|n| *n += 1);
        let pending = Pending(self.pending.clone());
        let task = move || {
            let _pending = pending;
            job();
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(task);
            }
            Err(_) => {
                let spawned = std::thread::Builder::new()
                    .name(format!("paddock-{name}-cleanup"))
                    .spawn(task);
                if let Err(err) = spawned {
                    // The job went with the closure (and is no longer pending).
                    tracing::warn!(error = %err, "sandbox: cannot start a clean-up thread");
                }
            }
        }
    }

    /// How many jobs are pending.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        *self.pending.borrow()
    }

    /// Waits until no job is pending (jobs handed over meanwhile included).
    pub(crate) async fn settle(&self) {
        let mut rx = self.pending.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn settle_waits_for_every_job() {
        let cleanups = Cleanups::default();
        cleanups.settle().await;
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        cleanups.spawn("test", move || {
            std::thread::sleep(Duration::from_millis(50));
            flag.store(true, Ordering::SeqCst);
        });
        assert_eq!(cleanups.pending(), 1);
        cleanups.settle().await;
        assert!(done.load(Ordering::SeqCst));
        assert_eq!(cleanups.pending(), 0);
    }

    #[tokio::test]
    async fn a_panicking_job_is_not_pending_forever() {
        let cleanups = Cleanups::default();
        cleanups.spawn("test", || panic!("boom"));
        tokio::time::timeout(Duration::from_secs(5), cleanups.settle())
            .await
            .unwrap();
    }

    #[test]
    fn outside_a_runtime_a_thread_runs_the_job() {
        let cleanups = Cleanups::default();
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        cleanups.spawn("test", move || flag.store(true, Ordering::SeqCst));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(cleanups.settle());
        assert!(done.load(Ordering::SeqCst));
    }
}
