//! The audit pipeline's capacity, as part of `cargo xtask bench connect`: how many kernel
//! decisions per second egressd turns into audit records with none lost, and the daemon's
//! CPU time per record.
//!
//! Workers inside the sandbox call `connect()` on a UDP socket at a fixed pace, a rung of a
//! ladder of rates at a time. A UDP connect sends nothing, so the rate is not bounded by
//! the TCP handshakes of the TCP flood case; each still runs connect4, is decided and
//! becomes one event and one `connect` record. After each rung the bench waits until
//! every event is in the log or counted lost, and stops climbing at the first rung with a
//! loss or one the workers could not keep pace with.
use std::{
    io::{Read, Seek, SeekFrom},
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::bail;

/// Calls `connect()` on one UDP socket `count` times, at `rate` per second (0: as fast as
/// it can), and prints the elapsed nanoseconds.
pub(super) fn worker(addr: SocketAddr, count: u64, rate: u64) -> anyhow::Result<()> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    let start = Instant::now();
    for i in 0..count {
        if rate > 0 && i % 64 == 0 {
            let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        sock.connect(addr)?;
    }
    println!("{}", start.elapsed().as_nanos());
    Ok(())
}

/// Counts, incrementally, the records a bench run cares about in the daemon's audit log:
/// `connect` records of the sandbox `bench` and the events reported lost. Only complete
/// lines are read; a line is matched as text, and only loss records are parsed.
pub(super) struct LogCounter {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    pub connects: u64,
    pub lost: u64,
}

const CONNECT: &[u8] = br#""action":"connect""#;
const BENCH: &[u8] = br#""sandbox":{"name":"bench""#;
const EVENTS_LOST: &[u8] = br#""action":"events-lost""#;

impl LogCounter {
    pub(super) fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            offset: 0,
            partial: Vec::new(),
            connects: 0,
            lost: 0,
        }
    }

    /// Reads what was appended since the last call.
    pub(super) fn update(&mut self) -> anyhow::Result<()> {
        let mut file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut buf = std::mem::take(&mut self.partial);
        let read = file.read_to_end(&mut buf)?;
        self.offset += read as u64;
        let complete = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        for line in buf[..complete].split(|&b| b == b'\n') {
            if contains(line, CONNECT) && contains(line, BENCH) {
                self.connects += 1;
            } else if contains(line, EVENTS_LOST) {
                let v: serde_json::Value = serde_json::from_slice(line)?;
                self.lost += v["egress"]["lost"]["count"].as_u64().unwrap_or(0);
            }
        }
        self.partial = buf[complete..].to_vec();
        Ok(())
    }

    /// Updates until `connects + lost` reaches `target` or `timeout` passes.
    pub(super) fn wait_for(&mut self, target: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.update()?;
            if self.connects + self.lost >= target || Instant::now() >= deadline {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// One rung of the ladder.
pub(super) struct Rung {
    pub offered: u64,
    pub events: u64,
    pub secs: f64,
    pub written: u64,
    pub lost: u64,
    pub cpu_ns: u64,
}

impl Rung {
    pub(super) fn achieved(&self) -> f64 {
        self.events as f64 / self.secs.max(1e-9)
    }

    pub(super) fn cpu_per_record_us(&self) -> f64 {
        self.cpu_ns as f64 / 1000.0 / self.written.max(1) as f64
    }

    /// No event lost and every one written.
    pub(super) fn complete(&self) -> bool {
        self.lost == 0 && self.written == self.events
    }
}

/// What a ladder run needs from the connect bench.
pub(super) struct Ladder<'a> {
    pub procs_file: &'a Path,
    pub exe: &'a Path,
    pub target: SocketAddr,
    pub daemon_pid: u32,
    pub workers: u64,
    pub secs: f64,
}

impl Ladder<'_> {
    /// Climbs `rates` (events per second, all workers together) until a rung loses an
    /// event or falls short of its pace by more than 10%.
    pub(super) fn climb(&self, rates: &[u64], log: &mut LogCounter) -> anyhow::Result<Vec<Rung>> {
        let mut rungs = Vec::new();
        for &rate in rates {
            let rung = self.rung(rate, log)?;
            eprintln!(
                "  {rate}/s offered: {:.0}/s made, {} of {} written, {} lost, daemon {:.2} us per record",
                rung.achieved(),
                rung.written,
                rung.events,
                rung.lost,
                rung.cpu_per_record_us()
            );
            let stop = !rung.complete() || (rate > 0 && rung.achieved() < 0.9 * rate as f64);
            rungs.push(rung);
            if stop {
                break;
            }
        }
        Ok(rungs)
    }

    fn rung(&self, rate: u64, log: &mut LogCounter) -> anyhow::Result<Rung> {
        let per_worker_rate = rate / self.workers;
        let per_worker = ((per_worker_rate as f64 * self.secs) as u64).max(1);
        log.update()?;
        let (connects0, lost0) = (log.connects, log.lost);
        let cpu0 = super::connect::cpu_ns(self.daemon_pid);
        let started = Instant::now();
        let workers: Vec<_> = (0..self.workers)
            .map(|_| {
                let script = format!(
                    "echo $$ > '{}' && exec '{}' bench audit-worker {} {per_worker} {per_worker_rate}",
                    self.procs_file.display(),
                    self.exe.display(),
                    self.target
                );
                Command::new("sh")
                    .args(["-c", &script])
                    .stdout(std::process::Stdio::piped())
                    .spawn()
            })
            .collect::<Result<_, _>>()?;
        let mut secs: f64 = 0.0;
        for w in workers {
            let out = w.wait_with_output()?;
            if !out.status.success() {
                bail!("audit worker failed");
            }
            let ns: f64 = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or(0.0);
            secs = secs.max(ns / 1e9);
        }
        if secs == 0.0 {
            secs = started.elapsed().as_secs_f64();
        }
        let events = per_worker * self.workers;
        log.wait_for(connects0 + lost0 + events, Duration::from_secs(30))?;
        let cpu_ns = super::connect::cpu_ns(self.daemon_pid).saturating_sub(cpu0);
        Ok(Rung {
            offered: rate,
            events,
            secs,
            written: log.connects - connects0,
            lost: log.lost - lost0,
            cpu_ns,
        })
    }
}
