//! `cargo xtask bench proxy`: HTTPS through egressd's credential-injecting proxy, side by
//! side with the same requests straight to the origin and through nginx configured as a
//! TLS-terminating reverse proxy that adds the same header.
//!
//! One fake internet (see TESTBED.md), one origin, one client, one run:
//! - the origin is nginx in the world namespace on 192.0.2.10:443 and 192.0.2.11:443, with
//!   a certificate from a test CA made for the run, HTTP/2 on, no access log, a small
//!   fixed body at every path and the `Authorization` it received at [`AUTH_PATH`];
//! - the client (wrk, h2load, curl) always runs inside the sandbox: its network namespace
//!   and its cgroup, to which egressd attached a policy that sends 192.0.2.10:443 to the
//!   proxy (credential `bench`, a token made for the run) and allows 192.0.2.11:443 and
//!   192.0.2.12:443 plainly;
//! - the paths: `direct` (sandbox -> origin at 192.0.2.11), `egressd` (sandbox ->
//!   192.0.2.10, redirected by the kernel to the proxy, which dials the origin from the
//!   world namespace) and `nginx` (sandbox -> nginx at 192.0.2.12 -> origin at
//!   192.0.2.10, verified TLS, upstream keep-alive pool).
//!
//! Before measuring, curl in the sandbox checks each path end to end: through nginx the
//! origin must have received exactly `Bearer <token>`, straight to it nothing; through
//! egressd the same, which the sandbox sees scrubbed (or, with `--no-scrub`, as is).
//! Measurements alternate between the paths so that machine noise hits all alike; each
//! reports req/s, latency, errors and the CPU time each process used. Then curl downloads
//! a large body ([`LARGE_PATH`], `--large-mb`) over each path, HTTP/1.1 and HTTP/2, for
//! MB/s.
//!
//! `--peers nginx,mitmproxy` adds mitmproxy ([`mitm`]: mitmdump in reverse mode, an addon
//! adding the header) beside nginx on every path-by-path measurement but the large body.
//! Before the load, the memory case ([`memory`], `--held`) holds idle TLS connections
//! through each proxy and reads its resident memory before, meanwhile and after.
//!
//! `--no-scrub` runs egressd with `proxy.scrub: false` (no response scrubbing, no
//! outbound secret detection): run the benchmark with and without it to see what
//! scrubbing costs.
mod cpu;
mod load;
mod memory;
mod mitm;
mod nginx;

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use egress_tests::{
    daemon::{tail, Daemon, DaemonOpts},
    hosts_file::HostsFile,
    pki::{random_hex, TestCa},
    sandbox::Sandbox,
    util::{which, TempDir},
    world::{World, ORIGIN_V4},
};

use self::load::{Kind, Load, Report};
use self::memory::Held;
use self::mitm::Mitmproxy;
use self::nginx::Nginx;
use crate::cmd::{bin_in, build_bins_in, require_root, step};

/// Where the proxy rule sends the sandbox (and where nginx forwards to).
const ORIGIN_IP: Ipv4Addr = ORIGIN_V4;
/// The same origin, reached without a proxy.
const DIRECT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
/// nginx as a reverse proxy.
const NGINX_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 12);
/// Connections the memory case holds through mitmproxy at most.
const MITM_HELD: u32 = 100;
/// mitmproxy as a reverse proxy.
const MITM_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 13);
/// The name the origin's certificate, the proxy rule and the credential are for.
const API_HOST: &str = "api.example.com";
const DIRECT_HOST: &str = "direct.example.com";
const NGINX_HOST: &str = "nginx-proxy.example.com";
const MITM_HOST: &str = "mitm-proxy.example.com";
/// What the origin answers at every path but [`AUTH_PATH`].
const BODY: &str = "hello from the bench origin\n";
/// Where the origin answers with the `Authorization` header it received.
const AUTH_PATH: &str = "/auth";
/// The credential's name in the daemon configuration and the policy.
const CREDENTIAL: &str = "bench";
/// What egressd's proxy writes in place of a secret (its `proxy::SCRUB_MARKER`), padded
/// with `*` to the secret's length.
const SCRUB_MARKER: &[u8] = b"[egressd:scrubbed]";
/// Where the origin serves the large body.
const LARGE_PATH: &str = "/large";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    duration: u32,
    /// Seconds of load before each measurement, not counted (0: none).
    #[arg(long, default_value_t = 2)]
    warmup: u32,
    /// Rounds; each measures every kind on every path, and the report shows medians.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Client threads (wrk -t, h2load -t).
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// HTTP/1.1 connections (wrk -c).
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// HTTP/2 connections (h2load -c).
    #[arg(long, default_value_t = 16)]
    h2_clients: u32,
    /// HTTP/2 concurrent streams per connection (h2load -m).
    #[arg(long, default_value_t = 10)]
    h2_streams: u32,
    /// Measure the release build of egressd (`cargo build --release`) instead of the
    /// debug build.
    #[arg(long)]
    release: bool,
    /// Use the egressd and egressctl already in target/ instead of building them first.
    #[arg(long)]
    no_build: bool,
    /// Run egressd with `proxy.scrub: false` (for measuring what scrubbing costs; unsafe
    /// outside a benchmark).
    #[arg(long)]
    no_scrub: bool,
    /// Size of the large body downloaded for MB/s, in MiB (0: skip).
    #[arg(long, default_value_t = 256)]
    large_mb: u32,
    /// The proxies egressd is compared with, side by side: `nginx`, `mitmproxy`
    /// (installed from PyPI into /opt/egressd-bench-venv on first use).
    #[arg(long, value_delimiter = ',', default_value = "nginx")]
    peers: Vec<Peer>,
    /// Connections held open at once in the memory case (0: skip it; at most 100 through
    /// mitmproxy, which is slow to open them).
    #[arg(long, default_value_t = 1000)]
    held: u32,
    /// Skip the req/s measurements (e.g. to run only the memory case).
    #[arg(long)]
    no_load: bool,
    /// The req/s measurements to make (default: all three).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "h1-keep-alive,h1-new-connection,h2-keep-alive"
    )]
    kinds: Vec<Kind>,
    /// Extra environment for egressd, `NAME=VALUE` (repeatable), e.g. to measure another
    /// allocator with `LD_PRELOAD=...`.
    #[arg(long = "egressd-env")]
    egressd_env: Vec<String>,
    /// Cores each proxy may spread over: egressd's proxy worker threads
    /// (`EGRESSD_PROXY_THREADS`) and as many nginx processes sharing its address
    /// (`reuseport`). Default: one per core, egressd's own default.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    proxy_workers: Option<u32>,
}

