//! egressd killed with SIGKILL: the pinned programs keep enforcing with no daemon, and a
//! restarted daemon re-adopts the sandbox, reports the gap, and drains the decisions the
//! kernel recorded while it was down.
//!
//! Needs root, cgroup v2, bpffs and the egressd binaries; skips otherwise.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use egress_tests::audit::{get, get_u64, summarize, Match};
use egress_tests::expect::{self, RECORD_TIMEOUT};
use egress_tests::fixture::{Fixture, WEB_ORIGIN_DENY};
use egress_tests::require_root;
use egress_tests::util::poll;
use egress_tests::world::{CANARY_V4, ORIGIN_V4};

#[test]
fn sigkill_keeps_enforcing_and_restart_readopts() -> Result<()> {
    require_root!();
    let mut fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    let name = fx.sandbox.label().to_string();
    let canary = IpAddr::V4(CANARY_V4);
    let origin = IpAddr::V4(ORIGIN_V4);
    let origin_url = format!("http://{ORIGIN_V4}/");

    expect::origin_body(&fx.sandbox.curl(&[&origin_url])?)?;
    expect::tcp_blocked(&fx.sandbox, &name, &fx.daemon, &fx.canary, canary, 9)?;
    let allow = Match::decision("allow", origin, 80).sandbox(&name);
    let allows_before = expect::records(&fx.daemon, &allow, 1)?.len();

    fx.daemon.kill9()?;
    ensure!(!fx.daemon.is_running(), "egressd survived SIGKILL");

    // No daemon: denies hold, allows still allowed. Distinct ports mark these attempts.
    expect::exit_code(
        &fx.sandbox.curl(&[&format!("http://{CANARY_V4}:443/")])?,
        expect::CURL_COULDNT_CONNECT,
    )?;
    expect::eperm(&fx.sandbox.probe("tcp-connect", canary, 443, &[])?)?;
    expect::eperm(&fx.sandbox.probe("udp-sendto", canary, 53, &[])?)?;
    expect::origin_body(&fx.sandbox.curl(&[&origin_url])?)?;
    expect::canary_silent(&fx.canary)?;

    fx.daemon.restart()?;

    let entry = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        fx.daemon.status_sandbox(&name)
    })?
    .context("restarted daemon does not list the sandbox")?;
    ensure!(
        get_u64(&entry, "cgroup_id") == Some(fx.sandbox.cgroup().id()),
        "re-adopted entry has the wrong cgroup: {entry}"
    );
    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::lifecycle("sandbox-adopt").sandbox(&name),
    )?;
    let start = fx.daemon.wait_for_record(RECORD_TIMEOUT, |r| {
        Match::lifecycle("daemon-start").matches(r)
            && get(r, "egress.gap").is_some_and(|g| !g.is_null())
    })?;
    eprintln!("daemon-start after SIGKILL: {start}");

    // Decisions taken while the daemon was down, drained from the pinned ring buffer.
    let down_deny = Match::decision("deny", canary, 443)
        .transport("tcp")
        .sandbox(&name);
    expect::records(&fx.daemon, &down_deny, 2)?;
    expect::records(
        &fx.daemon,
        &Match::decision("deny", canary, 53)
            .transport("udp")
            .sandbox(&name),
        1,
    )?;
    expect::records(&fx.daemon, &allow, allows_before + 1).with_context(|| {
        format!(
            "the allowed connect made while down is missing:{}",
            summarize(&fx.daemon.audit_records().unwrap_or_default())
        )
    })?;

    // And it keeps enforcing and recording after the restart.
    expect::tcp_blocked(&fx.sandbox, &name, &fx.daemon, &fx.canary, canary, 80)?;
    expect::origin_body(&fx.sandbox.curl(&[&origin_url])?)?;
    Ok(())
}

/// The pinned link directory of cgroup `id` (`<bpffs>/v<ABI>/links/<id>`).
fn links_dir(fx: &Fixture, id: u64) -> Result<std::path::PathBuf> {
    std::fs::read_dir(fx.daemon.bpffs().path())?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("links").join(id.to_string()))
        .find(|p| p.is_dir())
        .context("no pinned links for the sandbox's cgroup")
}

