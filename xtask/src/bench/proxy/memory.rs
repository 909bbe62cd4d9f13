//! The held-connections memory case: a Python client in the sandbox opens `n` TLS
//! connections through one path, sends one HTTP/1.1 request on each and reads the
//! response, then holds them all open and idle; the proxy's resident memory is read
//! before, while they are held, and at two moments after the client closed them all.
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::IpAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use egress_tests::sandbox::Sandbox;

/// The client: argv host ip port cafile n. Prints `held N` once every connection has had
/// its response, closes them all on the first line of stdin and prints `closed`, then
/// waits for a second line.
const CLIENT: &str = r#"
import resource, socket, ssl, sys
host, ip, port, ca, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 256)), hard))
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(["http/1.1"])
request = ("GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host).encode()
held = []
for i in range(n):
    s = ctx.wrap_socket(socket.create_connection((ip, port), timeout=30), server_hostname=host)
    s.sendall(request)
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("connection %d closed before the response" % i)
        got += chunk
    head, body = got.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 200"):
        sys.exit("connection %d: %r" % (i, head[:80]))
    length = [int(l.split(b":", 1)[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
    while length and len(body) < length[0]:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("connection %d closed mid-body" % i)
        body += chunk
    held.append(s)
print("held", len(held), flush=True)
sys.stdin.readline()
for s in held:
    s.close()
print("closed", flush=True)
sys.stdin.readline()
"#;

/// Resident memory of every process of `pids`, summed, in KiB.
fn rss_sum_kib(pids: &[u32]) -> Option<u64> {
    pids.iter().map(|&pid| rss_kib(pid)).sum()
}

/// Resident memory of `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What one path's proxy held.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    pub connections: u64,
    pub before_kib: u64,
    pub held_kib: u64,
    /// Still held, [`SETTLE`] later: allocators keep freed pages a while (jemalloc's
    /// default decay is 10 s), so this is what a long-held connection costs.
    pub settled_kib: u64,
    /// Soon after the close, and later (allocators return memory with some delay).
    pub after_kib: u64,
    pub later_kib: u64,
}

impl Held {
    pub fn per_connection_kib(&self) -> f64 {
        self.held_kib.saturating_sub(self.before_kib) as f64 / self.connections.max(1) as f64
    }

    pub fn settled_per_connection_kib(&self) -> f64 {
        self.settled_kib.saturating_sub(self.before_kib) as f64 / self.connections.max(1) as f64
    }
}

/// How long the connections stay held after the first reading, for the second.
pub const SETTLE: Duration = Duration::from_secs(12);

/// How long after the close the two readings are taken.
pub const AFTER: Duration = Duration::from_secs(2);
pub const LATER: Duration = Duration::from_secs(15);

/// Runs the case against `ip`:443 as `host` (trusting `ca`), reading the memory of the
/// processes `pids` (summed).
pub fn measure(
    sandbox: &Sandbox,
    script_dir: &Path,
    pids: &[u32],
    host: &str,
    ip: IpAddr,
    ca: &Path,
    n: u32,
) -> anyhow::Result<Held> {
    let script = script_dir.join("hold_connections.py");
    std::fs::write(&script, CLIENT)?;
    let rss = || rss_sum_kib(pids).context("proxy process gone");
    let before_kib = rss()?;
    let args = [
        script.display().to_string(),
        host.to_owned(),
        ip.to_string(),
        "443".to_owned(),
        ca.display().to_string(),
        n.to_string(),
    ];
    let mut child = sandbox
        .command_with_timeout(600, "python3", &args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn the connection-holding client")?;
    let mut stdin = child.stdin.take().context("client stdin")?;
    let mut lines = BufReader::new(child.stdout.take().context("client stdout")?).lines();
    let mut expect = |want: &str| -> anyhow::Result<()> {
        match lines.next() {
            Some(Ok(line)) if line.starts_with(want) => Ok(()),
            other => bail!("the client said {other:?}, expected {want:?}"),
        }
    };
    let result: anyhow::Result<Held> = (|| {
        expect("held")?;
        // Let the proxy finish whatever the last responses left (records, pool).
        std::thread::sleep(Duration::from_secs(1));
        let held_kib = rss()?;
        std::thread::sleep(SETTLE);
        let settled_kib = rss()?;
        writeln!(stdin)?;
        expect("closed")?;
        std::thread::sleep(AFTER);
        let after_kib = rss()?;
        std::thread::sleep(LATER.saturating_sub(AFTER));
        let later_kib = rss()?;
        Ok(Held {
            connections: u64::from(n),
            before_kib,
            held_kib,
            settled_kib,
            after_kib,
            later_kib,
        })
    })();
    drop(stdin);
    let out = child.wait_with_output()?;
    match result {
        Ok(held) => Ok(held),
        Err(e) => Err(e.context(format!(
            "holding {n} connections to {host} ({ip}): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}
