//! The standard test setup: one World with one sandbox, the origin, the canary and a
//! running daemon, plus a temp dir for policy files.
//!
//! Field order is drop order: sandbox processes die first, then the daemon stops and its
//! pins are removed, then servers, namespaces and files go.

use std::path::PathBuf;

use anyhow::Result;

use crate::daemon::{Daemon, DaemonOpts};
use crate::sandbox::Sandbox;
use crate::servers::{Canary, Origin};
use crate::util::TempDir;
use crate::world::World;

/// A deny-by-default policy allowing TCP 80 to the origin (rule `web-origin`).
pub const WEB_ORIGIN_DENY: &str = r#"version: 1
default: deny
rules:
  - name: web-origin
    to: [192.0.2.10, "2001:db8::10"]
    ports: [80]
    protocol: tcp
    action: allow
"#;

/// Same rule, audit by default: anything else flows and is recorded as "audit".
pub const WEB_ORIGIN_AUDIT: &str = r#"version: 1
default: audit
rules:
  - name: web-origin
    to: [192.0.2.10, "2001:db8::10"]
    ports: [80]
    protocol: tcp
    action: allow
"#;

/// Deny everything (no rules).
pub const DENY_ALL: &str = "version: 1\ndefault: deny\nrules: []\n";

#[derive(Debug)]
pub struct Fixture {
    pub sandbox: Sandbox,
    pub daemon: Daemon,
    pub canary: Canary,
    pub origin: Origin,
    pub world: World,
    pub dir: TempDir,
}

impl Fixture {
    /// World + sandbox "sb" + origin + canary + daemon (nothing attached yet).
    pub fn new() -> Result<Self> {
        Self::with_opts(DaemonOpts::default())
    }

    pub fn with_opts(opts: DaemonOpts) -> Result<Self> {
        let dir = TempDir::new("fixture")?;
        let world = World::new()?;
        let origin = Origin::start(&world)?;
        let canary = Canary::start(&world)?;
        let sandbox = world.add_sandbox("sb")?;
        let daemon = Daemon::start(opts)?;
        Ok(Self {
            sandbox,
            daemon,
            canary,
            origin,
            world,
            dir,
        })
    }

    /// Writes a policy file into the fixture's temp dir.
    pub fn policy(&self, file: &str, yaml: &str) -> Result<PathBuf> {
        self.dir.write(file, yaml)
    }

    /// Writes `yaml` and attaches it to the sandbox under the sandbox's label; fails
    /// unless egressctl succeeds.
    pub fn attach(&self, yaml: &str) -> Result<PathBuf> {
        let p = self.policy("policy.yaml", yaml)?;
        self.daemon
            .attach_ok(&self.sandbox, &p, self.sandbox.label())?;
        Ok(p)
    }
}
