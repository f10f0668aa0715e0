//! Outbound translations on a few threads of their own, in the order they were asked for.
//!
//! Why not tokio's blocking pool behind a semaphore (what this replaced): a translation then only
//! started once the task asking for it was polled again after a permit freed up, and during a push
//! the runtime's queue is full of connection tasks writing the views already translated. With a
//! thousand sidecars over four keys, the last key's translation started half a second after the
//! push began, and its 250 streams finished last. Here a translation is queued the moment it is
//! asked for (the debouncer asks for every registered workload's key before it publishes a
//! context), and the threads work through the queue whatever the runtime is busy with.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared};
use weft_pilot_config::translate::MeshOptions;

/// One piece of work for the translation threads.
type Job = Box<dyn FnOnce() + Send>;

/// A result being computed by the translation threads, awaitable by any number of tasks.
pub(crate) type Pending<T> = Shared<BoxFuture<'static, Result<T, String>>>;

/// The translation threads and the mesh settings every translation uses. Cloning shares them; the
/// threads end once every clone is dropped and the queue is empty.
#[derive(Clone, Debug)]
pub struct Translator {
    mesh: Arc<MeshOptions>,
    jobs: mpsc::Sender<Job>,
}

impl Translator {
    /// Starts `threads` translation threads (at least one) for a mesh with these settings.
    pub fn new(mesh: MeshOptions, threads: usize) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for n in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("pilot-translate-{n}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = match queue.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                            Ok(job) => job,
                            Err(mpsc::RecvError) => return,
                        };
                        // A panicking translation fails its own result (its sender is dropped),
                        // not the thread.
                        if std::panic::catch_unwind(AssertUnwindSafe(job)).is_err() {
                            tracing::error!("a translation panicked");
                        }
                    }
                })?;
        }
        Ok(Self {
            mesh: Arc::new(mesh),
            jobs,
        })
    }

    pub(super) fn mesh(&self) -> &Arc<MeshOptions> {
        &self.mesh
    }

    /// Queues `work` (run on a translation thread; `None` = nothing to do any more) and returns its
    /// result to await.
    pub(super) fn run<T>(&self, work: impl FnOnce() -> Option<T> + Send + 'static) -> Pending<T>
    where
        T: Clone + Send + Sync + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            if let Some(result) = work() {
                let _ = tx.send(result);
            }
        });
        let queued = self.jobs.send(job).is_ok();
        async move {
            if !queued {
                return Err("translation threads have stopped".to_string());
            }
            rx.await
                .map_err(|_| "translation failed or was abandoned".to_string())
        }
        .boxed()
        .shared()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn work_runs_in_order_and_failures_stay_local() {
        let t = Translator::new(MeshOptions::default(), 1).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let record = |n: u32| {
            let order = order.clone();
            move || {
                order.lock().unwrap().push(n);
                Some(n)
            }
        };
        let a = t.run(record(1));
        let b = t.run(record(2));
        let panics = t.run(|| -> Option<u32> { panic!("boom") });
        let nothing = t.run(|| -> Option<u32> { None });
        let c = t.run(record(3));
        assert_eq!(b.clone().await.unwrap(), 2);
        assert_eq!(b.await.unwrap(), 2, "awaitable more than once");
        assert_eq!(a.await.unwrap(), 1);
        assert!(panics.await.is_err());
        assert!(nothing.await.is_err());
        assert_eq!(c.await.unwrap(), 3, "the thread survived the panic");
        assert_eq!(*order.lock().unwrap(), [1, 2, 3]);
    }
}
