//! `cargo xtask bench ...`.
#[derive(clap::Subcommand)]
pub enum Which {
    /// connect() latency inside an attached sandbox versus outside.
    Connect,
}

pub fn run(_which: Which) -> anyhow::Result<()> {
    anyhow::bail!("benchmarks are not written yet")
}
