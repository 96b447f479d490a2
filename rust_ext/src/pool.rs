//! Sized rayon pools, built once per size and reused across calls.

use crate::error::{Error, Result};
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

static POOLS: OnceLock<Mutex<HashMap<usize, Arc<ThreadPool>>>> = OnceLock::new();

/// Run `f` in a pool of `threads` workers (0 = rayon's default: one per core).
pub fn run_in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> Result<T> {
    if threads == 0 {
        return Ok(f());
    }
    let pool = {
        let mut pools = POOLS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match pools.get(&threads) {
            Some(p) => p.clone(),
            None => {
                let p = ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("hw-worker-{i}"))
                    .build()
                    .map_err(|e| {
                        Error::InvalidInput(format!("cannot start {threads} threads: {e}"))
                    })?;
                let p = Arc::new(p);
                pools.insert(threads, p.clone());
                p
            }
        }
    };
    Ok(pool.install(f))
}

/// How often [`run_cancellable`] asks its caller whether to stop.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Run `work` in a pool of `threads` workers on a separate thread while the calling thread
/// calls `should_stop` every [`POLL_INTERVAL`] (the bindings check for Ctrl-C there). When it
/// returns true, the flag handed to `work` is set — workers check it between items and return
/// early — and, once the workers have returned, the result is `Ok(None)`: the run was cancelled.
pub fn run_cancellable<T: Send>(
    threads: usize,
    work: impl FnOnce(&AtomicBool) -> T + Send,
    mut should_stop: impl FnMut() -> bool,
) -> Result<Option<T>> {
    let cancel = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<()>();
        let cancel = &cancel;
        let worker = s.spawn(move || {
            let r = run_in_pool(threads, || work(cancel));
            let _ = tx.send(());
            r
        });
        let mut stopped = false;
        loop {
            match rx.recv_timeout(POLL_INTERVAL) {
                Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if !stopped && should_stop() {
                        stopped = true;
                        cancel.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
        let r = worker
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))?;
        Ok(if stopped { None } else { Some(r) })
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn cancellable_finishes_or_stops_between_items() {
        let r = super::run_cancellable(2, |_| 7, || false).unwrap();
        assert_eq!(r, Some(7));
        let done = AtomicUsize::new(0);
        let r = super::run_cancellable(
            2,
            |cancel| {
                for _ in 0..10_000 {
                    if cancel.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    done.fetch_add(1, Ordering::Relaxed);
                }
            },
            || true,
        )
        .unwrap();
        assert_eq!(r, None);
        assert!(done.load(Ordering::Relaxed) < 10_000);
    }

    #[test]
    fn sized_pool_runs() {
        let n = super::run_in_pool(2, rayon::current_num_threads).unwrap();
        assert_eq!(n, 2);
        assert_eq!(super::run_in_pool(0, || 5).unwrap(), 5);
    }
}
