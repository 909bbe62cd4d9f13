//! `cargo xtask demo`.
pub fn run() -> anyhow::Result<()> {
    anyhow::bail!("the demo is not written yet")
}
