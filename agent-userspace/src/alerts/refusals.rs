//! Refusals a sandbox gets recorded one by one, up to a limit per window; the rest of the
//! window are counted in one `rate-limit` alert when it ends. With a limit of 0 it counts
//! every one (what a resolver at its limit drops unanswered).
//!
//! A refusal costs the sandbox a few bytes (an HTTP/2 stream naming a refused path, one
//! byte on a connection) and the trail a whole line. Without a limit one sandbox could
//! flood the trail: fill the disk, push other sandboxes' records out of the writer's
//! queue, and, while the trail is unhealthy, have every sandbox's credentials refused.
//! Nothing is lost silently: every refusal past the limit is in the alert's count, raised
//! early when the counts are dropped (the daemon stopping, a resolver closing).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use time::OffsetDateTime;

use crate::audit::{Alert, AlertKind};

/// Where the window's alert goes.
pub type RaiseFn = Arc<dyn Fn(Alert) + Send + Sync>;

/// The alert's reason for a count.
pub type DescribeFn = Arc<dyn Fn(u64) -> String + Send + Sync>;

/// Sandboxes whose windows are remembered at most; older idle ones are forgotten first.
const MAX_SANDBOXES: usize = 4096;

/// Per-sandbox windows of recorded refusals.
pub struct RefusalRecords {
    /// Refusals recorded one by one per window and sandbox.
    limit: u32,
    window: Duration,
    describe: DescribeFn,
    raise: RaiseFn,
    windows: Arc<Mutex<HashMap<String, Window>>>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    recorded: u32,
    /// Refusals past the limit, not yet in an alert.
    counted: u64,
    /// An alert is due at the window's end (its timer runs)...
    alert_due: bool,
    /// ...and this ends that timer, when the alert is raised early ([`RefusalRecords::flush`]).
    timer: Option<tokio::task::AbortHandle>,
}

impl RefusalRecords {
    /// Refusals past `limit` per `window`, `what` they are ("proxy refusals") in the
    /// alert's reason.
    pub fn new(limit: u32, window: Duration, what: &'static str, raise: RaiseFn) -> Self {
        let seconds = window.as_secs().max(1);
        Self::described(
            limit,
            window,
            Arc::new(move |counted| {
                format!(
                    "{counted} {what} counted here only (over {limit} in {seconds} s are not \
                     recorded one by one)"
                )
            }),
            raise,
        )
    }

    /// As [`RefusalRecords::new`], with the alert's reason made by `describe`.
    pub fn described(limit: u32, window: Duration, describe: DescribeFn, raise: RaiseFn) -> Self {
        Self {
            limit,
            window,
            describe,
            raise,
            windows: Arc::default(),
        }
    }

    /// Counts one refusal of `sandbox` that gets no record of its own (with a limit of 0,
    /// every one).
    pub fn count(&self, sandbox: &str) {
        let _ = self.admit(sandbox);
    }

    /// Whether this refusal of `sandbox` gets its own record; if not, it is counted, and
    /// the window's alert is raised when it ends. Must run inside a tokio runtime.
    pub fn admit(&self, sandbox: &str) -> bool {
        self.admit_n(sandbox, 1)
    }

    /// [`RefusalRecords::admit`] for `n` refusals reported together: one record says
    /// them all, or all `n` are counted.
    pub fn admit_n(&self, sandbox: &str, n: u64) -> bool {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if windows.len() >= MAX_SANDBOXES && !windows.contains_key(sandbox) {
            let window = self.window;
            windows.retain(|_, w| w.alert_due || now.duration_since(w.started) < window);
        }
        // The name is copied only for a sandbox's first refusal.
        if !windows.contains_key(sandbox) {
            windows.insert(
                sandbox.to_owned(),
                Window {
                    started: now,
                    recorded: 0,
                    counted: 0,
                    alert_due: false,
                    timer: None,
                },
            );
        }
        let Some(w) = windows.get_mut(sandbox) else {
            return true;
        };
        if !w.alert_due && now.duration_since(w.started) >= self.window {
            w.started = now;
            w.recorded = 0;
        }
        if w.recorded < self.limit {
            w.recorded += 1;
            return true;
        }
        w.counted += n;
        if !w.alert_due {
            w.alert_due = true;
            let ends = w.started + self.window;
            let (windows, raise, describe, sandbox) = (
                self.windows.clone(),
                self.raise.clone(),
                self.describe.clone(),
                sandbox.to_owned(),
            );
            let seconds = self.window.as_secs().max(1);
            let timer = tokio::spawn(async move {
                tokio::time::sleep_until(ends.into()).await;
                let counted = {
                    let mut windows = windows.lock().unwrap_or_else(|p| p.into_inner());
                    let Some(w) = windows.get_mut(&sandbox) else {
                        return;
                    };
                    let counted = std::mem::take(&mut w.counted);
                    w.alert_due = false;
                    w.timer = None;
                    w.started = Instant::now();
                    w.recorded = 0;
                    counted
                };
                // (Nothing awaited from here: an abort cannot cut the alert off.) A flush
                // may have raised the count already.
                if counted > 0 {
                    raise(count_alert(&describe, sandbox, counted, seconds));
                }
            });
            w.timer = Some(timer.abort_handle());
        }
        false
    }

