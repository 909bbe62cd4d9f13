//! `cargo xtask test`: the whole suite, in the order that fails fastest.
use std::fs;

use crate::cmd::{bin, build, cargo, require_root, run, step, workspace};

/// Seconds each fuzz target runs in the suite (`--fuzz`).
const CI_FUZZ_SECONDS: u64 = 3;

pub fn run_all(filter: Option<&str>, no_lint: bool, fuzz: bool) -> anyhow::Result<()> {
    require_root("the test suite")?;
    if !no_lint {
        step("cargo fmt --check");
        run(&mut cargo(&["fmt", "--all", "--", "--check"]))?;
        step("cargo clippy");
        // Linting needs no kernel object: without it the build script does not build the
        // eBPF programs a second time (clippy's build of the crate is separate).
        run(cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .env("AYA_BUILD_SKIP", "1"))?;
    }
    build()?;
    step("Unit tests");
    run(&mut cargo(&[
        "test",
        "--workspace",
        "--exclude",
        "egress-tests",
    ]))?;

    // The corpora were replayed by the unit tests above; with `--fuzz` each target also
    // gets a short coverage-guided run (the project's crates instrumented, no sanitizer).
    // Off by default: the instrumented build alone takes about two minutes of the CI
    // budget, and `cargo xtask fuzz` runs the targets for longer.
    if fuzz {
        crate::fuzz::run_fuzz(&crate::fuzz::Options {
            seconds: CI_FUZZ_SECONDS,
            target: None,
            deep: false,
            sanitizer: crate::fuzz::Sanitizer::None,
        })?;
    }

    step("Policy tests (every policies/*.yaml)");
    let mut files: Vec<_> = fs::read_dir(workspace().join("policies"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut ctl = std::process::Command::new(bin("egressctl"));
    ctl.args(["policy", "test"]).args(&files);
    run(&mut ctl)?;

    step("Privileged end-to-end tests (network namespaces, cgroups, real clients)");
    let mut e2e = cargo(&["test", "-p", "egress-tests", "--"]);
    e2e.args(["--test-threads=2"]);
    if let Some(f) = filter {
        e2e.arg(f);
    }
    e2e.env("EGRESSD_BIN", bin("egressd"))
        .env("EGRESSCTL_BIN", bin("egressctl"));
    run(&mut e2e)?;
    step("All tests passed");
    Ok(())
}
