//! The daemon's persistent state: which sandboxes it confines, with the policy text each
//! was attached with, so a restarted daemon can re-adopt them. Written atomically
//! (temporary file + rename) on every change and on a heartbeat.
use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Writes the state file one write at a time, and never an older snapshot over a newer
/// one: a snapshot is numbered when it is taken (under the daemon's lock, so in the order
/// of the changes), and written only if no later one has been. So a write may leave the
/// daemon's lock (the heartbeat's, every few seconds, whose `fsync` a slow disk can hold
/// up) without undoing a change saved meanwhile.
#[derive(Debug, Default)]
pub struct StateSaver {
    taken: std::sync::atomic::AtomicU64,
    written: std::sync::Mutex<u64>,
}

impl StateSaver {
    /// The number of a snapshot taken now.
    pub fn number(&self) -> u64 {
        self.taken.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
    }

    /// Writes `state`, snapshot `number`, unless a later one was written: `Ok(false)`.
    pub fn write(&self, number: u64, state: &State, dir: &Path) -> anyhow::Result<bool> {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        if *written >= number {
            return Ok(false);
        }
        state.save(dir)?;
        *written = number;
        Ok(true)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SandboxRecord {
    pub name: String,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    /// Index for counters and events.
    pub index: u32,
    /// Policy slot in force.
    pub slot: u32,
    pub policy_path: String,
    pub policy_source: String,
    pub policy_digest: String,
    pub attached_at: String,
    /// Network namespace the proxy listener was bound in, when given at attach.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// Inode of that namespace when it was given, so a reused `/proc/PID/ns/net` path
    /// (the process gone, its pid taken by another) is never taken for it.
    #[serde(default)]
    pub netns_inode: Option<u64>,
    /// Set while the sandbox is quarantined (deny-all); a restarted daemon keeps it so.
    #[serde(default)]
    pub quarantine: Option<QuarantineState>,
}

/// Why and since when a sandbox is quarantined.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QuarantineState {
    /// RFC 3339.
    pub since: String,
    /// `operator`, or the alert kind whose response it was.
    pub trigger: String,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    #[serde(default)]
    pub sandboxes: BTreeMap<String, SandboxRecord>,
    /// Last heartbeat of the daemon that wrote this state (RFC 3339).
    #[serde(default)]
    pub last_seen: Option<String>,
    /// Whether that daemon stopped cleanly.
    #[serde(default)]
    pub clean_shutdown: bool,
    /// Kernel event losses already reported in the audit log.
    #[serde(default)]
    pub lost_reported: u64,
    /// The same by sandbox index (the kernel's per-sandbox loss counters).
    #[serde(default)]
    pub lost_reported_by_index: std::collections::BTreeMap<u32, u64>,
    /// The ABI version of the pinned maps whose counters those are (`None`: written by a
    /// build that did not say).
    #[serde(default)]
    pub lost_layout: Option<u32>,
    /// What was reported of another build's counters when this build's maps were made,
    /// for when that build's pins are retired.
    #[serde(default)]
    pub lost_previous: Option<LostCounts>,
    /// The policy slot given last: the next is searched for after it.
    #[serde(default)]
    pub last_slot: u32,
}

impl State {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("state.json")
    }

    pub fn load(dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = Self::path(dir);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(|e| {
                anyhow::anyhow!("{}: corrupt state file: {e}", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
        }
    }

    /// Writes the file: only [`StateSaver`] does, so that writes never race.
    fn save(&self, dir: &Path) -> anyhow::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let path = Self::path(dir);
        let tmp = dir.join(".state.json.tmp");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        Ok(())
    }

    pub fn by_cgroup(&self, cgroup_id: u64) -> Option<&SandboxRecord> {
        self.sandboxes.values().find(|s| s.cgroup_id == cgroup_id)
    }

    pub fn by_index(&self, index: u32) -> Option<&SandboxRecord> {
        self.sandboxes.values().find(|s| s.index == index)
    }

    /// Smallest index in 1..max used by no sandbox and not `reserved` (recently detached).
    pub fn free_index(&self, max: u32, reserved: &[u32]) -> Option<u32> {
        (1..max).find(|i| !reserved.contains(i) && !self.sandboxes.values().any(|s| s.index == *i))
    }

    /// Gives a slot in 1..max used neither by a sandbox nor in `busy`: the first after
    /// the one given last, round the ring. A slot just freed (the one a replaced policy
    /// had) is thus the last to be given again, so a redirect made under it is not taken
    /// for one made under a later policy in the same slot.
    pub fn free_slot(&mut self, max: u32, busy: &[u32]) -> Option<u32> {
        let in_use = |i: &u32| busy.contains(i) || self.sandboxes.values().any(|s| s.slot == *i);
        let last = self.last_slot.min(max.saturating_sub(1));
        let found = (last + 1..max).chain(1..=last).find(|i| !in_use(i))?;
        self.last_slot = found;
        Some(found)
    }
}

/// Kernel losses reported of one build's maps.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LostCounts {
    /// Its ABI version (`None`: written by a build that did not say).
    pub layout: Option<u32>,
    pub total: u64,
    pub by_index: BTreeMap<u32, u64>,
}

impl State {
    /// At start: the reported loss counts become this build's (`abi`). When its maps were
    /// made now (`fresh`), those reported so far are another build's (or of maps gone
    /// with a reboot): kept aside for when that build's pins are retired, and this
    /// build's start at 0.
    pub fn start_lost_counts(&mut self, abi: u32, fresh: bool) {
        if fresh {
            if self.lost_layout != Some(abi)
                && (self.lost_reported > 0 || !self.lost_reported_by_index.is_empty())
            {
                self.lost_previous = Some(LostCounts {
                    layout: self.lost_layout,
                    total: self.lost_reported,
                    by_index: std::mem::take(&mut self.lost_reported_by_index),
                });
            }
            self.lost_reported = 0;
            self.lost_reported_by_index.clear();
        }
        self.lost_layout = Some(abi);
    }

