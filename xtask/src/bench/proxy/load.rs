//! The load generators and what their reports say: wrk for HTTP/1.1 (keep-alive, and one
//! request per connection with `Connection: close`) and h2load for HTTP/2.
//!
//! Neither verifies the server's certificate, so the same command line serves the three
//! paths; the checks before measuring ([`super::check`]) verify with curl instead.
use anyhow::{bail, Context};

/// One kind of measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// HTTP/1.1 requests on kept-alive connections (wrk).
    H1KeepAlive,
    /// HTTP/1.1 with `Connection: close`: a TCP connect and TLS handshake per request (wrk).
    H1NewConnection,
    /// HTTP/2 streams on kept-alive connections (h2load).
    H2KeepAlive,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::H1KeepAlive, Kind::H1NewConnection, Kind::H2KeepAlive];

    /// Its place in [`Kind::ALL`].
    pub fn index(self) -> usize {
        match self {
            Kind::H1KeepAlive => 0,
            Kind::H1NewConnection => 1,
            Kind::H2KeepAlive => 2,
        }
    }

    pub fn tool(self) -> &'static str {
        match self {
            Kind::H1KeepAlive | Kind::H1NewConnection => "wrk",
            Kind::H2KeepAlive => "h2load",
        }
    }

    /// A short name for the summary table.
    pub fn short(self) -> &'static str {
        match self {
            Kind::H1KeepAlive => "HTTP/1.1 keep-alive req/s",
            Kind::H1NewConnection => "HTTP/1.1 new connections/s",
            Kind::H2KeepAlive => "HTTP/2 keep-alive req/s",
        }
    }

    /// Whether the tool reports latency percentiles (wrk) or only a mean (h2load).
    pub fn has_percentiles(self) -> bool {
        self.tool() == "wrk"
    }

    /// The tool's arguments, for `secs` seconds against `url`.
    pub fn argv(self, load: &Load, secs: u32, url: &str) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        match self {
            Kind::H1KeepAlive | Kind::H1NewConnection => {
                a.extend(["-t".into(), load.threads.to_string()]);
                a.extend(["-c".into(), load.connections.to_string()]);
                a.extend(["-d".into(), format!("{secs}s"), "--latency".into()]);
                a.extend(["--timeout".into(), "5s".into()]);
                if self == Kind::H1NewConnection {
                    a.extend(["-H".into(), "Connection: close".into()]);
                }
            }
            Kind::H2KeepAlive => {
                a.extend(["-t".into(), load.threads.min(load.h2_clients).to_string()]);
                a.extend(["-c".into(), load.h2_clients.to_string()]);
                a.extend(["-m".into(), load.h2_streams.to_string()]);
                a.extend(["-D".into(), secs.to_string()]);
            }
        }
        a.push(url.into());
        a
    }

    /// The command line as shown in the report (without the URL).
    pub fn describe(self, load: &Load, secs: u32) -> String {
        let mut argv = self.argv(load, secs, "");
        argv.pop();
        let shown: Vec<String> = argv
            .into_iter()
            .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
            .collect();
        format!("{} {}", self.tool(), shown.join(" "))
    }

    pub fn parse(self, text: &str) -> anyhow::Result<Report> {
        match self.tool() {
            "wrk" => parse_wrk(text),
            _ => parse_h2load(text),
        }
    }
}

/// Concurrency of the load generators.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Client threads (wrk `-t`, h2load `-t`).
    pub threads: u32,
    /// wrk connections.
    pub connections: u32,
    /// h2load connections.
    pub h2_clients: u32,
    /// h2load concurrent streams per connection.
    pub h2_streams: u32,
}

/// What one run of a tool measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Completed requests.
    pub requests: u64,
    pub req_per_sec: f64,
    /// Latency percentiles in microseconds (wrk only).
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// Mean request time in microseconds.
    pub mean_us: Option<f64>,
    /// Socket errors, timeouts and non-2xx responses.
    pub errors: u64,
}

/// `712.00us`, `1.23ms`, `2.00s`, `1.50m` -> microseconds.
fn duration_us(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(v * scale)
}

/// Numbers before each of `names` in `a 1, b 2, c 3`-style text (wrk's socket errors).
fn counts_after(line: &str, names: &[&str]) -> u64 {
    let words: Vec<&str> = line
        .split(|c: char| c == ',' || c == ':' || c.is_whitespace())
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .filter(|w| names.contains(&w[0]))
        .filter_map(|w| w[1].parse::<u64>().ok())
        .sum()
}

/// Numbers before each of `names` in `1 total, 2 started`-style text (h2load).
fn counts_before(line: &str, names: &[&str]) -> u64 {
    let words: Vec<&str> = line
        .split(|c: char| c == ',' || c == ':' || c.is_whitespace())
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .filter(|w| names.contains(&w[1]))
        .filter_map(|w| w[0].parse::<u64>().ok())
        .sum()
}

