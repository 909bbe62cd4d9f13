//! Builds the eBPF programs (crate `agent-ebpf`) for the BPF target and embeds the object.
//!
//! Two toolchains work: a rustup toolchain named `bpf` linked to Debian's `rustc-web` (whose
//! library source `rust-web-src` ships, so `-Z build-std=core` can run under
//! `RUSTC_BOOTSTRAP=1`), or a rustup nightly with the `rust-src` component. `scripts/setup.sh`
//! prepares the first. The choice is printed as a build warning.
use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=EGRESS_BPF_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        // Builds of the library alone (the fuzz targets, `cargo xtask fuzz`) need no kernel
        // programs; an empty object keeps the crate compiling, and loading it fails.
        let out = PathBuf::from(env::var("OUT_DIR")?).join("agent-ebpf");
        fs::write(&out, b"")?;
        println!(
            "cargo:warning=AYA_BUILD_SKIP is set: eBPF programs not built; this build cannot \
             load them"
        );
        return Ok(());
    }
    let toolchain = choose_toolchain()?;
    println!("cargo:warning=building eBPF programs with rustup toolchain `{toolchain}`");

    if toolchain != "nightly" {
        // Debian's rustc is a stable channel: allow -Z build-std for the eBPF build only.
        // SAFETY: the build script is single-threaded at this point.
        unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    // bpf-linker loads libLLVM at run time from LD_LIBRARY_PATH. Point it at the exact LLVM
    // the eBPF compiler uses, in a directory holding nothing else, so it cannot pick another
    // version that happens to sit beside it.
    if let Some(dir) = llvm_dir_for(&toolchain)? {
        let mut paths = vec![dir];
        if let Some(old) = env::var_os("LD_LIBRARY_PATH") {
            paths.extend(env::split_paths(&old));
        }
        // SAFETY: as above.
        unsafe { env::set_var("LD_LIBRARY_PATH", env::join_paths(paths)?) };
    }

    let package = aya_build::Package {
        name: "agent-ebpf",
        root_dir: "../agent-ebpf",
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain))
}

fn rustup(args: &[&str]) -> Option<String> {
    let out = Command::new("rustup").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn choose_toolchain() -> anyhow::Result<String> {
    if let Ok(t) = env::var("EGRESS_BPF_TOOLCHAIN") {
        return Ok(t);
    }
    let list = rustup(&["toolchain", "list"]).ok_or_else(|| {
        anyhow!("rustup is needed to build the eBPF programs; run scripts/setup.sh as root")
    })?;
    if list
        .lines()
        .any(|l| l.split_whitespace().next() == Some("bpf"))
    {
        return Ok("bpf".into());
    }
    if list.lines().any(|l| l.starts_with("nightly"))
        && rustup(&["component", "list", "--installed", "--toolchain", "nightly"])
            .is_some_and(|c| c.lines().any(|l| l.starts_with("rust-src")))
    {
        return Ok("nightly".into());
    }
    Err(anyhow!(
        "no toolchain can build the eBPF programs: run scripts/setup.sh as root (links Debian's \
         rustc-web as rustup toolchain `bpf`), or install a nightly with rust-src"
    ))
}

/// A directory containing only a link to the libLLVM the toolchain's rustc is linked with.
fn llvm_dir_for(toolchain: &str) -> anyhow::Result<Option<PathBuf>> {
    let Some(rustc) = rustup(&["which", "--toolchain", toolchain, "rustc"]) else {
        return Ok(None);
    };
    let out = Command::new("ldd")
        .arg(rustc.trim())
        .output()
        .context("running ldd")?;
    let ldd = String::from_utf8_lossy(&out.stdout);
    let Some(lib) = ldd
        .lines()
        .filter(|l| l.trim_start().starts_with("libLLVM"))
        .find_map(|l| {
            l.split("=>")
                .nth(1)?
                .split_whitespace()
                .next()
                .map(PathBuf::from)
        })
    else {
        return Ok(None);
    };
    let dir = PathBuf::from(env::var("OUT_DIR")?).join("llvm");
    fs::create_dir_all(&dir)?;
    let name = lib
        .file_name()
        .ok_or_else(|| anyhow!("odd libLLVM path {lib:?}"))?;
    let link = dir.join(name);
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link).with_context(|| format!("linking {link:?}"))?;
    Ok(Some(dir))
}
