//! Running cargo and the built binaries, with a progress line per step.
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Instant,
};

use anyhow::{bail, Context};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Prints a progress line, with the time since the first one (so a slow step shows).
pub fn step(what: &str) {
    static FIRST: OnceLock<Instant> = OnceLock::new();
    let since = FIRST.get_or_init(Instant::now).elapsed().as_secs();
    eprintln!(
        "\x1b[1m==> {what}\x1b[0m  [{}:{:02}]",
        since / 60,
        since % 60
    );
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .current_dir(workspace())
        .status()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// A cargo command with the environment a developer's shell would give it: without the
/// variables `cargo run` set for the xtask itself, which some build scripts watch (ring's
/// watches `CARGO_MANIFEST_DIR`), so builds from here and by hand share their artifacts.
pub fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args(args);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || matches!(
                name.as_ref(),
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            )
        {
            c.env_remove(name.as_ref());
        }
    }
    c
}

pub fn bin(name: &str) -> PathBuf {
    bin_in(false, name)
}

/// A binary of the debug build, or of the release build when `release`.
pub fn bin_in(release: bool, name: &str) -> PathBuf {
    let profile = if release { "release" } else { "debug" };
    workspace().join("target").join(profile).join(name)
}

pub fn build() -> anyhow::Result<()> {
    step("Building egressd, egressctl and the test harness");
    run(&mut cargo(&["build", "--workspace", "--all-targets"]))?;
    generate_docs(false)
}

/// Writes the binaries' man pages and shell completions (generated from their command
/// lines by clap_mangen and clap_complete) under `target/<profile>/share/`:
/// `man/man1/egressd.1`, `completions/egressctl.bash`, `_egressctl` (zsh), `.fish`.
pub fn generate_docs(release: bool) -> anyhow::Result<()> {
    let profile = if release { "release" } else { "debug" };
    let share = workspace().join("target").join(profile).join("share");
    let man = share.join("man").join("man1");
    let completions = share.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    for name in ["egressd", "egressctl"] {
        let exe = bin_in(release, name);
        let output = |args: &[&str]| -> anyhow::Result<Vec<u8>> {
            let out = Command::new(&exe)
                .args(args)
                .output()
                .with_context(|| format!("running {} {args:?}", exe.display()))?;
            if !out.status.success() {
                bail!(
                    "{} {args:?} failed: {}",
                    exe.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(out.stdout)
        };
        std::fs::write(man.join(format!("{name}.1")), output(&["manpage"])?)?;
        for (shell, file) in [
            ("bash", format!("{name}.bash")),
            ("zsh", format!("_{name}")),
            ("fish", format!("{name}.fish")),
        ] {
            std::fs::write(completions.join(file), output(&["completions", shell])?)?;
        }
    }
    Ok(())
}

/// Only the daemon and the CLI.
pub fn build_bins() -> anyhow::Result<()> {
    build_bins_in(false)
}

/// Only the daemon and the CLI, in the debug or (when `release`) the release profile.
pub fn build_bins_in(release: bool) -> anyhow::Result<()> {
    let mut args = vec!["build", "-p", "agent-userspace", "--bins"];
    if release {
        step("Building egressd and egressctl (release)");
        args.push("--release");
    } else {
        step("Building egressd and egressctl");
    }
    run(&mut cargo(&args))?;
    generate_docs(release)
}

pub fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (it loads eBPF programs and makes network namespaces)");
    }
    Ok(())
}
