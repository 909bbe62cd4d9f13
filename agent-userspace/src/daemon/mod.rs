//! The daemon: owns the loaded programs and maps, the persistent state, the control socket
//! and the audit trail, and keeps them consistent.
//!
//! Lock order: `Core` is one mutex; the event task and control handlers each hold it only
//! for map and state work, never across an await.
mod connections;
mod core;
mod credentials;
mod dns;
mod instance;
mod join;
pub mod log;
mod netns;
mod notify;
pub(crate) mod proxy;
mod revocations;
mod run;
mod state;

pub use instance::{claim_for, InstanceLock};
pub use run::{run, DaemonOptions};
pub use state::{QuarantineState, SandboxRecord, State};
