//! Sized rayon pools, built once per size and reused across calls.

use crate::error::{Error, Result};
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

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

#[cfg(test)]
mod tests {
    #[test]
    fn sized_pool_runs() {
        let n = super::run_in_pool(2, rayon::current_num_threads).unwrap();
        assert_eq!(n, 2);
        assert_eq!(super::run_in_pool(0, || 5).unwrap(), 5);
    }
}