    /// The losses another build's counters (ABI `abi`: `total`, and by sandbox index)
    /// hold that no record reported: their increase over what was reported of them (kept
    /// aside when this build's maps were made), all of them when what was reported is
    /// not known to be theirs (reported again rather than lost).
    pub fn unreported_lost(
        &mut self,
        abi: u32,
        total: u64,
        by_index: &[(u32, u64)],
    ) -> (u64, Vec<(u32, u64)>) {
        let baseline = match self.lost_previous.take() {
            Some(p) if p.layout.is_none_or(|v| v == abi) => p,
            other => {
                self.lost_previous = other;
                LostCounts::default()
            }
        };
        let by = by_index
            .iter()
            .filter_map(|&(index, lost)| {
                let reported = baseline.by_index.get(&index).copied().unwrap_or(0);
                let new = if lost >= reported {
                    lost - reported
                } else {
                    lost
                };
                (new > 0).then_some((index, new))
            })
            .collect();
        (total.saturating_sub(baseline.total), by)
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    /// A snapshot written late (the heartbeat's, off the lock) never replaces one taken
    /// after it and written first (an attach's).
    #[test]
    fn an_older_snapshot_is_not_written_over_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let saver = super::StateSaver::default();
        let at = |s: &str| super::State {
            last_seen: Some(s.to_owned()),
            ..super::State::default()
        };
        let (older, newer) = (saver.number(), saver.number());
        assert!(saver.write(newer, &at("newer"), dir.path()).unwrap());
        assert!(!saver.write(older, &at("older"), dir.path()).unwrap());
        let read = super::State::load(dir.path()).unwrap().unwrap();
        assert_eq!(read.last_seen.as_deref(), Some("newer"));
        // A later one is written.
        let latest = saver.number();
        assert!(saver.write(latest, &at("latest"), dir.path()).unwrap());
        let read = super::State::load(dir.path()).unwrap().unwrap();
        assert_eq!(read.last_seen.as_deref(), Some("latest"));
    }

    /// Another build's loss counters are reported by their increase over what was
    /// reported of them, kept aside when this build's maps were made; whole when that
    /// is not known to be theirs. A restart of the same build keeps counting.
    #[test]
    fn another_builds_losses_are_reported_once() {
        let reported = || super::State {
            lost_reported: 10,
            lost_reported_by_index: [(1, 4), (2, 6)].into_iter().collect(),
            ..super::State::default()
        };
        let counters = [(1, 9), (2, 6), (3, 2)];
        // Written by a build that did not say whose (v2's, retired later).
        let mut state = reported();
        state.start_lost_counts(3, true);
        assert_eq!((state.lost_reported, state.lost_layout), (0, Some(3)));
        assert_eq!(
            state.unreported_lost(2, 17, &counters),
            (7, vec![(1, 5), (3, 2)])
        );
        // Once only: what is left is reported whole.
        assert_eq!(
            state.unreported_lost(2, 17, &counters),
            (17, counters.to_vec())
        );
        // Counts of another layout than the one retired: reported whole.
        let mut state = reported();
        state.lost_layout = Some(1);
        state.start_lost_counts(3, true);
        assert_eq!(
            state.unreported_lost(2, 17, &counters),
            (17, counters.to_vec())
        );
        // The same build restarted (its maps kept): its counts go on.
        let mut state = reported();
        state.lost_layout = Some(3);
        state.start_lost_counts(3, false);
        assert_eq!((state.lost_reported, state.lost_previous), (10, None));
    }

    use super::*;

    fn with_slot(slot: u32) -> State {
        let mut state = State::default();
        state.sandboxes.insert(
            "agent".into(),
            SandboxRecord {
                name: "agent".into(),
                cgroup: PathBuf::from("/sys/fs/cgroup/agent"),
                cgroup_id: 7,
                index: 1,
                slot,
                policy_path: "p.yaml".into(),
                policy_source: String::new(),
                policy_digest: String::new(),
                attached_at: String::new(),
                netns: None,
                netns_inode: None,
                quarantine: None,
            },
        );
        state
    }

    #[test]
    fn a_slot_just_freed_is_the_last_given_again() {
        // One sandbox replaced again and again goes round all the slots.
        let mut state = with_slot(1);
        state.last_slot = 1;
        let mut given = Vec::new();
        for _ in 0..8 {
            let slot = state.free_slot(8, &[]).unwrap();
            given.push(slot);
            state.sandboxes.get_mut("agent").unwrap().slot = slot;
        }
        assert_eq!(given, [2, 3, 4, 5, 6, 7, 1, 2]);
        // Another sandbox high up does not send it back to the slot it just left.
        let mut state = with_slot(1);
        state.last_slot = 1;
        let mut other = state.sandboxes["agent"].clone();
        other.name = "other".into();
        other.slot = 7;
        state.sandboxes.insert("other".into(), other);
        let mut given = Vec::new();
        for _ in 0..6 {
            let slot = state.free_slot(8, &[]).unwrap();
            given.push(slot);
            state.sandboxes.get_mut("agent").unwrap().slot = slot;
        }
        assert_eq!(given, [2, 3, 4, 5, 6, 1]);
        // Busy slots (still in the kernel maps) are skipped; a full ring gives none.
        let mut state = with_slot(2);
        state.last_slot = 2;
        assert_eq!(state.free_slot(8, &[3, 4]), Some(5));
        assert_eq!(with_slot(1).free_slot(2, &[]), None);
    }
}
