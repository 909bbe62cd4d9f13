//! The denial-burst detector: `count` denied kernel decisions of one sandbox within
//! `seconds` raise one `denial-burst` alert; the denials that follow in the same window
//! raise nothing more.
//!
//! Times are the kernel's (`bpf_ktime_get_ns`, CLOCK_MONOTONIC), so the window is exact
//! however late the daemon reads the ring buffer. The detector keeps the times of the last
//! `count` denials per sandbox: the burst is there when the oldest of them is less than
//! `seconds` older than the newest. The window it opens starts at that oldest denial and
//! lasts `seconds`; afterwards counting starts afresh.
use std::collections::{HashMap, VecDeque};

/// `alerts.denial_burst` of a policy or the daemon's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BurstConfig {
    /// Denials that make a burst (at least 1, at most [`BurstConfig::MAX_COUNT`]).
    pub count: u32,
    /// Length of the window, in seconds (1 to [`BurstConfig::MAX_SECONDS`]).
    pub seconds: u32,
}

impl BurstConfig {
    pub const DEFAULT: Self = Self {
        count: 50,
        seconds: 10,
    };
    pub const MAX_COUNT: u32 = 100_000;
    pub const MAX_SECONDS: u32 = 3_600;

    fn window_ns(self) -> u64 {
        u64::from(self.seconds) * 1_000_000_000
    }
}

impl Default for BurstConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A burst found: raise one alert with these figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Burst {
    /// Denials in the window so far (= the configured count when it is raised).
    pub count: u64,
    /// Nanoseconds from the first to the last of them.
    pub span_ns: u64,
    pub config: BurstConfig,
}

/// One sandbox's recent denials.
#[derive(Debug, Default)]
struct Window {
    /// Times of the most recent denials, oldest first; at most `count` of them.
    recent: VecDeque<u64>,
    /// Set while an alerted window is open: (its start, denials counted in it).
    alerted: Option<(u64, u64)>,
    config: Option<BurstConfig>,
}

/// Per-sandbox burst windows, keyed by sandbox index.
#[derive(Debug, Default)]
pub struct DenialBursts {
    windows: HashMap<u32, Window>,
}

impl DenialBursts {
    /// Counts one denial of sandbox `index` at kernel time `ts_ns`. Returns the burst
    /// when this denial completes one: at most once per window.
    pub fn observe(&mut self, index: u32, ts_ns: u64, config: BurstConfig) -> Option<Burst> {
        let w = self.windows.entry(index).or_default();
        if w.config != Some(config) {
            // A policy change with other figures starts afresh.
            *w = Window {
                config: Some(config),
                ..Window::default()
            };
        }
        let window_ns = config.window_ns();
        if let Some((start, seen)) = w.alerted {
            if ts_ns.saturating_sub(start) < window_ns {
                w.alerted = Some((start, seen + 1));
                return None;
            }
            w.alerted = None;
            w.recent.clear();
        }
        // Events from several CPUs may arrive slightly out of order: keep them sorted.
        let at = w.recent.partition_point(|t| *t <= ts_ns);
        w.recent.insert(at, ts_ns);
        while w.recent.len() > config.count as usize {
            w.recent.pop_front();
        }
        let (Some(&first), Some(&last)) = (w.recent.front(), w.recent.back()) else {
            return None;
        };
        if w.recent.len() < config.count as usize || last - first >= window_ns {
            return None;
        }
        let count = w.recent.len() as u64;
        w.alerted = Some((first, count));
        w.recent.clear();
        Some(Burst {
            count,
            span_ns: last - first,
            config,
        })
    }

    /// Forgets a sandbox (detached).
    pub fn forget(&mut self, index: u32) {
        self.windows.remove(&index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn cfg(count: u32, seconds: u32) -> BurstConfig {
        BurstConfig { count, seconds }
    }

    #[test]
    fn count_denials_within_the_window_raise_once() {
        let mut d = DenialBursts::default();
        let c = cfg(5, 10);
        for i in 0..4 {
            assert_eq!(d.observe(1, 100 * S + i * S, c), None);
        }
        let b = d.observe(1, 104 * S, c).unwrap_or_else(|| unreachable!());
        assert_eq!(b.count, 5);
        assert_eq!(b.span_ns, 4 * S);
        // The rest of the window (until 110 s) raises nothing, however many.
        for i in 0..100 {
            assert_eq!(d.observe(1, 104 * S + i * (S / 20), c), None);
        }
        assert_eq!(d.observe(1, 109 * S + S / 2, c), None);
        // After the window, a new burst needs `count` fresh denials.
        for i in 0..4 {
            assert_eq!(d.observe(1, 110 * S + i, c), None);
        }
        assert!(d.observe(1, 110 * S + 4, c).is_some());
    }

    #[test]
    fn slow_denials_never_make_a_burst() {
        let mut d = DenialBursts::default();
        let c = cfg(3, 10);
        // One every 5 s: any three span 10 s, which is not within 10 s.
        for i in 0..20 {
            assert_eq!(d.observe(1, i * 5 * S, c), None);
        }
    }

    #[test]
    fn edge_of_the_window_is_exclusive() {
        let c = cfg(3, 10);
        let mut d = DenialBursts::default();
        assert!(d.observe(1, 0, c).is_none());
        assert!(d.observe(1, 5 * S, c).is_none());
        assert!(
            d.observe(1, 10 * S, c).is_none(),
            "0..10 s is not within 10 s"
        );
        let mut d = DenialBursts::default();
        assert!(d.observe(1, 0, c).is_none());
        assert!(d.observe(1, 5 * S, c).is_none());
        assert!(d.observe(1, 10 * S - 1, c).is_some());
    }

    #[test]
    fn a_burst_straddling_fixed_boundaries_is_found() {
        // Four late in one 10 s stretch and four early in the next: 8 within 2 s.
        let mut d = DenialBursts::default();
        let c = cfg(8, 10);
        let mut raised = 0;
        for t in [9.0, 9.2, 9.5, 9.9, 10.1, 10.3, 10.6, 10.9] {
            raised += usize::from(d.observe(1, (t * 1e9) as u64, c).is_some());
        }
        assert_eq!(raised, 1);
    }

    #[test]
    fn sandboxes_are_counted_apart_and_out_of_order_events_are_sorted() {
        let mut d = DenialBursts::default();
        let c = cfg(3, 1);
        assert!(d.observe(1, 10 * S, c).is_none());
        assert!(d.observe(2, 10 * S, c).is_none());
        assert!(d.observe(2, 10 * S + 1, c).is_none());
        // Sandbox 1 has one denial; sandbox 2 completes its own three.
        assert!(d.observe(2, 10 * S + 2, c).is_some());
        // An event older than the newest one (another CPU) still counts by its time.
        assert!(d.observe(1, 10 * S + 500, c).is_none());
        let b = d
            .observe(1, 10 * S - 200, c)
            .unwrap_or_else(|| unreachable!());
        assert_eq!(b.span_ns, 700);
    }

    #[test]
    fn count_of_one_and_a_changed_config() {
        let mut d = DenialBursts::default();
        assert!(d.observe(1, 0, cfg(1, 5)).is_some());
        assert!(d.observe(1, S, cfg(1, 5)).is_none());
        // New figures (a policy replacement) start afresh.
        assert!(d.observe(1, 2 * S, cfg(1, 6)).is_some());
        d.forget(1);
        assert!(d.observe(1, 3 * S, cfg(2, 6)).is_none());
    }
}
