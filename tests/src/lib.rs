//! Privileged end-to-end test harness.