    /// Raises now the alerts of windows not over yet, and ends their timers: their
    /// counts would otherwise go with the timers when the daemon stops (each timer also
    /// holds the audit writer open).
    pub fn flush(&self) {
        let due: Vec<(String, u64)> = {
            let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
            windows
                .iter_mut()
                .filter_map(|(sandbox, w)| {
                    if let Some(timer) = w.timer.take() {
                        timer.abort();
                    }
                    w.alert_due = false;
                    let counted = std::mem::take(&mut w.counted);
                    (counted > 0).then(|| (sandbox.clone(), counted))
                })
                .collect()
        };
        let seconds = self.window.as_secs().max(1);
        for (sandbox, counted) in due {
            (self.raise)(count_alert(&self.describe, sandbox, counted, seconds));
        }
    }
}

impl Drop for RefusalRecords {
    /// Counts not raised yet are raised as the records go (a resolver closing).
    fn drop(&mut self) {
        self.flush();
    }
}

/// The `rate-limit` alert for `counted` refusals of `sandbox` in a window of `seconds`.
fn count_alert(describe: &DescribeFn, sandbox: String, counted: u64, seconds: u64) -> Alert {
    let mut alert = Alert::new(
        OffsetDateTime::now_utc(),
        AlertKind::RateLimit,
        sandbox,
        describe(counted),
    );
    alert.count = counted;
    alert.window_seconds = Some(seconds);
    alert
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    /// Records of proxy refusals, `limit` per 300 ms window, and the alerts they raise.
    fn collecting(limit: u32) -> (RefusalRecords, Arc<Mutex<Vec<Alert>>>) {
        let alerts: Arc<Mutex<Vec<Alert>>> = Arc::default();
        let seen = alerts.clone();
        let records = RefusalRecords::new(
            limit,
            Duration::from_millis(300),
            "proxy refusals",
            Arc::new(move |a| seen.lock().unwrap().push(a)),
        );
        (records, alerts)
    }

    #[tokio::test]
    async fn past_the_limit_refusals_are_counted_in_one_alert_per_window() {
        let (records, alerts) = collecting(3);
        let admitted = (0..10).filter(|_| records.admit("agent-1")).count();
        assert_eq!(admitted, 3);
        // Another sandbox has a window of its own.
        assert!(records.admit("agent-2"));
        assert!(alerts.lock().unwrap().is_empty());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let raised = alerts.lock().unwrap().clone();
        assert_eq!(raised.len(), 1, "{raised:?}");
        assert_eq!(raised[0].kind, AlertKind::RateLimit);
        assert_eq!(raised[0].sandbox, "agent-1");
        assert_eq!(raised[0].count, 7);
        assert!(
            raised[0].reason.starts_with("7 proxy refusals"),
            "{raised:?}"
        );
        // A new window records again.
        assert!(records.admit("agent-1"));
        // A window with nothing past the limit raises nothing.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(alerts.lock().unwrap().len(), 1);
    }

    /// Refusals reported together take one record within the limit, and past it are all
    /// counted.
    #[tokio::test]
    async fn refusals_reported_together_count_as_many() {
        let (records, alerts) = collecting(1);
        assert!(records.admit_n("agent-1", 5));
        assert!(!records.admit_n("agent-1", 7));
        assert!(!records.admit("agent-1"));
        records.flush();
        let raised = alerts.lock().unwrap().clone();
        assert_eq!(raised.len(), 1, "{raised:?}");
        assert_eq!(raised[0].count, 8);
    }

    /// Counts of a window not over yet are raised at once when flushed or dropped (the
    /// daemon stopping), and their timers end: nothing is raised twice, nothing lost.
    #[tokio::test]
    async fn counts_are_raised_when_the_records_stop_before_the_window_ends() {
        let (records, alerts) = collecting(2);
        assert_eq!((0..6).filter(|_| records.admit("agent-1")).count(), 2);
        assert_eq!((0..3).filter(|_| records.admit("agent-2")).count(), 2);
        records.flush();
        let mut raised: Vec<(String, u64)> = alerts
            .lock()
            .unwrap()
            .iter()
            .map(|a| (a.sandbox.clone(), a.count))
            .collect();
        raised.sort();
        assert_eq!(
            raised,
            vec![("agent-1".to_owned(), 4), ("agent-2".to_owned(), 1)]
        );
        // Counted after the flush, in the same window, and then dropped: raised as the
        // records go.
        assert!(!records.admit("agent-1"));
        drop(records);
        let last = alerts.lock().unwrap().last().cloned().unwrap();
        assert_eq!((last.sandbox.as_str(), last.count), ("agent-1", 1));
        assert_eq!(alerts.lock().unwrap().len(), 3);
        // Every timer is over: the windows' ends raise nothing more.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(alerts.lock().unwrap().len(), 3);
    }
}