impl Args {
    /// `--proxy-workers`, or one per core.
    fn proxy_workers(&self) -> u32 {
        self.proxy_workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| u32::try_from(n.get()).unwrap_or(64).min(64))
        })
    }
}

/// A proxy egressd is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Peer {
    Nginx,
    Mitmproxy,
}

impl Peer {
    fn path(self) -> Path {
        match self {
            Peer::Nginx => Path::Nginx,
            Peer::Mitmproxy => Path::Mitmproxy,
        }
    }
}

/// The three ways from the sandbox to the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct,
    Egressd,
    Nginx,
    Mitmproxy,
}

/// Slots per path in the sample tables (every [`Path::index`]).
const PATHS: usize = 4;

impl Path {
    /// direct, egressd, then the peers asked for.
    fn measured(args: &Args) -> Vec<Path> {
        let mut paths = vec![Path::Direct, Path::Egressd];
        for peer in &args.peers {
            if !paths.contains(&peer.path()) {
                paths.push(peer.path());
            }
        }
        paths
    }

    fn label(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Egressd => "egressd",
            Path::Nginx => "nginx",
            Path::Mitmproxy => "mitmproxy",
        }
    }

    fn host(self) -> &'static str {
        match self {
            Path::Direct => DIRECT_HOST,
            Path::Egressd => API_HOST,
            Path::Nginx => NGINX_HOST,
            Path::Mitmproxy => MITM_HOST,
        }
    }

    fn url(self, path: &str) -> String {
        format!("https://{}{path}", self.host())
    }

    fn index(self) -> usize {
        match self {
            Path::Direct => 0,
            Path::Egressd => 1,
            Path::Nginx => 2,
            Path::Mitmproxy => 3,
        }
    }

    fn ip(self) -> Ipv4Addr {
        match self {
            Path::Direct => DIRECT_IP,
            Path::Egressd => ORIGIN_IP,
            Path::Nginx => NGINX_IP,
            Path::Mitmproxy => MITM_IP,
        }
    }
}

/// How long to watch the machine before measuring, and how busy it may be without a
/// warning in the report.
const IDLE_PROBE: Duration = Duration::from_secs(2);
const BUSY_WARNING: f64 = 0.2;

