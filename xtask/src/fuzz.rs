//! `cargo xtask fuzz`: builds the fuzz targets of `fuzz/` with libFuzzer and runs each for
//! a while, starting from its committed seed corpus.
//!
//! Two builds:
//! - default: the debug profile, with SanitizerCoverage on the project's own crates only
//!   (`fuzz/sancov-rustc` as `RUSTC_WORKSPACE_WRAPPER`), so the dependencies the normal
//!   debug build compiled are reused; this is what CI runs.
//! - `--deep`: every crate instrumented (the parsers inside hickory-proto, rustls, the
//!   YAML and JSON decoders too), optimised, in `target/fuzz/`; with `--sanitizer
//!   address`, AddressSanitizer as well, when the toolchain ships its runtime.
//!
//! New inputs libFuzzer finds go to `target/fuzz-corpus/<target>/` (never committed);
//! a crashing input is written to `fuzz/artifacts/<target>/` and printed.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _};

use crate::cmd::{cargo, run, step, workspace};

/// The fuzz targets, as named in `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &[
    "dns",
    "git_push",
    "http_target",
    "tls_hello",
    "policy_yaml",
    "control",
];

/// What `cargo xtask fuzz` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    pub seconds: u64,
    pub target: Option<String>,
    pub deep: bool,
    pub sanitizer: Sanitizer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sanitizer {
    /// Coverage feedback only: panics, overflows, timeouts and memory blow-ups are found.
    None,
    /// AddressSanitizer too (`--deep` only; needs RUSTC_BOOTSTRAP=1 on a stable rustc).
    Address,
}

/// One target's run.
struct Outcome {
    target: &'static str,
    executions: u64,
    crash: Option<String>,
    seconds: f64,
}