pub fn parse_wrk(text: &str) -> anyhow::Result<Report> {
    let mut r = Report::default();
    let mut saw_rate = false;
    let mut in_distribution = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("Latency Distribution") {
            in_distribution = true;
            continue;
        }
        if in_distribution {
            let mut it = t.split_whitespace();
            match (it.next(), it.next().and_then(duration_us)) {
                (Some("50%"), Some(us)) => r.p50_us = Some(us),
                (Some("99%"), Some(us)) => r.p99_us = Some(us),
                (Some(p), Some(_)) if p.ends_with('%') => {}
                _ => in_distribution = false,
            }
        }
        if t.starts_with("Latency ") {
            r.mean_us = t.split_whitespace().nth(1).and_then(duration_us);
        } else if let Some(rest) = t.strip_prefix("Requests/sec:") {
            r.req_per_sec = rest.trim().parse().context("wrk Requests/sec")?;
            saw_rate = true;
        } else if t.contains(" requests in ") {
            r.requests = t
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if t.starts_with("Socket errors:") {
            r.errors += counts_after(t, &["connect", "read", "write", "timeout"]);
        } else if let Some(rest) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    if !saw_rate {
        bail!("no `Requests/sec:` in wrk's output:\n{text}");
    }
    Ok(r)
}

pub fn parse_h2load(text: &str) -> anyhow::Result<Report> {
    let mut r = Report::default();
    let mut saw_rate = false;
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("finished in ") {
            // finished in 10.00s, 38374.30 req/s, 6.59MB/s
            r.req_per_sec = rest
                .split(',')
                .nth(1)
                .and_then(|f| f.trim().strip_suffix(" req/s"))
                .context("h2load `finished in` line")?
                .trim()
                .parse()
                .context("h2load req/s")?;
            saw_rate = true;
        } else if let Some(rest) = t.strip_prefix("requests:") {
            r.requests = counts_before(rest, &["succeeded"]);
            r.errors += counts_before(rest, &["failed"]);
        } else if let Some(rest) = t.strip_prefix("status codes:") {
            // Non-2xx answers that h2load counted as succeeded (3xx) are errors here too.
            r.errors += counts_before(rest, &["3xx"]);
        } else if let Some(rest) = t.strip_prefix("time for request:") {
            r.mean_us = rest.split_whitespace().nth(2).and_then(duration_us);
        }
    }
    if !saw_rate {
        bail!("no `finished in ... req/s` in h2load's output:\n{text}");
    }
    if r.requests == 0 {
        bail!("h2load completed no request:\n{text}");
    }
    Ok(r)
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    const WRK: &str = "Running 10s test @ https://api.example.com/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.52ms  712.33us  21.47ms   89.12%
    Req/Sec    10.71k   611.28    12.02k    71.00%
  Latency Distribution
     50%  1.38ms
     75%  1.71ms
     90%  2.13ms
     99%  4.02ms
  213170 requests in 10.00s, 37.41MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:  21313.63
Transfer/sec:      3.74MB
";

    fn us(v: Option<f64>) -> Option<u64> {
        v.map(|x| x.round() as u64)
    }

    #[test]
    fn reads_wrk() {
        let r = parse_wrk(WRK).unwrap();
        assert_eq!(r.requests, 213_170);
        assert!((r.req_per_sec - 21313.63).abs() < 1e-6);
        assert_eq!(us(r.p50_us), Some(1380));
        assert_eq!(us(r.p99_us), Some(4020));
        assert_eq!(us(r.mean_us), Some(1520));
        assert_eq!(r.errors, 9);
        assert!(parse_wrk("unable to connect to api.example.com:443").is_err());
    }

    const H2LOAD: &str = "starting benchmark...
spawning thread #0: 8 total client(s). Timing-based test with 0s of warm-up time and 10s of main duration for measurements.
finished in 10.00s, 38374.30 req/s, 6.59MB/s
requests: 383743 total, 383903 started, 383743 done, 383740 succeeded, 3 failed, 0 errored, 0 timeout
status codes: 383740 2xx, 0 3xx, 3 4xx, 0 5xx
traffic: 65.91MB (69110938) total, 1.12MB (1176430) headers (space savings 95.35%), 5.49MB (5756145) data
                     min         max         mean         sd        +/- sd
time for request:      215us     21.21ms      4.15ms      1.53ms    70.08%
time for connect:     2.47ms      5.10ms      3.62ms       918us    62.50%
time to 1st byte:     5.52ms      9.02ms      7.56ms      1.20ms    62.50%
req/s           :    2398.18     2400.96     2399.64        0.84    62.50%
";

    #[test]
    fn reads_h2load() {
        let r = parse_h2load(H2LOAD).unwrap();
        assert_eq!(r.requests, 383_740);
        assert!((r.req_per_sec - 38374.30).abs() < 1e-6);
        assert_eq!(us(r.mean_us), Some(4150));
        assert_eq!(r.p50_us, None);
        assert_eq!(r.errors, 3);
        let none = H2LOAD.replace("383740 succeeded", "0 succeeded");
        assert!(parse_h2load(&none).is_err());
    }

    #[test]
    fn command_lines() {
        let load = Load {
            threads: 2,
            connections: 32,
            h2_clients: 16,
            h2_streams: 10,
        };
        assert_eq!(
            Kind::H1NewConnection.describe(&load, 10),
            "wrk -t 2 -c 32 -d 10s --latency --timeout 5s -H 'Connection: close'"
        );
        assert_eq!(
            Kind::H2KeepAlive.argv(&load, 10, "https://x/"),
            ["-t", "2", "-c", "16", "-m", "10", "-D", "10", "https://x/"]
        );
    }
}