/// A sandbox attached by another build keeps that build's programs while no daemon runs;
/// a restarted daemon replaces every pinned link whose program is not its own, without
/// detaching. The other build is played by a link of the wrong program pinned under a
/// hook's name (the `sendmsg4` link as `connect4`): TCP connects are then not judged at
/// all until the daemon replaces it.
#[test]
fn a_restarted_daemon_replaces_programs_of_another_build() -> Result<()> {
    require_root!();
    let mut fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    let name = fx.sandbox.label().to_string();
    let canary = IpAddr::V4(CANARY_V4);
    let links = links_dir(&fx, fx.sandbox.cgroup().id())?;

    fx.daemon.kill9()?;
    std::fs::rename(links.join("sendmsg4"), links.join("connect4"))?;
    // The harness's own check that the stand-in leaves connects unjudged: a port the
    // policy refuses reaches the origin host, which has nothing there (not EPERM).
    let unjudged = fx
        .sandbox
        .probe("tcp-connect", IpAddr::V4(ORIGIN_V4), 81, &[])?;
    ensure!(
        unjudged.raw["errname"] == "ECONNREFUSED",
        "the stand-in program judged the connect: {}",
        unjudged.raw
    );

    fx.daemon.restart()?;
    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::lifecycle("sandbox-adopt").sandbox(&name),
    )?;
    ensure!(
        fx.daemon
            .log()
            .contains("Programs of another build replaced"),
        "no replacement logged:\n{}",
        fx.daemon.log()
    );
    expect::tcp_blocked(&fx.sandbox, &name, &fx.daemon, &fx.canary, canary, 9)?;
    expect::eperm(&fx.sandbox.probe("udp-sendto", canary, 53, &[])?)?;
    expect::eperm(
        &fx.sandbox
            .probe("tcp-connect", IpAddr::V4(ORIGIN_V4), 81, &[])?,
    )?;
    expect::origin_body(&fx.sandbox.curl(&[&format!("http://{ORIGIN_V4}/")])?)?;
    expect::canary_silent(&fx.canary)?;

    // A daemon of the same build replaces nothing.
    fx.daemon.kill9()?;
    fx.daemon.restart()?;
    expect::records(
        &fx.daemon,
        &Match::lifecycle("sandbox-adopt").sandbox(&name),
        2,
    )?;
    let replaced = fx
        .daemon
        .log()
        .matches("Programs of another build replaced")
        .count();
    ensure!(replaced == 1, "{replaced} replacements logged");
    Ok(())
}

/// Pinned links whose sandbox the state no longer lists (the state file was lost) keep
/// their cgroup confined, denying everything: the kernel entry is rewritten, so the old
/// policy slot (which a new sandbox may get) no longer applies.
#[test]
fn a_cgroup_pinned_without_a_sandbox_record_denies_everything() -> Result<()> {
    require_root!();
    let mut fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    let origin_url = format!("http://{ORIGIN_V4}/");
    expect::origin_body(&fx.sandbox.curl(&[&origin_url])?)?;

    fx.daemon.kill9()?;
    std::fs::remove_file(fx.daemon.state_dir().join("state.json"))?;
    fx.daemon.restart()?;
    // The old rules allowed the origin; now nothing is.
    origin_and_canary_refused_as(&fx, "unknown")?;
    // The trail says why the cgroup's traffic stopped.
    let id = fx.sandbox.cgroup().id().to_string();
    let rejected = fx.daemon.wait_for_record(RECORD_TIMEOUT, |r| {
        egress_tests::audit::action(r) == Some("policy-rejected")
            && egress_tests::audit::get_str(r, "error.message")
                .is_some_and(|m| m.contains(&format!("cgroup id {id} ")))
    })?;
    ensure!(
        egress_tests::audit::get_str(&rejected, "egress.sandbox.name") == Some("unknown")
            && egress_tests::audit::get_str(&rejected, "error.message")
                .is_some_and(|m| m.contains("denied everything")),
        "{rejected}"
    );
    // Detach by cgroup releases it.
    fx.daemon.ctl_ok([
        std::ffi::OsStr::new("detach"),
        std::ffi::OsStr::new("--cgroup"),
        fx.sandbox.cgroup().path().as_os_str(),
    ])?;
    expect::origin_body(&fx.sandbox.curl(&[&origin_url])?)?;
    Ok(())
}

