//! Network plumbing several parts of the daemon share: the special-purpose address table
//! ([`special`]), sockets from a chosen network namespace ([`dial`]), the TLS trust for
//! outgoing connections ([`tls`]), and both together ([`upstream`]). The proxy, the DNS
//! resolver and the credential sources all dial through here; none imports another.
pub mod dial;
pub mod special;
pub mod tls;
pub mod upstream;

pub use dial::Dialer;
pub use special::{classify as special_address, explicitly_covers, Special};
pub use tls::TrustError;
pub use upstream::{UpstreamError, UpstreamOptions};
