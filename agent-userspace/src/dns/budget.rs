//! A sandbox's DNS budget ([`DnsBudget`]): how many queries it may send upstream, and how
//! many distinct names under one allowed wildcard. An allowed wildcard lets a sandbox
//! put data in the labels it invents, one query at a time; the budget caps that channel
//! without touching what package managers do (a few names, asked again and again).
//!
//! Two limits, both judged before a query goes upstream and spent only when it does:
//! - a token bucket of `burst` tokens refilled at `queries_per_second`;
//! - per wildcard pattern, at most `names_per_suffix_per_minute` distinct names in a
//!   window of [`NAME_WINDOW`] that opens with the first name; a name already counted
//!   in the window costs nothing more.
//!
//! Queries over budget are refused. They are summarised for an alert: the first refusal
//! opens an alert window of [`ALERT_WINDOW`]; when it ends, the caller takes the count
//! ([`Budget::take_alert`]) and writes one alert record for the whole window.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    time::{Duration, Instant},
};

use crate::policy::DnsBudget;

/// Window of the distinct-names limit.
pub const NAME_WINDOW: Duration = Duration::from_secs(60);
/// Refusals within this long of the first are summarised in one alert.
pub const ALERT_WINDOW: Duration = Duration::from_secs(10);

/// Why a query is over budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Over {
    /// The token bucket is empty.
    Rate { per_second: u32, burst: u32 },
    /// The wildcard `pattern` has had `limit` distinct names this minute.
    Names { pattern: String, limit: u32 },
}

impl Over {
    /// For the record's `event.reason`.
    pub fn reason(&self) -> String {
        match self {
            Self::Rate { per_second, burst } => format!(
                "DNS budget exceeded: more than {per_second} queries per second (burst \
                 {burst}) sent upstream"
            ),
            Self::Names { pattern, limit } => format!(
                "DNS budget exceeded: more than {limit} distinct names under `{pattern}` \
                 in a minute"
            ),
        }
    }
}

/// What a finished alert window summarises.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertSummary {
    /// Queries refused in the window.
    pub count: u64,
    /// Refused for the rate.
    pub rate: u64,
    /// The wildcard patterns whose name limit refused queries, sorted.
    pub patterns: Vec<String>,
    /// How long the window was.
    pub window: Duration,
}