/// The origin `WEB_ORIGIN_DENY` allows is refused (EPERM, and a deny record naming
/// sandbox `name`), and so is the canary (EPERM, record, nothing received).
fn origin_and_canary_refused_as(fx: &Fixture, name: &str) -> Result<()> {
    let p = fx
        .sandbox
        .probe("tcp-connect", IpAddr::V4(ORIGIN_V4), 80, &[])?;
    expect::eperm(&p)?;
    let rec = fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("deny", IpAddr::V4(ORIGIN_V4), 80),
    )?;
    ensure!(
        egress_tests::audit::get_str(&rec, "egress.sandbox.name") == Some(name),
        "{rec}"
    );
    expect::tcp_blocked(
        &fx.sandbox,
        name,
        &fx.daemon,
        &fx.canary,
        IpAddr::V4(CANARY_V4),
        9,
    )?;
    Ok(())
}

/// A stored policy the restarted daemon can no longer compile (an upgrade with a stricter
/// parser, a damaged state file) is reported in the trail, naming the sandbox, and the
/// sandbox is denied everything (what its slot learned from DNS would otherwise never
/// expire) until it is attached again.
#[test]
fn a_stored_policy_that_no_longer_compiles_is_recorded_and_denied() -> Result<()> {
    require_root!();
    let mut fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    fx.daemon.kill9()?;
    let state = fx.daemon.state_dir().join("state.json");
    let text = std::fs::read_to_string(&state)?;
    ensure!(
        text.contains("version: 1"),
        "no policy source in the state: {text}"
    );
    std::fs::write(&state, text.replace("version: 1", "version: 99"))?;
    fx.daemon.restart()?;
    let rec = fx
        .daemon
        .wait_for_match(RECORD_TIMEOUT, &Match::lifecycle("policy-rejected"))?;
    ensure!(
        egress_tests::audit::get_str(&rec, "egress.sandbox.name") == Some(fx.sandbox.label()),
        "{rec}"
    );
    ensure!(
        egress_tests::audit::get_str(&rec, "error.message")
            .is_some_and(|m| m.contains("no longer compiles at adoption")),
        "{rec}"
    );
    ensure!(
        egress_tests::audit::get_str(&rec, "error.message")
            .is_some_and(|m| m.contains("denied everything until it is attached again")),
        "{rec}"
    );
    // The origin the policy allowed is refused now, in the sandbox's name.
    origin_and_canary_refused_as(&fx, fx.sandbox.label())?;
    // Attached again, the sandbox is served by its policy.
    fx.attach(WEB_ORIGIN_DENY)?;
    expect::origin_body(&fx.sandbox.curl(&[&format!("http://{ORIGIN_V4}/")])?)?;
    Ok(())
}

/// A resolver for the sandbox (upstream never asked here).
const RESOLVER_POLICY: &str = r#"version: 1
default: deny
dns:
  upstream: [192.0.2.53]
rules:
  - name: origin
    to: [origin.example]
    ports: [80]
    action: allow
"#;

