//! Facts about addresses that several parts of the daemon judge alike: the
//! special-purpose address table ([`special`]).
pub mod special;

pub use special::{classify as special_address, explicitly_covers, Special};
