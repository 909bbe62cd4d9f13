//! Privileged end-to-end test harness for egressd.
//!
//! Builds the fake internet described in `/work/shared/TESTBED.md` out of network
//! namespaces, veth pairs and cgroup v2 directories, runs real servers and clients in it,
//! and drives the `egressd`/`egressctl` binaries. Every resource is owned by an RAII guard
//! whose `Drop` removes it, also when a test panics, so a second run on the same machine
//! starts clean. Names carry the test process id (`egress-test-<pid>-<n>-...`) so parallel
//! runs and other users of the machine never collide with us.
//!
//! The modules are public so that `xtask demo` can reuse the topology.
//!
//! Running (as root):
//!
//! ```text
//! cargo build -p agent-userspace
//! cargo test -p egress-tests -- --test-threads=2
//! ```
//!
//! Environment: `EGRESSD_BIN` / `EGRESSCTL_BIN` (binaries, default `target/debug/`),
//! `EGRESS_TEST_BPFFS_ROOT` (a bpffs directory to create per-daemon dirs under; default
//! `/sys/fs/bpf` if it is bpffs, else a private bpffs mount per daemon),
//! `EGRESS_TEST_PYTHON` (interpreter for the fixtures), `EGRESS_TEST_KEEP` (keep temp
//! dirs and print the daemon log). `tests/harness.rs` checks the harness itself and
//! needs no daemon. Skips (root, cgroup v2, bpffs, `ip`) print `SKIP ...` and pass.
//!
//! The proxy tests (`tests/proxy.rs`, and `tests/proxy_origins.rs` for their origins
//! without a daemon) also need nginx, openssl, curl and git ([`proxy_fixture`]); they
//! write `/etc/netns/<sandbox netns>/hosts` for name resolution ([`hosts_file`]).
//!
//! The git tests (`tests/git.rs`) need the same programs; their fixture
//! ([`git_fixture`]) adds a fake GitHub App token endpoint (`fixtures/token_endpoint.py`)
//! and a git origin that accepts the tokens it mints.
//!
//! The DNS tests (`tests/dns.rs`) also need dnsmasq, dig and curl: dnsmasq
//! ([`dns_server`]) is the world's authoritative server, and each sandbox's
//! `/etc/netns/<ns>/resolv.conf` names a world address nobody serves ([`dns_fixture`]),
//! so every answer a sandbox gets comes from egressd's resolver.
//!
//! The container tests (`tests/containers.rs`) also need runc and busybox (podman for
//! one): [`container`] builds an image from busybox-static (and Debian's curl with its
//! libraries), writes OCI bundles that join a sandbox's network namespace and run
//! `egressctl oci-hook`, and runs runc with a private state directory. `tests/deploy.rs`
//! checks the shipped manifests and unit (`kubernetes-validate` from `/opt/egressd-venv`,
//! `systemd-analyze`).
//!
//! A test process killed with SIGKILL cannot run its guards: its servers and daemons die
//! with it (`PR_SET_PDEATHSIG`), but namespaces, cgroups and bpffs dirs named
//! `egress-test-<pid>-*` remain and must be removed by hand.

pub mod audit;
pub mod cgroup;
pub mod container;
pub mod daemon;
pub mod dns_fixture;
pub mod dns_server;
pub mod expect;
pub mod fixture;
pub mod git_fixture;
pub mod hosts_file;
pub mod https_origin;
pub mod moto;
pub mod netns;
pub mod openbao;
pub mod pki;
pub mod proxy_fixture;
pub mod sandbox;
pub mod servers;
pub mod util;
pub mod world;

pub use util::skip_reason;

/// Returns early from a test (with `Ok(())`), printing the test and why, when `$why`
/// (an `Option<String>`) says the machine cannot run it.
#[macro_export]
macro_rules! skip_if {
    ($why:expr) => {
        if let Some(why) = $why {
            eprintln!(
                "SKIP {} ({}): {}",
                module_path!(),
                std::thread::current().name().unwrap_or("?"),
                why
            );
            return Ok(());
        }
    };
}

/// [`require_root!`], then also returns early (printing why) when a program the proxy
/// tests run (nginx, openssl, curl, git, getent) is missing.
#[macro_export]
macro_rules! require_proxy_tools {
    () => {
        $crate::require_root!();
        $crate::skip_if!($crate::proxy_fixture::missing_tools());
    };
}

/// [`require_root!`], then also returns early (printing why) when a program the DNS
/// tests run (dnsmasq, dig, curl) is missing.
#[macro_export]
macro_rules! require_dns_tools {
    () => {
        $crate::require_root!();
        $crate::skip_if!($crate::dns_server::missing_tools());
    };
}

/// Returns early from a test (with `Ok(())`) and prints why, when the machine cannot run
/// privileged tests: not root, no cgroup v2 mount, no bpf filesystem, no `ip`.
///
/// Use at the top of a test returning `anyhow::Result<()>`.
#[macro_export]
macro_rules! require_root {
    () => {
        $crate::skip_if!($crate::util::skip_reason());
    };
}