/// The kernel also picks ports by itself (`bind()` to port 0, `listen()` or `connect()`
/// on an unbound socket), where no bind hook sees it. In a namespace whose local port
/// range covers the resolver's port, a sandbox could take that port so while the daemon
/// is away and receive the DNS the kernel still redirects there: the daemon reserves its
/// listeners' ports in the sandbox's namespace, and the restarted daemon gets its port.
#[test]
fn a_listeners_port_is_never_the_kernels_choice_for_a_sandbox() -> Result<()> {
    require_root!();
    let mut fx = Fixture::new()?;
    let policy = fx.policy("policy.yaml", RESOLVER_POLICY)?;
    let name = fx.sandbox.label().to_string();
    fx.daemon.attach_in_netns_ok(&fx.sandbox, &policy, &name)?;
    let listening = |fx: &Fixture| -> Result<Option<u16>> {
        let out = fx.sandbox.netns().command(10, "ss", &["-Hlnu"]).output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .find_map(|w| w.strip_prefix("127.0.0.1:")?.parse().ok()))
    };
    let port = listening(&fx)?.context("no resolver listening on the sandbox's loopback")?;
    let reserved = fx
        .sandbox
        .netns()
        .command(10, "cat", &["/proc/sys/net/ipv4/ip_local_reserved_ports"])
        .output()?;
    let reserved = String::from_utf8_lossy(&reserved.stdout).trim().to_string();
    ensure!(
        reserved.split(',').any(|r| {
            let (lo, hi) = r.split_once('-').unwrap_or((r, r));
            matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&port))
        }),
        "resolver port {port} not reserved in the sandbox's namespace: {reserved:?}"
    );

    // The sandbox's namespace lets the kernel choose only that port; the daemon is away.
    let range = fx
        .sandbox
        .netns()
        .command(
            10,
            "sysctl",
            &[
                "-qw",
                &format!("net.ipv4.ip_local_port_range={port} {port}"),
            ],
        )
        .status()?;
    ensure!(
        range.success(),
        "setting the sandbox's local port range failed"
    );
    fx.daemon.kill9()?;
    let take = "import socket\n\
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
        try:\n    s.bind(('127.0.0.1', 0))\n    print('took', s.getsockname()[1])\n\
        except OSError as e:\n    print('refused', e.errno)\n";
    let out = fx.sandbox.run("python3", &["-c", take])?;
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        said.starts_with("refused"),
        "the sandbox got a port from the kernel in a range of only {port}: {said:?}"
    );

    // Back: the resolver has its port again and answers for the sandbox.
    fx.daemon.restart()?;
    poll(Duration::from_secs(10), Duration::from_millis(100), || {
        fx.daemon.status_sandbox(&name)
    })?
    .context("restarted daemon does not list the sandbox")?;
    let back = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        Ok(listening(&fx)?.filter(|p| *p == port))
    })?;
    ensure!(
        back == Some(port),
        "the restarted daemon's resolver is not on {port}"
    );
    Ok(())
}

/// A policy replaced by one that needs a resolver whose port another process of the
/// namespace holds (outside the sandbox, where the bind hook does not look): the kernel
/// already sends the sandbox's DNS there, and the trail says the resolver did not start.
#[test]
fn a_resolver_that_does_not_start_on_replacement_is_recorded() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    let name = fx.sandbox.label().to_string();
    let attach = |file: &str, yaml: &str| -> Result<std::process::Output> {
        let policy = fx.policy(file, yaml)?;
        fx.daemon.ctl([
            "attach".as_ref(),
            "--cgroup".as_ref(),
            fx.sandbox.cgroup().path().as_os_str(),
            "--policy".as_ref(),
            policy.as_os_str(),
            "--name".as_ref(),
            name.as_ref(),
            "--netns".as_ref(),
            fx.sandbox.netns().path().as_os_str(),
        ])
    };
    let out = attach("names.yaml", RESOLVER_POLICY)?;
    ensure!(out.status.success(), "attach failed: {out:?}");
    let ss = fx.sandbox.netns().command(10, "ss", &["-Hlnu"]).output()?;
    let port: u16 = String::from_utf8_lossy(&ss.stdout)
        .split_whitespace()
        .find_map(|w| w.strip_prefix("127.0.0.1:")?.parse().ok())
        .context("no resolver listening")?;
    // Without names the resolver stops; another process of the namespace takes its port.
    let out = attach("none.yaml", egress_tests::fixture::DENY_ALL)?;
    ensure!(out.status.success(), "replacement failed: {out:?}");
    let squat = format!(
        "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('127.0.0.1', {port}))\nprint('bound', flush=True)\ntime.sleep(30)\n"
    );
    let child = fx
        .sandbox
        .netns()
        .spawn_command("python3", &["-c", &squat])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut squatter = egress_tests::util::ChildGuard::new(child, "squatter");
    poll(Duration::from_secs(5), Duration::from_millis(50), || {
        let ss = fx.sandbox.netns().command(10, "ss", &["-Hlnu"]).output()?;
        Ok(String::from_utf8_lossy(&ss.stdout)
            .contains(&format!("127.0.0.1:{port}"))
            .then_some(()))
    })?
    .context("the squatter did not bind")?;

    let out = attach("names-again.yaml", RESOLVER_POLICY)?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() && said.contains("DNS resolver did not start"),
        "{said}"
    );
    expect::policy_rejected(&fx.daemon, |n| n == name, &["DNS resolver did not start"])?;
    squatter.terminate(libc::SIGTERM, Duration::from_secs(5))?;
    Ok(())
}