pub fn run_fuzz(opts: &Options) -> anyhow::Result<()> {
    let targets: Vec<&'static str> = match &opts.target {
        Some(t) => match TARGETS.iter().find(|n| **n == t.as_str()) {
            Some(n) => vec![*n],
            None => bail!("no fuzz target `{t}` (targets: {})", TARGETS.join(", ")),
        },
        None => TARGETS.to_vec(),
    };
    let ws = workspace();
    let sanitizer = if opts.sanitizer == Sanitizer::Address && !opts.deep {
        eprintln!("xtask fuzz: --sanitizer address needs --deep (every crate instrumented); running with coverage only");
        Sanitizer::None
    } else if opts.sanitizer == Sanitizer::Address && !asan_runtime_present()? {
        eprintln!(
            "xtask fuzz: this toolchain ships no AddressSanitizer runtime \
             (librustc-*_rt.asan.a); running with coverage only"
        );
        Sanitizer::None
    } else {
        opts.sanitizer
    };
    let bin_dir = build(&ws, opts.deep, sanitizer)?;
    step(&format!(
        "Fuzzing {} target(s) for {} s each ({}, {})",
        targets.len(),
        opts.seconds,
        if opts.deep {
            "every crate instrumented"
        } else {
            "the project's crates instrumented"
        },
        match sanitizer {
            Sanitizer::None => "no sanitizer: coverage only",
            Sanitizer::Address => "AddressSanitizer",
        }
    ));
    let mut outcomes = Vec::new();
    for target in targets {
        outcomes.push(fuzz_one(&ws, &bin_dir, target, opts.seconds)?);
    }
    eprintln!(
        "\n{:<12} {:>12} {:>8}  crash",
        "target", "executions", "seconds"
    );
    for o in &outcomes {
        eprintln!(
            "{:<12} {:>12} {:>8.1}  {}",
            o.target,
            o.executions,
            o.seconds,
            o.crash.as_deref().unwrap_or("none")
        );
    }
    let crashed: Vec<&Outcome> = outcomes.iter().filter(|o| o.crash.is_some()).collect();
    if !crashed.is_empty() {
        bail!(
            "{} fuzz target(s) crashed: {}",
            crashed.len(),
            crashed
                .iter()
                .map(|o| format!("{} ({})", o.target, o.crash.as_deref().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Builds every target; returns the directory holding the binaries.
fn build(ws: &Path, deep: bool, sanitizer: Sanitizer) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo(&[
        "build",
        "-p",
        "egress-fuzz",
        "--features",
        "libfuzzer",
        "--bins",
    ]);
    // The library's eBPF object is not needed to fuzz parsers; an empty one stands in.
    cmd.env("AYA_BUILD_SKIP", "1");
    let bin_dir = if deep {
        let host = host_triple()?;
        let mut flags = vec![
            "-Cpasses=sancov-module",
            "-Cllvm-args=-sanitizer-coverage-level=4",
            "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
            "-Cllvm-args=-sanitizer-coverage-pc-table",
            "-Cllvm-args=-sanitizer-coverage-trace-compares",
            "-Cdebug-assertions",
            "-Coverflow-checks",
            "-Cdebuginfo=1",
        ];
        if sanitizer == Sanitizer::Address {
            flags.push("-Zsanitizer=address");
            cmd.env("RUSTC_BOOTSTRAP", "1");
        }
        // With an explicit --target, RUSTFLAGS reach the target's crates but not build
        // scripts and proc macros, which run on the host uninstrumented.
        cmd.args(["--release", "--target", &host, "--target-dir"])
            .arg(ws.join("target").join("fuzz"))
            .env("RUSTFLAGS", flags.join(" "))
            .env_remove("CARGO_ENCODED_RUSTFLAGS");
        step("Building the fuzz targets (--deep: every crate instrumented, optimised)");
        ws.join("target").join("fuzz").join(host).join("release")
    } else {
        cmd.env(
            "RUSTC_WORKSPACE_WRAPPER",
            ws.join("fuzz").join("sancov-rustc"),
        );
        step("Building the fuzz targets (the project's crates instrumented, debug profile)");
        ws.join("target").join("debug")
    };
    let started = Instant::now();
    run(&mut cmd)?;
    eprintln!(
        "xtask fuzz: built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(bin_dir)
}

fn fuzz_one(
    ws: &Path,
    bin_dir: &Path,
    target: &'static str,
    seconds: u64,
) -> anyhow::Result<Outcome> {
    let work = ws.join("target").join("fuzz-corpus").join(target);
    let seeds = ws.join("fuzz").join("corpus").join(target);
    let artifacts = ws.join("fuzz").join("artifacts").join(target);
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&artifacts)?;
    let mut prefix = artifacts.into_os_string();
    prefix.push("/");
    let started = Instant::now();
    let out = Command::new(bin_dir.join(target))
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        // One input may take at most 10 s and 2 GiB: more is a finding too.
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-max_len=65536")
        .arg({
            let mut a = std::ffi::OsString::from("-artifact_prefix=");
            a.push(&prefix);
            a
        })
        .arg(&work)
        .arg(&seeds)
        .current_dir(ws)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running fuzz target {target}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    // The final stats; after a crash there are none, and the last status line counts.
    let executions = log
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok())
        .or_else(|| {
            log.lines().rev().find_map(|l| {
                let n = l.strip_prefix('#')?.split_whitespace().next()?;
                n.parse().ok()
            })
        })
        .unwrap_or(0);
    let crash = if out.status.success() {
        None
    } else {
        // libFuzzer names the file it wrote: "Test unit written to <path>".
        let written = log.lines().find_map(|l| {
            l.split_once("Test unit written to ")
                .map(|(_, p)| p.trim().to_owned())
        });
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!(
            "--- {target} failed ({}); last lines of its log:\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        Some(written.unwrap_or_else(|| format!("exited with {}", out.status)))
    };
    Ok(Outcome {
        target,
        executions,
        crash,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn host_triple() -> anyhow::Result<String> {
    let out = cargo_rustc(&["-vV"])?;
    out.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV printed no host")
}

/// Whether the sysroot has rustc's AddressSanitizer runtime.
fn asan_runtime_present() -> anyhow::Result<bool> {
    let dir = cargo_rustc(&["--print", "target-libdir"])?;
    Ok(std::fs::read_dir(dir.trim())
        .map(|d| {
            d.filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().ends_with("_rt.asan.a"))
        })
        .unwrap_or(false))
}

fn cargo_rustc(args: &[&str]) -> anyhow::Result<String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .args(args)
        .output()
        .with_context(|| format!("running {rustc}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
