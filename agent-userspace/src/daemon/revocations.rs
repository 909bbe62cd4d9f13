//! Credential revocations run in the background (a quarantine or a detach revokes the
//! leases no other sandbox needs), one `credential-revoke` record each, and what the
//! daemon's stop does to those still running: each credential whose revocation had not
//! ended gets a record saying it was not revoked, before `daemon-stop`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::task::JoinHandle;

use crate::audit::{AuditHandle, CredentialRevoke, Record};
use crate::credentials::CredentialStore;

/// Why a revocation the stop cut short has no outcome.
pub const STOPPED_BEFORE_REVOKED: &str =
    "not revoked: the daemon stopped before the revocation finished (the value may still be \
     live at its store)";

/// One sandbox's revocations, in order: those whose record is not written yet.
struct Running {
    task: JoinHandle<()>,
    sandbox: String,
    pending: Arc<Mutex<VecDeque<String>>>,
}

/// Why a revocation whose task failed has no outcome.
pub const FAILED_BEFORE_REVOKED: &str =
    "not revoked: the revocation stopped on an internal error (the value may still be live \
     at its store)";

/// Held by a revocation's task: if the task panics, each credential it had not recorded
/// yet is recorded as not revoked, since nothing else will (an abort at the stop is not a
/// panic: [`Revocations::finish`] records those).
struct PanicRecords {
    audit: AuditHandle,
    sandbox: String,
    pending: Arc<Mutex<VecDeque<String>>>,
}

impl Drop for PanicRecords {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for credential in std::mem::take(&mut *lock(&self.pending)) {
            tracing::error!(sandbox = %self.sandbox, %credential, "A revocation failed on an internal error");
            self.audit.emit(Record::CredentialRevoke(CredentialRevoke {
                time: OffsetDateTime::now_utc(),
                sandbox: self.sandbox.clone(),
                credential,
                revoked: false,
                reason: FAILED_BEFORE_REVOKED.to_owned(),
            }));
        }
    }
}

/// The revocations started and not known to have ended.
#[derive(Default)]
pub struct Revocations {
    running: Mutex<Vec<Running>>,
    /// [`Revocations::finish`] has begun: nothing more is started.
    finished: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations")
            .field("running", &lock(&self.running).len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Revocations {
    /// Revokes `names` one after another on `runtime`, each recorded as its revocation
    /// ends.
    pub fn start(
        &self,
        runtime: &tokio::runtime::Handle,
        store: Arc<CredentialStore>,
        audit: AuditHandle,
        sandbox: &str,
        names: &[String],
    ) {
        if names.is_empty() {
            return;
        }
        if self.finished.load(std::sync::atomic::Ordering::SeqCst) {
            for credential in names {
                audit.emit(Record::CredentialRevoke(CredentialRevoke {
                    time: OffsetDateTime::now_utc(),
                    sandbox: sandbox.to_string(),
                    credential: credential.clone(),
                    revoked: false,
                    reason: STOPPED_BEFORE_REVOKED.to_owned(),
                }));
            }
            return;
        }
        let pending = Arc::new(Mutex::new(names.iter().cloned().collect::<VecDeque<_>>()));
        let (list, left, who) = (names.to_vec(), pending.clone(), sandbox.to_string());
        let on_panic = PanicRecords {
            audit: audit.clone(),
            sandbox: who.clone(),
            pending: pending.clone(),
        };
        let task = runtime.spawn(async move {
            let _on_panic = on_panic;
            for credential in list {
                let outcome = store.revoke_for(&credential, &who).await;
                let (revoked, reason) = match outcome {
                    Ok(how) => (true, how),
                    Err(why) => (false, why),
                };
                if !revoked && store.drops_sessions(&credential) {
                    tracing::warn!(sandbox = %who, %credential, %reason, "STS session dropped, not revoked");
                } else if !revoked {
                    tracing::error!(sandbox = %who, %credential, %reason, "Revoking a credential failed");
                }
                // The record and the pending list change together (no await between), so
                // the stop, which waits for this task to end before it reads the list,
                // never records a credential twice or not at all.
                audit.emit(Record::CredentialRevoke(CredentialRevoke {
                    time: OffsetDateTime::now_utc(),
                    sandbox: who.clone(),
                    credential,
                    revoked,
                    reason,
                }));
                lock(&left).pop_front();
            }
        });
        let mut running = lock(&self.running);
        running.retain(|r| !r.task.is_finished());
        running.push(Running {
            task,
            sandbox: sandbox.to_string(),
            pending,
        });
    }

    /// At the daemon's stop: waits up to `within` for the revocations running to end,
    /// then stops the rest and records each credential whose revocation had not ended as
    /// not revoked. Returns how many were cut short.
    pub async fn finish(&self, audit: &AuditHandle, within: Duration) -> usize {
        self.finished
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let running = std::mem::take(&mut *lock(&self.running));
        let deadline = tokio::time::Instant::now() + within;
        while running.iter().any(|r| !r.task.is_finished())
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut cut = 0;
        for Running {
            task,
            sandbox,
            pending,
        } in running
        {
            if !task.is_finished() {
                task.abort();
                // Until the task is dropped it may still be writing a record.
                if tokio::time::timeout(Duration::from_secs(1), task)
                    .await
                    .is_err()
                {
                    tracing::error!(%sandbox, "A revocation did not stop; its credentials are recorded as not revoked");
                }
            }
            let left = std::mem::take(&mut *lock(&pending));
            for credential in left {
                tracing::warn!(%sandbox, %credential, "Daemon stopping: revocation cut short");
                audit.emit(Record::CredentialRevoke(CredentialRevoke {
                    time: OffsetDateTime::now_utc(),
                    sandbox: sandbox.clone(),
                    credential,
                    revoked: false,
                    reason: STOPPED_BEFORE_REVOKED.to_owned(),
                }));
                cut += 1;
            }
        }
        cut
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::audit::{AuditLog, AuditSink};

    /// A revocation's task that panics leaves a record for each credential it had not
    /// recorded; one that ends or is aborted leaves none of its own.
    #[tokio::test]
    async fn a_panicked_revocation_records_what_it_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (audit, task) = AuditLog::open(AuditSink::File(path.clone())).unwrap();
        let writer = tokio::spawn(task.run());
        let guard = |names: &[&str]| PanicRecords {
            audit: audit.clone(),
            sandbox: "sb".to_owned(),
            pending: Arc::new(Mutex::new(names.iter().map(|n| (*n).to_owned()).collect())),
        };
        let panicked = guard(&["vault-db", "github"]);
        let failed = tokio::spawn(async move {
            let _on_panic = panicked;
            // An internal error this test stands in for.
            let empty: Vec<u8> = Vec::new();
            std::hint::black_box(&empty)[std::hint::black_box(3)]
        })
        .await;
        assert!(failed.unwrap_err().is_panic());
        let ended = guard(&["other"]);
        tokio::spawn(async move { drop(ended) }).await.unwrap();
        drop(audit);
        writer.await.unwrap().unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        let records: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let revokes: Vec<_> = records
            .iter()
            .filter(|r| r["event"]["action"] == "credential-revoke")
            .collect();
        assert_eq!(revokes.len(), 2, "{text}");
        for (r, name) in revokes.iter().zip(["vault-db", "github"]) {
            assert_eq!(r["egress"]["sandbox"]["name"], "sb");
            assert_eq!(r["event"]["outcome"], "failure", "{r}");
            assert!(text.contains(name));
            assert!(r.to_string().contains("internal error"), "{r}");
        }
    }
}