/// Plays another build while no daemon runs: this build's pins, moved to another
/// version's directory (`v0`). Returns where they were and where they are.
fn pins_of_another_build(fx: &Fixture) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let base = fx.daemon.bpffs().path().to_path_buf();
    let ours = std::fs::read_dir(&base)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.join("links").is_dir())
        .context("no pinned layout")?;
    let older = base.join("v0");
    std::fs::rename(&ours, &older).context("moving the pins aside")?;
    Ok((ours, older))
}

/// A daemon of another ABI version pinned its links and maps under its own directory:
/// once this daemon has adopted the sandbox with its own programs, the other build's
/// links go (they would go on judging by rules no daemon updates), and with them its
/// directory. The other build is played by this build's pins, moved to another
/// version's directory while no daemon runs.
#[test]
fn another_builds_pins_are_retired_once_the_sandbox_is_adopted() -> Result<()> {
    require_root!();
    let mut fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    let name = fx.sandbox.label().to_string();
    let canary = IpAddr::V4(CANARY_V4);
    expect::eperm(&fx.sandbox.probe("tcp-connect", canary, 9, &[])?)?;

    fx.daemon.kill9()?;
    let (ours, older) = pins_of_another_build(&fx)?;
    // With no daemon, the moved links still confine.
    expect::eperm(&fx.sandbox.probe("tcp-connect", canary, 9, &[])?)?;

    fx.daemon.restart()?;
    poll(Duration::from_secs(10), Duration::from_millis(100), || {
        fx.daemon.status_sandbox(&name)
    })?
    .context("restarted daemon does not list the sandbox")?;
    ensure!(
        ours.join("links").is_dir(),
        "the daemon pinned no links of its own"
    );
    let gone = poll(Duration::from_secs(5), Duration::from_millis(100), || {
        Ok((!older.exists()).then_some(()))
    })?;
    ensure!(gone.is_some(), "the other build's pins are still there");
    // The refusal its programs recorded while no daemon ran went with its ring buffer:
    // it is reported as lost, under the build's name, not silently dropped.
    let lost = fx.daemon.wait_for_record(Duration::from_secs(10), |r| {
        egress_tests::audit::action(r) == Some("events-lost")
            && r["egress"]["lost"]["sandboxes"][0]["name"] == "build v0"
    })?;
    let count = get_u64(&lost, "egress.lost.count").unwrap_or(0);
    ensure!(
        count >= 1 && get_u64(&lost, "egress.lost.total").unwrap_or(0) >= count,
        "events-lost record without the other build's unread events: {lost}"
    );
    let status = fx.daemon.status_json()?;
    ensure!(
        status["events_lost"].as_u64().unwrap_or(0) >= count,
        "status does not count the other build's unread events: {status}"
    );
    // Still confined by this build's programs...
    expect::eperm(&fx.sandbox.probe("tcp-connect", canary, 9, &[])?)?;
    // ...and only by them: a policy that allows the canary now lets it through (the
    // other build's programs, had they stayed, would refuse it by their own rules).
    fx.attach(&format!(
        "{WEB_ORIGIN_DENY}  - name: canary\n    to: [{CANARY_V4}]\n    ports: [9]\n    protocol: tcp\n    action: allow\n"
    ))?;
    expect::probe_ok(&fx.sandbox.probe("tcp-connect", canary, 9, &[])?)?;
    Ok(())
}

