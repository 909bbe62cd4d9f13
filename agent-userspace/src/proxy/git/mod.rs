//! Git over smart HTTP, as the proxy speaks it: the push's command list read from the
//! request body (pkt-lines, plain or gzip) before any byte reaches the origin, judged by
//! the rule's [`GitRule`], and the status report the proxy answers with when a push is
//! refused, so that `git push` prints `! [remote rejected] ... (refused by egress policy:
//! ...)`. Which requests and refs a rule allows is the policy's ([`crate::policy::git`]).

mod inspect;
mod pkt;

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests;

pub(crate) use inspect::try_parse;
pub(super) use inspect::{inspect_push, PushOutcome};
pub use inspect::{Encoding, MAX_COMMAND_BYTES};
pub use pkt::{parse_commands, status_report, wants_report, MAX_PKT_LEN};

use crate::audit::GitAudit;
use crate::policy::git::GitRequest;

/// `Content-Type` of the proxy's own receive-pack answer.
pub const RECEIVE_PACK_RESULT: &str = "application/x-git-receive-pack-result";

/// The audit record's `git` part for a judged request, without ref updates yet.
pub fn audit_of(request: &GitRequest) -> GitAudit {
    GitAudit {
        repo: request.repo.clone(),
        service: request.service.as_str().to_owned(),
        ref_updates: Vec::new(),
    }
}