impl AlertSummary {
    /// For the alert's `event.reason`.
    pub fn reason(&self) -> String {
        let mut parts = Vec::new();
        if self.rate > 0 {
            parts.push(format!("{} over the query rate", self.rate));
        }
        if !self.patterns.is_empty() {
            parts.push(format!(
                "{} over the distinct-name limit of {}",
                self.count - self.rate,
                self.patterns
                    .iter()
                    .map(|p| format!("`{p}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        format!(
            "{} DNS queries refused in {} s for going over the sandbox's DNS budget ({})",
            self.count,
            self.window.as_secs(),
            parts.join("; ")
        )
    }
}

#[derive(Debug)]
struct NameWindow {
    opened: Instant,
    names: HashSet<String>,
}

#[derive(Debug)]
struct AlertWindow {
    opened: Instant,
    count: u64,
    rate: u64,
    patterns: BTreeSet<String>,
}

/// One sandbox's budget state.
#[derive(Debug, Default)]
pub struct Budget {
    /// Tokens left, and when they were last counted; `None` before the first query
    /// (a full bucket).
    tokens: Option<(f64, Instant)>,
    names: HashMap<String, NameWindow>,
    alert: Option<AlertWindow>,
}

impl Budget {
    /// Spends one query to `qname` at `now`, which counts against the wildcard patterns
    /// in `patterns`; or says why it is over budget (nothing spent then).
    pub fn admit(
        &mut self,
        now: Instant,
        limits: &DnsBudget,
        qname: &str,
        patterns: &[String],
    ) -> Result<(), Over> {
        let burst = f64::from(limits.burst);
        let (tokens, last) = self.tokens.unwrap_or((burst, now));
        let refill = now.saturating_duration_since(last).as_secs_f64()
            * f64::from(limits.queries_per_second);
        let tokens = (tokens + refill).min(burst);
        for pattern in patterns {
            let Some(window) = self.names.get_mut(pattern) else {
                continue;
            };
            if now.saturating_duration_since(window.opened) >= NAME_WINDOW {
                window.opened = now;
                window.names.clear();
            }
            let limit = limits.names_per_suffix_per_minute;
            if !window.names.contains(qname) && window.names.len() >= limit as usize {
                self.tokens = Some((tokens, now));
                return Err(Over::Names {
                    pattern: pattern.clone(),
                    limit,
                });
            }
        }
        if tokens < 1.0 {
            self.tokens = Some((tokens, now));
            return Err(Over::Rate {
                per_second: limits.queries_per_second,
                burst: limits.burst,
            });
        }
        self.tokens = Some((tokens - 1.0, now));
        for pattern in patterns {
            let window = self
                .names
                .entry(pattern.clone())
                .or_insert_with(|| NameWindow {
                    opened: now,
                    names: HashSet::new(),
                });
            window.names.insert(qname.to_owned());
        }
        Ok(())
    }

    /// Counts a refusal for the alert; true when it opened a new alert window (the
    /// caller then arranges for [`Budget::take_alert`] after [`ALERT_WINDOW`]).
    pub fn refused(&mut self, now: Instant, over: &Over) -> bool {
        let opened = self.alert.is_none();
        let alert = self.alert.get_or_insert_with(|| AlertWindow {
            opened: now,
            count: 0,
            rate: 0,
            patterns: BTreeSet::new(),
        });
        alert.count += 1;
        match over {
            Over::Rate { .. } => alert.rate += 1,
            Over::Names { pattern, .. } => {
                alert.patterns.insert(pattern.clone());
            }
        }
        opened
    }

    /// Closes the alert window, returning what it summarises (`None` if none is open).
    pub fn take_alert(&mut self, now: Instant) -> Option<AlertSummary> {
        let alert = self.alert.take()?;
        Some(AlertSummary {
            count: alert.count,
            rate: alert.rate,
            patterns: alert.patterns.into_iter().collect(),
            window: now.saturating_duration_since(alert.opened),
        })
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn limits(qps: u32, burst: u32, names: u32) -> DnsBudget {
        DnsBudget {
            queries_per_second: qps,
            burst,
            names_per_suffix_per_minute: names,
        }
    }

    #[test]
    fn token_bucket_allows_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let l = limits(10, 20, 1000);
        let mut b = Budget::default();
        for i in 0..20 {
            assert_eq!(b.admit(t0, &l, "a.example", &[]), Ok(()), "query {i}");
        }
        assert_eq!(
            b.admit(t0, &l, "a.example", &[]),
            Err(Over::Rate {
                per_second: 10,
                burst: 20
            })
        );
        // 100 ms later one token is back; 250 ms later two (none saved from refusals).
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.admit(t1, &l, "a.example", &[]), Ok(()));
        assert!(b.admit(t1, &l, "a.example", &[]).is_err());
        let t2 = t1 + Duration::from_millis(250);
        assert_eq!(b.admit(t2, &l, "a.example", &[]), Ok(()));
        assert_eq!(b.admit(t2, &l, "a.example", &[]), Ok(()));
        assert!(b.admit(t2, &l, "a.example", &[]).is_err());
        // A long pause refills to the burst, never beyond.
        let t3 = t2 + Duration::from_secs(3600);
        let ok = (0..100)
            .filter(|_| b.admit(t3, &l, "a.example", &[]).is_ok())
            .count();
        assert_eq!(ok, 20);
    }

    #[test]
    fn steady_rate_within_budget_is_never_refused() {
        // 40 queries a second for a minute under a 50/s budget: a busy package install.
        let t0 = Instant::now();
        let l = DnsBudget::DEFAULT;
        let mut b = Budget::default();
        let patterns = vec!["**.pypi.example".to_owned()];
        for i in 0..2400u64 {
            let now = t0 + Duration::from_millis(i * 25);
            let name = format!("n{}.pypi.example", i % 50);
            assert_eq!(b.admit(now, &l, &name, &patterns), Ok(()), "query {i}");
        }
    }

    #[test]
    fn distinct_names_per_pattern_per_minute() {
        let t0 = Instant::now();
        let l = limits(1000, 1000, 3);
        let mut b = Budget::default();
        let pypi = vec!["**.pypi.example".to_owned()];
        let other = vec!["*.other.example".to_owned()];
        for n in ["a", "b", "c"] {
            b.admit(t0, &l, &format!("{n}.pypi.example"), &pypi)
                .unwrap();
        }
        let over = Over::Names {
            pattern: "**.pypi.example".into(),
            limit: 3,
        };
        assert_eq!(b.admit(t0, &l, "d.pypi.example", &pypi), Err(over.clone()));
        // Names already counted cost nothing more; other patterns and exact names have
        // their own (or no) limit.
        b.admit(t0, &l, "a.pypi.example", &pypi).unwrap();
        b.admit(t0, &l, "d.other.example", &other).unwrap();
        b.admit(t0, &l, "api.example.com", &[]).unwrap();
        // Still refused just before the minute is up; fresh after.
        let t1 = t0 + NAME_WINDOW - Duration::from_millis(1);
        assert_eq!(b.admit(t1, &l, "e.pypi.example", &pypi), Err(over));
        let t2 = t0 + NAME_WINDOW;
        for n in ["e", "f", "g"] {
            b.admit(t2, &l, &format!("{n}.pypi.example"), &pypi)
                .unwrap();
        }
        assert!(b.admit(t2, &l, "h.pypi.example", &pypi).is_err());
        // A name under two patterns needs room in both.
        let both = vec!["**.pypi.example".to_owned(), "*.other.example".to_owned()];
        assert!(b.admit(t2, &l, "x.pypi.example", &both).is_err());
    }

    #[test]
    fn a_refused_query_spends_nothing() {
        let t0 = Instant::now();
        let l = limits(1, 2, 1);
        let mut b = Budget::default();
        let p = vec!["*.x.example".to_owned()];
        b.admit(t0, &l, "a.x.example", &p).unwrap();
        // Over the name limit: no token taken, and `b` is not counted as a name.
        assert!(b.admit(t0, &l, "b.x.example", &p).is_err());
        b.admit(t0, &l, "a.x.example", &p).unwrap();
        assert!(matches!(
            b.admit(t0, &l, "a.x.example", &p),
            Err(Over::Rate { .. })
        ));
    }

    #[test]
    fn one_alert_per_window_with_the_count() {
        let t0 = Instant::now();
        let mut b = Budget::default();
        assert_eq!(b.take_alert(t0), None);
        let rate = Over::Rate {
            per_second: 1,
            burst: 1,
        };
        let names = Over::Names {
            pattern: "**.pypi.example".into(),
            limit: 3,
        };
        assert!(b.refused(t0, &names));
        for _ in 0..6 {
            assert!(!b.refused(t0 + Duration::from_secs(1), &names));
        }
        assert!(!b.refused(t0 + Duration::from_secs(2), &rate));
        let summary = b.take_alert(t0 + ALERT_WINDOW).unwrap();
        assert_eq!(
            summary,
            AlertSummary {
                count: 8,
                rate: 1,
                patterns: vec!["**.pypi.example".into()],
                window: ALERT_WINDOW,
            }
        );
        assert_eq!(
            summary.reason(),
            "8 DNS queries refused in 10 s for going over the sandbox's DNS budget (1 over \
             the query rate; 7 over the distinct-name limit of `**.pypi.example`)"
        );
        // Closed: the next refusal opens a new window.
        assert_eq!(b.take_alert(t0 + ALERT_WINDOW), None);
        assert!(b.refused(t0 + ALERT_WINDOW, &rate));
    }
}
