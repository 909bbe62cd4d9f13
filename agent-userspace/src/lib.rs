//! `egress`: the library behind `egressd` (the privileged daemon) and `egressctl`.
//!
//! Modules by concern: `policy` turns policy files into checked rules and kernel map
//! entries; `bpf` loads, pins and attaches the kernel programs and reads their events;
//! `dns` answers sandboxes' lookups for allowed names only; `net` holds the
//! special-purpose address table; `audit` writes the JSONL audit trail; `collector` ships
//! that trail to a syslog collector; `metrics` serves Prometheus metrics counted from it;
//! `observe` is the live, filtered view of the audit log; `alerts` applies the configured
//! response to each alert; `control` is the daemon's Unix-socket protocol; `daemon` ties
//! them together; `oci` is the container runtimes' hook. `fuzzing` holds the entry points
//! of the fuzz targets in `fuzz/`.
pub mod alerts;
pub mod audit;
pub mod bpf;
pub mod cgroup;
pub mod collector;
pub mod control;
pub mod credentials;
pub mod daemon;
pub mod dns;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod net;
pub mod observe;
pub mod oci;
pub mod own_file;
pub mod policy;
pub mod posture;
pub mod proxy;
pub mod text;
pub mod unique_keys;
