//! A small pool of dedicated threads for password hashing.
//!
//! argon2id with the default parameters takes ~19 MiB and tens of
//! milliseconds of CPU per hash. On tokio's blocking pool every concurrent
//! sign-in got its own thread, each with its own malloc arena that kept its
//! 19 MiB after the call (600 MB after 41 sign-ups, 1.9 GB under 32
//! concurrent sign-ins), and the CPU was oversubscribed for everyone. Here
//! at most `threads` hashes run at once (one per core by default), at most
//! `queue` wait, and beyond that a caller is told at once that the service
//! is busy (RESOURCE_EXHAUSTED) instead of queueing without bound.

use std::sync::{Arc, Mutex, mpsc};

type Job = Box<dyn FnOnce() + Send>;

/// Too many hashes running and waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many sign-ins in progress; retry shortly")]
pub struct Busy;

/// Runs CPU-heavy closures on a fixed set of threads.
#[derive(Debug, Clone)]
pub struct HashPool {
    jobs: mpsc::SyncSender<Job>,
}

impl HashPool {
    /// `threads` workers (at least 1), `queue` jobs waiting at most.
    #[must_use]
    pub fn new(threads: usize, queue: usize) -> Self {
        let (jobs, receiver) = mpsc::sync_channel::<Job>(queue);
        let receiver = Arc::new(Mutex::new(receiver));
        for i in 0..threads.max(1) {
            let receiver = Arc::clone(&receiver);
            let spawned = std::thread::Builder::new()
                .name(format!("password-hash-{i}"))
                .spawn(move || {
                    loop {
                        let job = match receiver.lock() {
                            Ok(receiver) => receiver.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
            if let Err(error) = spawned {
                tracing::error!(%error, "cannot start a password hashing thread");
            }
        }
        Self { jobs }
    }

    /// One thread per core, eight jobs waiting per thread.
    #[must_use]
    pub fn per_core() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        Self::new(cores, cores * 8)
    }

    /// Runs `f` on the pool.
    ///
    /// # Errors
    ///
    /// [`Busy`] when the queue is full (or the pool has stopped).
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Busy> {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = sender.send(f());
        });
        self.jobs.try_send(job).map_err(|_| Busy)?;
        receiver.await.map_err(|_| Busy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_and_return_their_result() {
        let pool = HashPool::new(2, 4);
        assert_eq!(pool.run(|| 6 * 7).await, Ok(42));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_is_refused_at_once() {
        let pool = HashPool::new(1, 1);
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let busy = tokio::spawn({
            let pool = pool.clone();
            async move {
                pool.run(move || {
                    let _ = started_tx.send(());
                    let _ = hold.recv();
                })
                .await
            }
        });
        tokio::task::spawn_blocking(move || started.recv())
            .await
            .expect("join")
            .expect("the first job starts");
        // The worker is busy; the first probe takes the one queue slot.
        let mut refused = false;
        for _ in 0..100 {
            // Accepted probes wait behind the held worker: do not await them.
            let probe =
                tokio::time::timeout(std::time::Duration::from_millis(10), pool.run(|| ())).await;
            if probe == Ok(Err(Busy)) {
                refused = true;
                break;
            }
        }
        let _ = release.send(());
        assert!(
            refused,
            "a third job beyond one running and one queued is refused"
        );
        assert!(busy.await.expect("join").is_ok());
        // The abandoned probe still queued runs first; then there is room.
        let mut served = Err(Busy);
        for _ in 0..100 {
            served = pool.run(|| 1).await;
            if served.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(served, Ok(1), "the pool serves again once free");
    }
}
