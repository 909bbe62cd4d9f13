//! CPU time each side spent during a measurement, so that throughput can be read per core:
//! the servers from `/proc/<pid>/stat` (user + system, all threads), the client (wrk or
//! h2load and the `timeout`/`ip netns exec` wrappers) from `getrusage(RUSAGE_CHILDREN)`,
//! which counts every descendant once it has been waited for.
use std::time::Duration;

/// User + system CPU time of process `pid` (all its threads), if it exists.
pub fn process(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    from_stat(&stat, ticks_per_sec())
}

/// User + system CPU time of every process of `pids`, summed; `None` if one is gone or
/// there are none.
pub fn processes(pids: &[u32]) -> Option<Duration> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&pid| process(pid)).sum()
}

/// utime + stime of a `/proc/<pid>/stat` line, in clock ticks of `hz`.
fn from_stat(stat: &str, hz: u64) -> Option<Duration> {
    // The command name (field 2) may contain spaces and parentheses; fields after the
    // last ')' are plain: state is field 3, utime field 14, stime field 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(ticks(utime + stime, hz))
}

/// CPU time the whole machine spent busy (every CPU, anything but idle and iowait), from
/// the first line of `/proc/stat`. Compared with what the benchmark's own processes used,
/// it shows whether anything else ran meanwhile (kernel network work done in softirq
/// context may be counted to either).
pub fn machine_busy() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    busy_from_proc_stat(&stat, ticks_per_sec())
}

fn busy_from_proc_stat(stat: &str, hz: u64) -> Option<Duration> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum();
    Some(ticks(busy, hz))
}

fn ticks(n: u64, hz: u64) -> Duration {
    Duration::from_secs(n / hz) + Duration::from_nanos((n % hz) * 1_000_000_000 / hz)
}

fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100)
}

/// User + system CPU time of every child (and their descendants) waited for so far.
pub fn children() -> Duration {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stat() {
        let line = "4242 (nginx: a) b) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 75 0 0 20 0 1 0 \
                    123 456 789";
        assert_eq!(from_stat(line, 100), Some(Duration::from_millis(3250)));
        assert_eq!(from_stat("1 (x) S 1", 100), None);
        assert!(process(std::process::id()).is_some());
        let proc_stat = "cpu  100 5 50 1000 20 1 4 0 0 0\ncpu0 50 2 25 500 10 0 2 0 0 0\n";
        assert_eq!(
            busy_from_proc_stat(proc_stat, 100),
            Some(Duration::from_millis(1600))
        );
        assert!(machine_busy().is_some());
    }
}