/// Cores the machine kept busy over `span` (anything: other processes, the kernel).
fn machine_busy_cores(span: Duration) -> Option<f64> {
    let before = cpu::machine_busy()?;
    std::thread::sleep(span);
    let busy = cpu::machine_busy()?.saturating_sub(before);
    Some(busy.as_secs_f64() / span.as_secs_f64())
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM set a flag instead of killing us, so that the run stops after the
/// measurement in progress (at most `--duration` seconds; the load tool runs in its own
/// process group under `timeout` and does not see Ctrl-C) and every guard still runs.
fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(
                sig,
                on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; removed the benchmark's namespaces, cgroup, processes and files");
    }
    Ok(())
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    require_root("the proxy benchmark")?;
    ensure!(args.duration >= 1, "--duration must be at least 1 second");
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    ensure!(
        args.threads >= 1 && args.connections >= args.threads,
        "--connections must be at least --threads (and --threads at least 1)"
    );
    ensure!(
        args.h2_clients >= 1 && args.h2_streams >= 1,
        "--h2-clients and --h2-streams must be at least 1"
    );
    let missing: Vec<&str> = ["nginx", "wrk", "h2load", "curl", "openssl", "sysctl"]
        .into_iter()
        .filter(|t| which(t).is_none())
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing {} (Debian: apt-get install nginx wrk nghttp2-client curl openssl procps)",
            missing.join(", ")
        );
    }
    if !args.no_build {
        build_bins_in(args.release)?;
    }
    // SAFETY: single-threaded here; the harness reads these to find the binaries.
    unsafe {
        std::env::set_var("EGRESSD_BIN", bin_in(args.release, "egressd"));
        std::env::set_var("EGRESSCTL_BIN", bin_in(args.release, "egressctl"));
    }
    catch_interrupts();

    let mitmdump = if args.peers.contains(&Peer::Mitmproxy) {
        Some(mitm::ensure_installed()?)
    } else {
        None
    };
    let paths = Path::measured(args);
    let bed = Bed::new(
        !args.no_scrub,
        args.large_mb,
        mitmdump.as_deref(),
        &args.egressd_env,
        args.proxy_workers(),
    );
    check_interrupted()?;
    let bed = bed?;
    step("Checking every path end to end with curl in the sandbox");
    let checked = bed.check(&paths);
    check_interrupted()?;
    checked?;
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let busy_before = machine_busy_cores(IDLE_PROBE);
    if let Some(b) = busy_before.filter(|&b| b > BUSY_WARNING) {
        eprintln!("  warning: {b:.2} cores busy before measuring; the figures will be noisy");
    }

    let load = Load {
        threads: args.threads,
        connections: args.connections,
        h2_clients: args.h2_clients,
        h2_streams: args.h2_streams,
    };
    let mut held: Vec<(Path, Held)> = Vec::new();
    if args.held > 0 {
        step(&format!(
            "Memory: {} idle TLS connections held through each proxy (one request each), \
             then closed",
            args.held
        ));
        for &path in paths.iter().filter(|p| **p != Path::Direct) {
            // mitmproxy takes about half a second per connection here (it dials the
            // origin for each): fewer, per connection all the same.
            let n = match path {
                Path::Mitmproxy => args.held.min(MITM_HELD),
                _ => args.held,
            };
            let h = bed.hold(path, n);
            check_interrupted()?;
            let h = h.with_context(|| format!("memory case via {}", path.label()))?;
            eprintln!(
                "  {:<9} {:>7.1} KiB per connection ({:.1} after {:?}); RSS {} -> {} KiB held -> {} KiB {:?} later -> {} KiB {:?} after close, {} KiB after {:?}",
                path.label(),
                h.per_connection_kib(),
                h.settled_per_connection_kib(),
                memory::SETTLE,
                h.before_kib,
                h.held_kib,
                h.settled_kib,
                memory::SETTLE,
                h.after_kib,
                memory::AFTER,
                h.later_kib,
                memory::LATER
            );
            held.push((path, h));
        }
    }
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); PATHS]; Kind::ALL.len()];
    let kinds: &[Kind] = if args.no_load { &[] } else { &args.kinds };
    let total = args.rounds * kinds.len() * paths.len();
    step(&format!(
        "Measuring: {} rounds x {} kinds x {} paths, {} s each (+{} s warm-up), about {} s",
        args.rounds,
        kinds.len(),
        paths.len(),
        args.duration,
        args.warmup,
        total as u32 * (args.duration + args.warmup + 1)
    ));
    let mut done = 0;
    for round in 0..args.rounds {
        for kind in kinds.iter().copied() {
            let k = kind.index();
            // Rotate which path goes first, so no path always follows the same one.
            for i in 0..paths.len() {
                let path = paths[(i + round) % paths.len()];
                // A Ctrl-C from the terminal also stops the servers, so an interruption
                // explains a failed measurement better than the failure does.
                if args.warmup > 0 {
                    let warm = bed.measure(kind, path, &load, args.warmup);
                    check_interrupted()?;
                    // A slow proxy (mitmproxy) may finish nothing in a short warm-up; the
                    // measurement itself fails if the path is broken.
                    if let Err(e) = warm {
                        eprintln!(
                            "  warm-up of {} via {}: {}",
                            kind.short(),
                            path.label(),
                            format!("{e:#}").lines().next().unwrap_or_default()
                        );
                    }
                }
                let s = bed.measure(kind, path, &load, args.duration);
                check_interrupted()?;
                let s = s.with_context(|| format!("{} via {}", kind.short(), path.label()))?;
                done += 1;
                eprintln!(
                    "  [{done}/{total}] {:<27} {:<8} {:>10.0} req/s  errors {}",
                    kind.short(),
                    path.label(),
                    s.report.req_per_sec,
                    s.report.errors
                );
                if s.report.errors > 0 {
                    bed.explain_errors(path);
                }
                samples[k][path.index()].push(s);
            }
        }
    }
    let mut large: Vec<Vec<f64>> = vec![Vec::new(); 2 * PATHS];
    // mitmproxy keeps whole bodies in memory unless told otherwise: not measured here.
    let large_paths: Vec<Path> = paths
        .iter()
        .copied()
        .filter(|p| *p != Path::Mitmproxy)
        .collect();
    if args.large_mb > 0 && !args.no_load {
        step(&format!(
            "Downloading {} MiB over each path, HTTP/1.1 and HTTP/2, {} round(s)",
            args.large_mb, args.rounds
        ));
        for _ in 0..args.rounds {
            for &path in &large_paths {
                for (v, flag) in ["--http1.1", "--http2"].into_iter().enumerate() {
                    let mbs = bed.download(path, flag, args.large_mb);
                    check_interrupted()?;
                    let mbs = mbs.with_context(|| format!("large body via {}", path.label()))?;
                    eprintln!("  {:<8} {flag:<10} {mbs:>8.1} MB/s", path.label());
                    large[v * PATHS + path.index()].push(mbs);
                }
            }
        }
    }
    print_report(
        args,
        &paths,
        &load,
        &samples,
        &held,
        &load_before,
        busy_before,
    );
    if args.large_mb > 0 && !args.no_load {
        println!();
        println!(
            "Large body ({} MiB, curl -o /dev/null in the sandbox), MB/s, median of {} round(s); egressd scrubbing {}",
            args.large_mb,
            args.rounds,
            if args.no_scrub { "off" } else { "on" }
        );
        print!("  {:<10}", "");
        for path in &large_paths {
            print!(" {:>9}", path.label());
        }
        println!();
        for (v, name) in ["HTTP/1.1", "HTTP/2"].into_iter().enumerate() {
            print!("  {name:<10}");
            for path in &large_paths {
                print!(
                    " {:>9}",
                    num(median(large[v * PATHS + path.index()].clone()), 1)
                );
            }
            println!();
        }
    }
    step("Done; removing the benchmark's namespaces, cgroup, pins, processes and files");
    Ok(())
}

