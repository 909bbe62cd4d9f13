//! The JSONL audit trail.