/// What another build's programs could not even put in its ring buffer (full while no
/// daemon read it) is counted in that build's own loss counters, which go with its pins:
/// they are reported, by sandbox and under the build's name, when the pins are retired.
#[test]
fn another_builds_losses_are_reported_when_its_pins_are_retired() -> Result<()> {
    require_root!();
    let mut fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    let name = fx.sandbox.label().to_string();
    fx.daemon.kill9()?;
    pins_of_another_build(&fx)?;
    // More refusals than the ring buffer holds (about 37,000), while no daemon reads it.
    let connects = 60_000;
    let denied = fx
        .sandbox
        .refused_connects(&CANARY_V4.to_string(), 9, connects)?;
    ensure!(
        denied == connects,
        "{denied} of {connects} connects refused"
    );

    fx.daemon.restart()?;
    let tagged = format!("{name} (build v0)");
    let lost = fx.daemon.wait_for_record(Duration::from_secs(15), |r| {
        egress_tests::audit::action(r) == Some("events-lost")
            && r["egress"]["lost"]["sandboxes"][0]["name"] == tagged.as_str()
    })?;
    let count = get_u64(&lost, "egress.lost.count").unwrap_or(0);
    ensure!(
        count >= 10_000 && first_sandbox_count(&lost) == count,
        "the other build's losses are not all reported, by sandbox: {lost}"
    );
    // Its unread events too (the ring it filled), apart.
    let unread = fx.daemon.wait_for_record(Duration::from_secs(10), |r| {
        egress_tests::audit::action(r) == Some("events-lost")
            && r["egress"]["lost"]["sandboxes"][0]["name"] == "build v0"
    })?;
    let unread = get_u64(&unread, "egress.lost.count").unwrap_or(0);
    ensure!(
        unread + count == connects as u64,
        "{unread} unread and {count} lost, not the {connects} refusals made"
    );
    Ok(())
}

/// The count a loss record gives its first sandbox.
fn first_sandbox_count(rec: &serde_json::Value) -> u64 {
    rec["egress"]["lost"]["sandboxes"][0]["count"]
        .as_u64()
        .unwrap_or(0)
}

/// A second `egressd run` beside a running daemon (the unit running, an operator starting
/// one by hand) is refused before it changes anything: the first keeps its control socket,
/// its sandboxes and its audit numbering; a file named as the socket by mistake stays.
#[test]
fn a_second_daemon_on_the_same_state_is_refused() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    let before = fx.daemon.audit_records()?.len();
    let second = |socket: &std::path::Path, bpffs: &std::path::Path, state: &std::path::Path| {
        // Bounded: one that is not refused runs until it is stopped.
        egress_tests::util::bounded(
            20,
            egress_tests::daemon::egressd_bin(),
            &[
                "run".as_ref(),
                "--audit-log".as_ref(),
                fx.daemon.audit_log().as_os_str(),
                "--socket".as_ref(),
                socket.as_os_str(),
                "--bpffs".as_ref(),
                bpffs.as_os_str(),
                "--state-dir".as_ref(),
                state.as_os_str(),
            ],
        )
        .stdin(std::process::Stdio::null())
        .output()
    };
    let bpffs = fx.daemon.bpffs().path().to_path_buf();
    let out = second(&fx.daemon.socket(), &bpffs, &fx.daemon.state_dir())?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("another egressd") && err.contains("pid"),
        "a second daemon on the same state directory was not refused: {out:?}"
    );
    // Its own state directory, the same pins.
    let other = egress_tests::util::TempDir::new("second")?;
    let out = second(
        &other.path().join("sock"),
        &bpffs,
        &other.path().join("state"),
    )?;
    ensure!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("pinned programs"),
        "a second daemon on the same pins was not refused: {out:?}"
    );
    // A config file given as the socket: refused, and left as it was.
    let not_a_socket = other.path().join("egressd.yaml");
    std::fs::write(&not_a_socket, "proxy_port: 15001\n")?;
    let own_pins = egress_tests::daemon::BpffsDir::new()?;
    // (Its pins' directory not made yet, as after every boot: bpffs lives in memory.)
    let out = second(
        &not_a_socket,
        &own_pins.path().join("fresh"),
        &other.path().join("state2"),
    )?;
    ensure!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("not a socket")
            && std::fs::read_to_string(&not_a_socket)? == "proxy_port: 15001\n",
        "a file named as the socket was not left alone: {out:?}"
    );

    // The first daemon still answers, still holds its sandbox, and nothing was numbered
    // by another writer.
    ensure!(
        fx.daemon.status_sandbox(fx.sandbox.label())?.is_some(),
        "the running daemon lost its sandbox"
    );
    let after = fx.daemon.audit_records()?;
    ensure!(
        after.len() == before,
        "the refused daemons wrote to the audit log: {}",
        summarize(&after[before..])
    );
    Ok(())
}