/// Everything the benchmark runs on. Field order is drop order: the sandbox's hosts file
/// and processes first, then the daemon (and its pins), the nginx processes, the
/// namespaces, and last the files.
struct Bed {
    _hosts: HostsFile,
    _world_hosts: HostsFile,
    sandbox: Sandbox,
    daemon: Daemon,
    mitmproxy: Option<Mitmproxy>,
    /// One process per proxy worker, sharing one `reuseport` address.
    reverse_proxy: Vec<Nginx>,
    origin: Nginx,
    _world: World,
    ca: TestCa,
    dir: TempDir,
    token: String,
    egressd_ca: PathBuf,
    scrub: bool,
}

impl Bed {
    fn new(
        scrub: bool,
        large_mb: u32,
        mitmdump: Option<&std::path::Path>,
        egressd_env: &[String],
        proxy_workers: u32,
    ) -> anyhow::Result<Self> {
        step("Building the test bed: world and sandbox namespaces, test CA, origin, nginx proxy");
        let dir = TempDir::new("bench-proxy")?;
        let token = format!("bench_{}", random_hex(20)?);
        let ca = TestCa::new("bench")?;
        let leaf = ca.issue("bench", &[API_HOST, DIRECT_HOST, NGINX_HOST, MITM_HOST])?;
        let world = World::new()?;
        for ip in [DIRECT_IP, NGINX_IP, MITM_IP] {
            world.add_host(IpAddr::V4(ip))?;
        }
        // Bytes that hold no secret and do not compress (a simple generator, repeated).
        let large_file = dir.path().join("large.bin");
        {
            use std::io::Write as _;
            let mut block = vec![0u8; 1024 * 1024];
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            for b in &mut block {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = (x >> 24) as u8;
            }
            let mut f = std::io::BufWriter::new(std::fs::File::create(&large_file)?);
            for _ in 0..large_mb {
                f.write_all(&block)?;
            }
            f.flush()?;
        }
        let origin_dir = dir.path().join("origin");
        let origin = Nginx::start(
            &world,
            &origin_dir,
            &nginx::origin_conf(
                &origin_dir,
                &[IpAddr::V4(ORIGIN_IP), IpAddr::V4(DIRECT_IP)],
                &leaf,
                BODY,
                AUTH_PATH,
                (LARGE_PATH, &large_file),
            ),
            &[
                SocketAddr::new(IpAddr::V4(ORIGIN_IP), 443),
                SocketAddr::new(IpAddr::V4(DIRECT_IP), 443),
            ],
        )
        .context("starting the origin")?;
        let reverse_proxy = (0..proxy_workers)
            .map(|i| {
                let proxy_dir = dir.path().join(format!("nginx-proxy-{i}"));
                Nginx::start(
                    &world,
                    &proxy_dir,
                    &nginx::reverse_proxy_conf(
                        &proxy_dir,
                        IpAddr::V4(NGINX_IP),
                        proxy_workers > 1,
                        &leaf,
                        IpAddr::V4(ORIGIN_IP),
                        API_HOST,
                        ca.cert(),
                        &format!("Bearer {token}"),
                    ),
                    &[SocketAddr::new(IpAddr::V4(NGINX_IP), 443)],
                )
                .with_context(|| format!("starting nginx process {i} as a reverse proxy"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        // mitmproxy's reverse mode names its upstream by host name (for SNI and
        // verification), which the world namespace resolves to the origin.
        let world_hosts = HostsFile::new(world.netns(), &[(IpAddr::V4(ORIGIN_IP), API_HOST)])?;
        let mitmproxy = match mitmdump {
            Some(mitmdump) => Some(
                Mitmproxy::start(
                    mitmdump,
                    &world,
                    &dir.path().join("mitmproxy"),
                    &mitm::Spec {
                        listen: SocketAddr::new(IpAddr::V4(MITM_IP), 443),
                        leaf: &leaf,
                        upstream_host: API_HOST,
                        ca: ca.cert(),
                        authorization: &format!("Bearer {token}"),
                    },
                )
                .context("starting mitmproxy as a reverse proxy")?,
            ),
            None => None,
        };

        let token_file = dir.write("token", &format!("{token}\n"))?;
        let config = dir.write(
            "egressd.yaml",
            &format!(
                r#"proxy:
  upstream_ca: "{ca}"
  upstream_netns: "{world_ns}"
  scrub: {scrub}
credentials:
  {CREDENTIAL}:
    source: {{ file: "{token_file}" }}
    inject: {{ header: Authorization, format: "Bearer {{}}" }}
    hosts: [{API_HOST}]
"#,
                ca = ca.cert().display(),
                world_ns = world.netns().path().display(),
                token_file = token_file.display(),
            ),
        )?;
        step("Starting egressd and attaching the benchmark policy to the sandbox");
        let daemon = Daemon::start(DaemonOpts {
            extra_args: vec!["--config".into(), config.display().to_string()],
            // The daemon's default level, whatever this shell has set.
            // `--egressd-env` comes last, so that it may set the worker count too.
            env: [
                ("RUST_LOG".to_owned(), "info".to_owned()),
                (
                    "EGRESSD_PROXY_THREADS".to_owned(),
                    proxy_workers.to_string(),
                ),
            ]
            .into_iter()
            .chain(egressd_env.iter().map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k.to_owned(), v.to_owned())
            }))
            .collect(),
            ..DaemonOpts::default()
        })?;
        let sandbox = world.add_sandbox("bench")?;
        let hosts = HostsFile::new(
            sandbox.netns(),
            &[
                (IpAddr::V4(ORIGIN_IP), API_HOST),
                (IpAddr::V4(DIRECT_IP), DIRECT_HOST),
                (IpAddr::V4(NGINX_IP), NGINX_HOST),
                (IpAddr::V4(MITM_IP), MITM_HOST),
            ],
        )?;
        // A connection per request at thousands per second from one address to one
        // origin: the proxies' upstream sockets sit in TIME_WAIT for 60 s, so widen the
        // ephemeral port range and let TIME_WAIT ports be reused, in our namespaces only.
        for ns in [world.netns(), sandbox.netns()] {
            let out = ns
                .command(
                    10,
                    "sysctl",
                    &[
                        "-q",
                        "-w",
                        "net.ipv4.ip_local_port_range=20000 65000",
                        "net.ipv4.tcp_tw_reuse=1",
                    ],
                )
                .output()?;
            ensure!(
                out.status.success(),
                "sysctl in {}: {}",
                ns.name(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let policy = dir.write(
            "policy.yaml",
            &format!(
                r#"version: 1
default: deny
rules:
  - name: bench-origin
    to: [{ORIGIN_IP}]
    ports: [443]
    action: proxy
    hosts: [{API_HOST}]
    credential: {CREDENTIAL}
  - name: bench-direct-and-nginx
    to: [{DIRECT_IP}, {NGINX_IP}, {MITM_IP}]
    ports: [443]
    protocol: tcp
    action: allow
"#
            ),
        )?;
        daemon
            .ctl_ok([
                OsStr::new("attach"),
                OsStr::new("--cgroup"),
                sandbox.cgroup().path().as_os_str(),
                OsStr::new("--policy"),
                policy.as_os_str(),
                OsStr::new("--name"),
                OsStr::new("bench"),
                OsStr::new("--netns"),
                sandbox.netns().path().as_os_str(),
            ])
            .with_context(|| format!("attach; daemon log:\n{}", tail(&daemon.log(), 30)))?;
        let pem = daemon.ctl_ok(["ca", "export"])?;
        let egressd_ca = dir.write(
            "egressd-ca.pem",
            &String::from_utf8(pem.stdout).context("`egressctl ca export` is not UTF-8")?,
        )?;
        Ok(Self {
            _hosts: hosts,
            _world_hosts: world_hosts,
            sandbox,
            daemon,
            mitmproxy,
            reverse_proxy,
            origin,
            _world: world,
            ca,
            dir,
            token,
            egressd_ca,
            scrub,
        })
    }

    /// Downloads the large body from the sandbox via `path` with curl `flag`; MB/s.
    fn download(&self, path: Path, flag: &str, mb: u32) -> anyhow::Result<f64> {
        let ca = match path {
            Path::Egressd => &self.egressd_ca,
            _ => self.ca.cert(),
        };
        let ca = ca.display().to_string();
        let url = path.url(LARGE_PATH);
        let argv = [
            "-sS",
            "--fail",
            "--cacert",
            ca.as_str(),
            flag,
            "--max-time",
            "300",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{time_total}",
            url.as_str(),
        ];
        let out = self
            .sandbox
            .command_with_timeout(320, "curl", &argv)
            .output()
            .context("spawn curl")?;
        if !out.status.success() {
            bail!(
                "curl {argv:?} in the sandbox failed ({}): {}",
                out.status,
                self.redact(&out.stderr)
            );
        }
        let got = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut f = got.split_whitespace();
        let size: u64 = f.next().unwrap_or("").parse().unwrap_or(0);
        let secs: f64 = f.next().unwrap_or("").parse().unwrap_or(0.0);
        let want = u64::from(mb) * 1024 * 1024;
        ensure!(size == want, "downloaded {size} bytes, expected {want}");
        ensure!(secs > 0.0, "curl reported no time: {got:?}");
        Ok(size as f64 / 1e6 / secs)
    }

    /// curl in the sandbox, trusting only `ca`; fails unless it exits 0.
    fn curl(&self, ca: &std::path::Path, args: &[&str]) -> anyhow::Result<String> {
        let ca = ca.display().to_string();
        let mut all = vec!["--cacert", ca.as_str(), "--fail"];
        all.extend_from_slice(args);
        let out = self.sandbox.curl(&all)?;
        if !out.status.success() {
            bail!(
                "curl {args:?} in the sandbox failed ({}): {}",
                out.status,
                self.redact(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Text with the token replaced, for error messages.
    fn redact(&self, bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes)
            .trim()
            .replace(&self.token, "<TOKEN>")
    }

    /// Each path end to end: the body over HTTP/2 and over HTTP/1.1, and what the origin
    /// received as `Authorization`.
    fn check(&self, paths: &[Path]) -> anyhow::Result<()> {
        let bearer = format!("Bearer {}", self.token);
        for &path in paths {
            // The sandbox trusts egressd's CA on the proxied path (proving that egressd
            // answered, not the origin) and the test CA on the others.
            let ca = match path {
                Path::Egressd => &self.egressd_ca,
                _ => self.ca.cert(),
            };
            for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
                let got = self.curl(ca, &[flag, "-w", "\n%{http_version}", &path.url("/")])?;
                ensure!(
                    got == format!("{BODY}\n{version}"),
                    "curl {flag} {} in the sandbox: expected the origin's body over HTTP/{version}, got {:?}",
                    path.url("/"),
                    self.redact(got.as_bytes())
                );
            }
            let auth = self.curl(ca, &[&path.url(AUTH_PATH)])?;
            // Through egressd the origin's echo of the token comes back scrubbed (same
            // length, marker in place of the token), which also proves the origin got it.
            let scrubbed = format!(
                "Bearer {}",
                (0..self.token.len())
                    .map(|i| char::from(SCRUB_MARKER.get(i).copied().unwrap_or(b'*')))
                    .collect::<String>()
            );
            let want = match path {
                Path::Direct => "",
                Path::Egressd if self.scrub => scrubbed.as_str(),
                Path::Egressd | Path::Nginx | Path::Mitmproxy => bearer.as_str(),
            };
            if auth != want {
                bail!(
                    "via {}: the origin received Authorization {:?}, expected {:?}",
                    path.label(),
                    self.redact(auth.as_bytes()),
                    self.redact(want.as_bytes())
                );
            }
            println!(
                "  {:<8} {:<40} ok: HTTP/2 and HTTP/1.1, origin got {}",
                path.label(),
                path.url("/"),
                if want.is_empty() {
                    "no Authorization"
                } else {
                    "Authorization: Bearer <token>"
                }
            );
        }
        Ok(())
    }

    /// The pids of the proxy's processes on `path` (none on the direct path).
    fn proxy_pids(&self, path: Path) -> Vec<u32> {
        match path {
            Path::Direct => Vec::new(),
            Path::Egressd => self.daemon.pid().into_iter().collect(),
            Path::Nginx => self.reverse_proxy.iter().filter_map(Nginx::pid).collect(),
            Path::Mitmproxy => self
                .mitmproxy
                .as_ref()
                .and_then(Mitmproxy::pid)
                .into_iter()
                .collect(),
        }
    }

    /// The memory case ([`memory`]) through `path`.
    fn hold(&self, path: Path, n: u32) -> anyhow::Result<Held> {
        let pids = self.proxy_pids(path);
        ensure!(!pids.is_empty(), "no proxy on this path");
        let ca = match path {
            Path::Egressd => &self.egressd_ca,
            _ => self.ca.cert(),
        };
        memory::measure(
            &self.sandbox,
            self.dir.path(),
            &pids,
            path.host(),
            IpAddr::V4(path.ip()),
            ca,
            n,
        )
    }

    /// Runs `kind` for `secs` seconds from the sandbox via `path`.
    fn measure(&self, kind: Kind, path: Path, load: &Load, secs: u32) -> anyhow::Result<Sample> {
        let argv = kind.argv(load, secs, &path.url("/"));
        let proxy_pids = self.proxy_pids(path);
        let origin_pid = self.origin.pid();
        let proxy0 = cpu::processes(&proxy_pids);
        let origin0 = origin_pid.and_then(cpu::process);
        let client0 = cpu::children();
        let machine0 = cpu::machine_busy();
        let started = Instant::now();
        let mut cmd = self
            .sandbox
            .command_with_timeout(secs + 30, kind.tool(), &argv);
        let out: Output = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
        let wall = started.elapsed();
        let machine = cpu::machine_busy()
            .zip(machine0)
            .map(|(after, before)| after.saturating_sub(before));
        let client = cpu::children().saturating_sub(client0);
        let delta = |pid: Option<u32>, before: Option<Duration>| {
            Some(pid.and_then(cpu::process)?.saturating_sub(before?))
        };
        let proxy = cpu::processes(&proxy_pids)
            .zip(proxy0)
            .map(|(after, before)| after.saturating_sub(before));
        let origin = delta(origin_pid, origin0);
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "{} {} failed in the sandbox ({}): {}\n{stdout}",
                kind.tool(),
                argv.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let report = kind.parse(&stdout)?;
        Ok(Sample {
            report,
            wall,
            proxy,
            origin,
            client,
            machine,
        })
    }

    /// Prints where to look when a measurement saw errors.
    fn explain_errors(&self, path: Path) {
        let log = match path {
            Path::Direct => format!("origin error log:\n{}", tail(&self.origin.errors(), 10)),
            Path::Egressd => format!(
                "egressd log:\n{}",
                tail(&self.redact(self.daemon.log().as_bytes()), 10)
            ),
            Path::Mitmproxy => format!(
                "mitmproxy log:\n{}",
                tail(
                    &self
                        .mitmproxy
                        .as_ref()
                        .map(Mitmproxy::errors)
                        .unwrap_or_default(),
                    10
                )
            ),
            Path::Nginx => format!(
                "nginx error log:\n{}\norigin error log:\n{}",
                tail(
                    &self
                        .reverse_proxy
                        .iter()
                        .map(Nginx::errors)
                        .collect::<String>(),
                    10
                ),
                tail(&self.origin.errors(), 10)
            ),
        };
        eprintln!("  errors via {}; {log}", path.label());
    }
}

/// One measurement.
#[derive(Debug, Clone)]
struct Sample {
    report: Report,
    wall: Duration,
    /// CPU time of the proxy (none on the direct path), the origin, and the client.
    proxy: Option<Duration>,
    origin: Option<Duration>,
    client: Duration,
    /// CPU time the whole machine was busy.
    machine: Option<Duration>,
}

impl Sample {
    /// CPU time as cores busy over the measurement.
    fn cores(&self, cpu: Option<Duration>) -> Option<f64> {
        Some(cpu?.as_secs_f64() / self.wall.as_secs_f64().max(1e-9))
    }

    /// Proxy CPU microseconds per request.
    fn proxy_us_per_request(&self) -> Option<f64> {
        let requests = self.report.req_per_sec * self.wall.as_secs_f64();
        (requests > 0.0).then(|| self.proxy.map(|p| p.as_secs_f64() * 1e6 / requests))?
    }
}

/// Median of the values present (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The medians over rounds of one (kind, path).
#[derive(Debug, Default, Clone, Copy)]
struct Summary {
    req_per_sec: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    mean_ms: Option<f64>,
    errors: u64,
    requests: u64,
    proxy_cores: Option<f64>,
    origin_cores: Option<f64>,
    client_cores: Option<f64>,
    rest_cores: Option<f64>,
    proxy_us_per_req: Option<f64>,
}

fn summarize(samples: &[Sample]) -> Summary {
    let m = |f: &dyn Fn(&Sample) -> Option<f64>| median(samples.iter().filter_map(f).collect());
    Summary {
        req_per_sec: m(&|s| Some(s.report.req_per_sec)),
        p50_ms: m(&|s| s.report.p50_us.map(|u| u / 1e3)),
        p99_ms: m(&|s| s.report.p99_us.map(|u| u / 1e3)),
        mean_ms: m(&|s| s.report.mean_us.map(|u| u / 1e3)),
        errors: samples.iter().map(|s| s.report.errors).sum(),
        requests: samples.iter().map(|s| s.report.requests).sum(),
        proxy_cores: m(&|s| s.cores(s.proxy)),
        origin_cores: m(&|s| s.cores(s.origin)),
        client_cores: m(&|s| s.cores(Some(s.client))),
        rest_cores: m(&|s| {
            let ours = s.proxy.unwrap_or_default() + s.origin.unwrap_or_default() + s.client;
            s.cores(Some(s.machine?.saturating_sub(ours)))
        }),
        proxy_us_per_req: m(&|s| s.proxy_us_per_request()),
    }
}

fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.decimals$}"))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

fn print_report(
    args: &Args,
    paths: &[Path],
    load: &Load,
    samples: &[Vec<Vec<Sample>>],
    held: &[(Path, Held)],
    load_before: &str,
    busy_before: Option<f64>,
) {
    let sums: Vec<Vec<Summary>> = samples
        .iter()
        .map(|per_path| per_path.iter().map(|s| summarize(s)).collect())
        .collect();
    let build = if args.release { "release" } else { "debug" };
    let peers: Vec<Path> = paths
        .iter()
        .copied()
        .filter(|p| !matches!(p, Path::Direct | Path::Egressd))
        .collect();
    println!();
    println!(
        "HTTPS from inside the sandbox (its netns and cgroup) to one nginx origin; {} s per measurement, median of {} round(s)",
        args.duration, args.rounds
    );
    println!("  direct    sandbox -> origin ({DIRECT_IP}:443)");
    println!(
        "  egressd   sandbox -> {ORIGIN_IP}:443, redirected by the kernel -> egressd proxy ({build} build) -> origin ({ORIGIN_IP}:443); injects Authorization"
    );
    if peers.contains(&Path::Nginx) {
        println!(
            "  nginx     sandbox -> nginx reverse proxy ({NGINX_IP}:443) -> origin ({ORIGIN_IP}:443, keep-alive pool); injects Authorization"
        );
    }
    if peers.contains(&Path::Mitmproxy) {
        println!(
            "  mitmproxy sandbox -> mitmdump in reverse mode ({MITM_IP}:443) -> origin ({ORIGIN_IP}:443); an addon injects Authorization"
        );
    }
    let workers = args.proxy_workers();
    println!(
        "  CPU: {} cores shared by client, proxy and origin. egressd: {workers} proxy worker thread(s) \
         (EGRESSD_PROXY_THREADS, one tokio runtime each) + audit writer; nginx proxy: {workers} process(es) \
         (each master_process off{}), CPU summed; mitmproxy: 1 Python process; origin: 1 nginx process. \
         \"cores\" = CPU seconds / wall seconds; \"rest\" = the machine's busy time not charged to these \
         processes (kernel network work in softirq context, and anything else running).",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if workers > 1 { ", one reuseport address" } else { "" },
    );
    if !args.egressd_env.is_empty() {
        println!("  egressd environment: {}", args.egressd_env.join(" "));
    }
    println!(
        "  before measuring: {} cores busy over {IDLE_PROBE:?} (load average {})",
        num(busy_before, 2),
        load_before
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    if busy_before.is_some_and(|b| b > BUSY_WARNING) {
        println!(
            "  WARNING: something else was using the CPU before measuring; the figures are noisy"
        );
    }
    if !args.release {
        println!(
            "  NOTE: egressd is the unoptimised debug build; run with --release for figures comparable to nginx"
        );
    }
    if !held.is_empty() {
        println!();
        println!(
            "Held connections: idle TLS connections (HTTP/1.1, one request each) held through each proxy, then closed; proxy RSS in KiB",
        );
        println!(
            "  {:<9} {:>6} {:>9} {:>9} {:>14} {:>12} {:>14} {:>16} {:>16}",
            "path",
            "conns",
            "before",
            "held",
            "KiB per conn",
            format!("held +{:?}", memory::SETTLE),
            "KiB per conn",
            format!("+{:?} closed", memory::AFTER),
            format!("+{:?} closed", memory::LATER),
        );
        for (path, h) in held {
            println!(
                "  {:<9} {:>6} {:>9} {:>9} {:>14.1} {:>12} {:>14.1} {:>16} {:>16}",
                path.label(),
                h.connections,
                h.before_kib,
                h.held_kib,
                h.per_connection_kib(),
                h.settled_kib,
                h.settled_per_connection_kib(),
                h.after_kib,
                h.later_kib
            );
        }
    }
    if args.no_load {
        return;
    }
    let cols = |v: &dyn Fn(Path) -> String| -> String {
        paths.iter().map(|p| format!(" {:>11}", v(*p))).collect()
    };
    for (k, kind) in Kind::ALL.into_iter().enumerate() {
        if !args.kinds.contains(&kind) {
            continue;
        }
        println!();
        println!("{} ({})", kind.short(), kind.describe(load, args.duration));
        let lat = if kind.has_percentiles() {
            format!("{:>8} {:>8}", "p50 ms", "p99 ms")
        } else {
            format!("{:>17}", "mean ms")
        };
        println!(
            "  {:<9} {:>10} {lat} {:>7} {:>11} {:>12} {:>12} {:>13} {:>16}",
            "path",
            "req/s",
            "errors",
            "proxy cores",
            "origin cores",
            "client cores",
            "rest cores",
            "proxy CPU us/req"
        );
        for &path in paths {
            let s = &sums[k][path.index()];
            let lat = if kind.has_percentiles() {
                format!("{:>8} {:>8}", num(s.p50_ms, 2), num(s.p99_ms, 2))
            } else {
                format!("{:>17}", num(s.mean_ms, 2))
            };
            println!(
                "  {:<9} {:>10} {lat} {:>7} {:>11} {:>12} {:>12} {:>13} {:>16}",
                path.label(),
                num(s.req_per_sec, 0),
                s.errors,
                num(s.proxy_cores, 2),
                num(s.origin_cores, 2),
                num(s.client_cores, 2),
                num(s.rest_cores, 2),
                num(s.proxy_us_per_req, 1),
            );
        }
    }

    println!();
    let ratio_heads: String = peers
        .iter()
        .map(|p| format!(" {:>17}", format!("egressd/{}", p.label())))
        .collect();
    println!(
        "Summary {:<34}{}{ratio_heads} {:>14}",
        "",
        cols(&|p| p.label().to_owned()),
        "egressd/direct"
    );
    let row = |name: &str, get: &dyn Fn(&Summary) -> Option<f64>, k: usize, decimals: usize| {
        let value = |p: Path| get(&sums[k][p.index()]);
        let ratios: String = peers
            .iter()
            .map(|p| format!(" {:>17}", ratio(value(Path::Egressd), value(*p))))
            .collect();
        println!(
            "  {:<40}{}{ratios} {:>14}",
            name,
            cols(&|p| num(value(p), decimals)),
            ratio(value(Path::Egressd), value(Path::Direct))
        );
    };
    for (k, kind) in Kind::ALL.into_iter().enumerate() {
        if !args.kinds.contains(&kind) {
            continue;
        }
        row(kind.short(), &|s| s.req_per_sec, k, 0);
        if kind.has_percentiles() {
            row("  p50 latency ms", &|s| s.p50_ms, k, 2);
            row("  p99 latency ms", &|s| s.p99_ms, k, 2);
        } else {
            row("  mean request time ms", &|s| s.mean_ms, k, 2);
        }
        row("  proxy CPU us per request", &|s| s.proxy_us_per_req, k, 1);
    }
    let errors: u64 = sums.iter().flatten().map(|s| s.errors).sum();
    let requests: u64 = sums.iter().flatten().map(|s| s.requests).sum();
    println!("  errors (socket errors, timeouts, non-2xx): {errors} in {requests} requests");
}
