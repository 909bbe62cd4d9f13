//! Developer tasks: `cargo xtask build | test | fuzz | demo | demo-containers | bench connect | bench proxy`. Run through
//! `./dev.sh`, which first installs what is missing (scripts/setup.sh).
mod bench;
mod cmd;
mod demo;
mod demo_containers;
mod fuzz;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Build, test, demo and benchmark egressd")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the daemon, the CLI and the test harness.
    Build,
    /// Run every test: formatting, lints, unit tests, policy tests, privileged end-to-end tests.
    Test {
        /// Only run end-to-end tests whose name contains this.
        #[arg(long)]
        filter: Option<String>,
        /// Skip formatting and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Also give each fuzz target a short coverage-guided run (builds the instrumented
        /// fuzz targets; the corpora are replayed by the unit tests either way).
        #[arg(long)]
        fuzz: bool,
    },
    /// Build, make a sandbox and a small fake internet, confine it, and show the audit log.
    Demo,
    /// Confine runc and podman containers from their first instruction with the OCI hook.
    DemoContainers,
    /// Build the fuzz targets (fuzz/) with libFuzzer and run each from its seed corpus;
    /// fails on a crash, printing the input's path.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target (dns, git_push, http_target, tls_hello, policy_yaml, control).
        #[arg(long)]
        target: Option<String>,
        /// Instrument every crate (dependencies' parsers too), optimised, in target/fuzz/.
        #[arg(long)]
        deep: bool,
        /// `address` adds AddressSanitizer (with --deep, where the toolchain has its runtime).
        #[arg(long, value_enum, default_value_t = fuzz::Sanitizer::None)]
        sanitizer: fuzz::Sanitizer,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Command::Build => cmd::build(),
        Command::Test {
            filter,
            no_lint,
            fuzz,
        } => test::run_all(filter.as_deref(), no_lint, fuzz),
        Command::Demo => demo::run(),
        Command::DemoContainers => demo_containers::run(),
        Command::Fuzz {
            seconds,
            target,
            deep,
            sanitizer,
        } => fuzz::run_fuzz(&fuzz::Options {
            seconds,
            target,
            deep,
            sanitizer,
        }),
        Command::Bench { which } => bench::run(which),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
