//! The threads that serve proxied connections: each runs a single-threaded tokio runtime
//! of its own, and there are as many as the host has cores. Each accepts on every proxy
//! listener and serves what it accepted, with everything that starts: its TLS sessions, the request
//! handler, the upstream connections it opens (pooled per thread) and their tasks. The
//! steps of one request then wake tasks on the same thread, where a runtime shared by
//! all threads moves them between cores and pays a cross-core wake-up for each (about a
//! fifth of the proxy's CPU per keep-alive request: BENCHMARKS.md).
//!
//! Everything else (the kernel events, DNS, the audit writer, the control socket) stays
//! on the daemon's main runtime.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;

thread_local! {
    /// This thread's number among the workers, from 1; 0 on any other thread.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Workers started in this process.
static STARTED: AtomicUsize = AtomicUsize::new(0);

/// How many workers run (at least 1): each keeps its own upstream connections, so the
/// pool's bounds scale with it.
pub fn count() -> usize {
    STARTED.load(Ordering::Relaxed).max(1)
}

/// The number of the worker thread the caller runs on (from 1), or 0 off them: what
/// keeps each worker's upstream connections to itself.
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// The proxy's worker threads.
pub struct Workers {
    handles: Vec<Handle>,
}

impl Workers {
    /// Starts `threads` workers (at least one). Each runs until the process ends.
    pub fn start(threads: usize) -> std::io::Result<Self> {
        let mut handles = Vec::new();
        for number in 1..=threads.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(format!("egressd-proxy-{number}"))
                .build()?;
            handles.push(runtime.handle().clone());
            std::thread::Builder::new()
                .name(format!("egressd-proxy-{number}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(number));
                    runtime.block_on(std::future::pending::<()>());
                })?;
        }
        STARTED.fetch_add(handles.len(), Ordering::Relaxed);
        Ok(Self { handles })
    }

    /// Each worker's runtime.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

/// How many proxy workers to start: `EGRESSD_PROXY_THREADS` (1 to 64), by default as many
/// as the host has cores (at most 64).
pub fn configured_threads() -> Result<usize, String> {
    Ok(threads_setting("EGRESSD_PROXY_THREADS")?
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(64))))
}

/// A thread count from environment variable `var`: `None` when unset or empty (a service
/// manager's `VAR=`), an error (naming the variable and what it holds) unless it is 1 to
/// 64.
pub fn threads_setting(var: &str) -> Result<Option<usize>, String> {
    let Some(value) = std::env::var_os(var) else {
        return Ok(None);
    };
    let text = value.to_string_lossy();
    if text.trim().is_empty() {
        return Ok(None);
    }
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=64).contains(&n) => Ok(Some(n)),
        _ => Err(format!(
            "{var}={text:?}: expected a number of threads, 1 to 64"
        )),
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn a_thread_count_out_of_range_is_an_error_not_a_default() {
        assert_eq!(threads_setting("EGRESSD_TEST_THREADS_UNSET"), Ok(None));
        for (value, expected) in [
            ("4", Ok(Some(4))),
            (" 64 ", Ok(Some(64))),
            ("0", Err(())),
            ("65", Err(())),
            ("two", Err(())),
            ("", Ok(None)),
            ("-1", Err(())),
        ] {
            let var = format!("EGRESSD_TEST_THREADS_{}", value.trim().len());
            // SAFETY: a variable of this test's own, set before it is read; nothing else
            // reads or writes it.
            unsafe { std::env::set_var(&var, value) };
            let got = threads_setting(&var);
            unsafe { std::env::remove_var(&var) };
            match expected {
                Ok(n) => assert_eq!(got, Ok(n), "{value:?}"),
                Err(()) => {
                    let err = got.unwrap_err();
                    assert!(
                        err.contains("expected a number of threads, 1 to 64"),
                        "{err}"
                    );
                    assert!(err.starts_with(&var), "{err}");
                }
            }
        }
    }

    /// What runs on a worker knows its number, and what runs elsewhere gets 0.
    #[test]
    fn workers_know_their_number() {
        let workers = Workers::start(2).unwrap();
        assert_eq!(workers.handles().len(), 2);
        let numbers: Vec<usize> = workers
            .handles()
            .iter()
            .map(|worker| {
                let (tx, rx) = std::sync::mpsc::channel();
                worker.spawn(async move { tx.send(current()).unwrap() });
                rx.recv().unwrap()
            })
            .collect();
        assert_eq!(numbers, [1, 2]);
        assert_eq!(current(), 0);
    }
}
