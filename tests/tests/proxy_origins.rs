//! The proxy tests' world without egressd: the HTTPS origins answer as the proxy tests
//! expect (the token is required, HTTP/2 works, git clones), and a sandbox's hosts file
//! names them. If these fail, the proxy tests' failures say nothing about the daemon.
//!
//! Needs root and nginx, openssl, curl and git; no daemon.

use std::net::IpAddr;

use anyhow::{ensure, Result};
use egress_tests::expect::all_output;
use egress_tests::hosts_file::HostsFile;
use egress_tests::https_origin::{
    basic, bearer, HttpsOrigin, API_V4, GIT_V4, MOVED_PATH, MOVED_TO, PINNED_BODY, REPO_BODY,
    REPO_FILE, UNAUTHORIZED_BODY,
};
use egress_tests::pki::{random_hex, spki_pin, TestCa};
use egress_tests::proxy_fixture::{sandbox_hosts, CLIENT_PATH};
use egress_tests::require_proxy_tools;
use egress_tests::util::TempDir;
use egress_tests::world::World;

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn origins_answer_directly_and_require_the_token() -> Result<()> {
    require_proxy_tools!();
    let token = format!("ghp_{}", random_hex(20)?);
    let ca = TestCa::new("origins")?;
    let world = World::new()?;
    let origin = HttpsOrigin::start(&world, &ca, &token)?;
    let cacert = ca.cert().display().to_string();
    let resolves: Vec<String> = sandbox_hosts()
        .iter()
        .map(|(ip, n)| format!("{n}:443:{ip}"))
        .collect();
    let curl = |args: &[&str]| -> Result<std::process::Output> {
        let mut all: Vec<&str> = vec!["-sS", "--max-time", "5", "--cacert", &cacert];
        for r in &resolves {
            all.extend(["--resolve", r.as_str()]);
        }
        all.extend_from_slice(args);
        Ok(world.command("curl", &all).output()?)
    };
    let auth = format!("Authorization: {}", bearer(&token));
    let wv = ["-w", "\n%{http_code} %{http_version}"];

    let url = "https://api.github.com/repos/acme/widgets";
    let o = curl(&[&[url][..], &wv].concat())?;
    ensure!(
        text(&o) == format!("{UNAUTHORIZED_BODY}\n401 2"),
        "no token must be 401: {}",
        all_output(&o)
    );
    let o = curl(&[&["--http1.1", "-H", &auth, url][..], &wv].concat())?;
    ensure!(
        text(&o) == format!("{REPO_BODY}\n200 1.1"),
        "with token over HTTP/1.1: {}",
        all_output(&o)
    );
    let o = curl(&[&["--http2", "-H", &auth, url][..], &wv].concat())?;
    ensure!(
        text(&o) == format!("{REPO_BODY}\n200 2"),
        "with token over HTTP/2: {}",
        all_output(&o)
    );
    let o = curl(&[
        "-H",
        "Authorization: Bearer stolen",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        url,
    ])?;
    ensure!(
        text(&o) == "401",
        "a wrong token must be 401: {}",
        all_output(&o)
    );
    let o = curl(&[
        "-H",
        &auth,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        &format!("https://api.github.com{MOVED_PATH}"),
    ])?;
    ensure!(
        text(&o) == format!("302 {MOVED_TO}"),
        "redirect: {}",
        all_output(&o)
    );
    let o = curl(&["https://pinned.example/"])?;
    ensure!(text(&o) == PINNED_BODY, "pinned: {}", all_output(&o));
    let pin = spki_pin(&origin.pinned_leaf().cert)?;
    let o = curl(&["--pinnedpubkey", &pin, "https://pinned.example/"])?;
    ensure!(
        text(&o) == PINNED_BODY,
        "pinned with pin: {}",
        all_output(&o)
    );
    let wrong_pin = spki_pin(&origin.leaf().cert)?;
    let o = curl(&["--pinnedpubkey", &wrong_pin, "https://pinned.example/"])?;
    ensure!(
        !o.status.success(),
        "a wrong pin must fail: {}",
        all_output(&o)
    );

    // The log records what arrived, Authorization included.
    let reqs = origin.requests()?;
    ensure!(reqs.len() == 7, "7 requests logged: {reqs:#?}");
    ensure!(
        reqs[0].authorization.is_empty() && reqs[0].status == 401,
        "{reqs:#?}"
    );
    ensure!(
        reqs[1].authorization == bearer(&token)
            && reqs[1].status == 200
            && reqs[1].sni == "api.github.com"
            && reqs[1].protocol == "HTTP/1.1",
        "{:#?}",
        reqs[1]
    );
    ensure!(reqs[2].protocol == "HTTP/2.0", "{:#?}", reqs[2]);
    ensure!(reqs[3].authorization == "Bearer stolen", "{:#?}", reqs[3]);

    // git smart HTTP, with the token given as git's own extra header.
    let dir = TempDir::new("git-direct")?;
    let dest = dir.path().join("widgets");
    let dest_s = dest.display().to_string();
    let clone = |extra: &[&str]| -> Result<std::process::Output> {
        let ca_cfg = format!("http.sslCAInfo={cacert}");
        let resolve = format!("http.curloptResolve=github.com:443:{GIT_V4}");
        let mut args: Vec<&str> = vec!["-c", &ca_cfg, "-c", &resolve];
        args.extend_from_slice(extra);
        args.extend([
            "clone",
            "-q",
            "https://github.com/acme/widgets.git",
            &dest_s,
        ]);
        let mut cmd = world.command("git", &args);
        cmd.env_clear()
            .env("PATH", CLIENT_PATH)
            .env("HOME", dir.path())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0");
        Ok(cmd.output()?)
    };
    let o = clone(&[])?;
    ensure!(
        !o.status.success() && all_output(&o).contains("could not read Username"),
        "clone without token must fail asking for credentials (401): {}",
        all_output(&o)
    );
    let header = format!("http.extraHeader=Authorization: {}", basic(&token));
    let o = clone(&["-c", &header])?;
    ensure!(
        o.status.success(),
        "clone with token: {}\n{}",
        all_output(&o),
        origin.error_logs()
    );
    let got = std::fs::read_to_string(dest.join(REPO_FILE.0))?;
    ensure!(got == REPO_FILE.1, "cloned file: {got:?}");
    Ok(())
}

#[test]
fn sandbox_hosts_file_names_the_origins() -> Result<()> {
    require_proxy_tools!();
    let world = World::new()?;
    let sb = world.add_sandbox("names")?;
    let path;
    {
        let hosts = HostsFile::new(sb.netns(), &sandbox_hosts())?;
        path = hosts.path().to_path_buf();
        let o = sb.run("getent", &["hosts", "api.github.com"])?;
        // Not in the file: fails at once (resolv.conf points at nothing).
        let t0 = std::time::Instant::now();
        let miss = sb.run("getent", &["hosts", "nowhere.example"])?;
        ensure!(
            !miss.status.success() && t0.elapsed() < std::time::Duration::from_secs(3),
            "unknown name: {:?} after {:?}",
            miss.status,
            t0.elapsed()
        );
        ensure!(
            text(&o).split_whitespace().next() == Some(&API_V4.to_string()[..]),
            "getent in the sandbox: {}",
            all_output(&o)
        );
        let ip: IpAddr = API_V4.into();
        ensure!(sandbox_hosts().iter().any(|(a, _)| *a == ip), "table");
    }
    ensure!(!path.exists(), "{} left behind", path.display());
    ensure!(
        path.parent().is_some_and(|p| !p.exists()),
        "{:?} left behind",
        path.parent()
    );
    Ok(())
}
