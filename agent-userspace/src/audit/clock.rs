//! Turns kernel event times (`bpf_ktime_get_ns`, i.e. CLOCK_MONOTONIC) into wall-clock UTC
//! for `@timestamp`.
//!
//! The offset between the two clocks is sampled at start and again every second; it is
//! replaced only when the wall clock stepped ([`ClockOffset::after_step`]: by a second or
//! more, as when time synchronisation first sets the clock after the daemon started), so
//! kernel records keep the same wall time as the proxy's and the resolver's, which read
//! the wall clock themselves, while slewing never moves the offset.

use std::io;

use time::OffsetDateTime;

/// How far the wall clock must move against the monotonic one to count as a step.
pub const STEP: std::time::Duration = std::time::Duration::from_secs(1);

/// `CLOCK_REALTIME - CLOCK_MONOTONIC`, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockOffset {
    realtime_minus_monotonic_ns: i128,
}

impl ClockOffset {
    /// Reads both clocks. The realtime reading is bracketed by two monotonic ones and
    /// compared with their midpoint, which halves the error a preemption between the calls
    /// could add.
    pub fn sample() -> io::Result<Self> {
        let before = clock_ns(libc::CLOCK_MONOTONIC)?;
        let real = clock_ns(libc::CLOCK_REALTIME)?;
        let after = clock_ns(libc::CLOCK_MONOTONIC)?;
        let mono = before + (after - before) / 2;
        Ok(Self {
            realtime_minus_monotonic_ns: real - mono,
        })
    }

    /// `sample` if the wall clock stepped since `self` was taken (the offsets differ by
    /// [`STEP`] or more), else `None`.
    pub fn after_step(self, sample: Self) -> Option<Self> {
        let moved = (sample.realtime_minus_monotonic_ns - self.realtime_minus_monotonic_ns).abs();
        (moved >= STEP.as_nanos() as i128).then_some(sample)
    }

    /// An offset given directly (tests, or one computed elsewhere).
    pub fn from_nanos(realtime_minus_monotonic_ns: i128) -> Self {
        Self {
            realtime_minus_monotonic_ns,
        }
    }

    pub fn as_nanos(self) -> i128 {
        self.realtime_minus_monotonic_ns
    }

    /// The wall-clock time of a CLOCK_MONOTONIC reading.
    pub fn to_wall(self, monotonic_ns: u64) -> OffsetDateTime {
        let unix_ns = self.realtime_minus_monotonic_ns + i128::from(monotonic_ns);
        // Unreachable in practice: a u64 of nanoseconds spans 584 years and the offset
        // comes from a real clock, so the sum stays far inside time's +-9999 year range.
        // Should it ever not, the epoch is an obviously wrong time rather than a lost record.
        OffsetDateTime::from_unix_timestamp_nanos(unix_ns).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }
}

fn clock_ns(clock: libc::clockid_t) -> io::Result<i128> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_offset_maps_now_to_now() -> io::Result<()> {
        let offset = ClockOffset::sample()?;
        let mono = u64::try_from(clock_ns(libc::CLOCK_MONOTONIC)?).map_err(io::Error::other)?;
        let wall = offset.to_wall(mono);
        let diff = (OffsetDateTime::now_utc() - wall).abs();
        assert!(
            diff < time::Duration::seconds(1),
            "wall clock off by {diff}"
        );
        Ok(())
    }

    /// A wall clock set forward or back by a second or more is followed; slewing within
    /// that is not (the offset, and the order it gives events, stays).
    #[test]
    fn only_a_step_replaces_the_offset() {
        let at = ClockOffset::from_nanos(1_700_000_000_000_000_000);
        let moved = |ns: i128| ClockOffset::from_nanos(at.as_nanos() + ns);
        assert_eq!(
            at.after_step(moved(3_600_000_000_000)),
            Some(moved(3_600_000_000_000))
        );
        assert_eq!(
            at.after_step(moved(-1_000_000_000)),
            Some(moved(-1_000_000_000))
        );
        assert_eq!(at.after_step(moved(999_999_999)), None);
        assert_eq!(at.after_step(moved(-2_000_000)), None);
    }

    #[test]
    fn fixed_offset_is_added() {
        let offset = ClockOffset::from_nanos(1_700_000_000_000_000_000);
        let wall = offset.to_wall(123_456_789);
        assert_eq!(wall.unix_timestamp_nanos(), 1_700_000_000_123_456_789);
    }
}
