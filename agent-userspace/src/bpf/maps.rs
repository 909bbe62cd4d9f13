//! Typed writers and readers for the pinned maps the programs decide with.
use agent_common::{
    OrigDst, PeerKey, PrefixRules, SandboxCounters, SandboxInfo, V4Key, V6Key, QUARANTINE_SLOT,
};
use aya::maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuValues};
use ipnet::{Ipv4Net, Ipv6Net};

use super::{BpfError, Programs};

/// The maps userspace writes (policies, sandboxes) and reads (counters, losses).
pub struct PolicyMaps {
    sandboxes: HashMap<MapData, u64, SandboxInfo>,
    rules_v4: LpmTrie<MapData, V4Key, PrefixRules>,
    rules_v6: LpmTrie<MapData, V6Key, PrefixRules>,
    counters: PerCpuArray<MapData, SandboxCounters>,
    lost: PerCpuArray<MapData, u64>,
    lost_by_sandbox: PerCpuArray<MapData, u64>,
    lost_denied_by_sandbox: PerCpuArray<MapData, u64>,
    deny_all: Array<MapData, u32>,
}

fn take<T>(programs: &mut Programs, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = programs
        .ebpf
        .take_map(name)
        .ok_or(BpfError::MissingMap(name))?;
    T::try_from(map).map_err(|e| BpfError::map(name, e))
}

impl PolicyMaps {
    pub fn new(programs: &mut Programs) -> Result<Self, BpfError> {
        Ok(Self {
            sandboxes: take(programs, "SANDBOXES")?,
            rules_v4: take(programs, "RULES_V4")?,
            rules_v6: take(programs, "RULES_V6")?,
            counters: take(programs, "COUNTERS")?,
            lost: take(programs, "LOST")?,
            lost_by_sandbox: take(programs, "LOST_BY_SANDBOX")?,
            lost_denied_by_sandbox: take(programs, "LOST_DENIED_BY_SANDBOX")?,
            deny_all: take(programs, "DENY_ALL")?,
        })
    }

    /// Writes a compiled policy into `slot`. The slot must not be in use by a sandbox; on
    /// error whatever was written to the slot is removed again.
    pub fn install_rules(
        &mut self,
        slot: u32,
        v4: &[(Ipv4Net, PrefixRules)],
        v6: &[(Ipv6Net, PrefixRules)],
    ) -> Result<(), BpfError> {
        let result = (|| {
            for (net, rules) in v4 {
                let key = Key::new(
                    32 + u32::from(net.prefix_len()),
                    V4Key {
                        slot_be: slot.to_be(),
                        addr: net.network().octets(),
                    },
                );
                self.rules_v4
                    .insert(&key, rules, 0)
                    .map_err(|e| BpfError::map("RULES_V4", e))?;
            }
            for (net, rules) in v6 {
                let key = Key::new(
                    32 + u32::from(net.prefix_len()),
                    V6Key {
                        slot_be: slot.to_be(),
                        addr: net.network().octets(),
                    },
                );
                self.rules_v6
                    .insert(&key, rules, 0)
                    .map_err(|e| BpfError::map("RULES_V6", e))?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = self.clear_slot(slot);
        }
        result
    }

    /// Makes a slot in use hold exactly `v4` and `v6`: each written (replacing what was
    /// there), then every other prefix of the slot removed, so that no lookup meanwhile
    /// finds the slot empty. Returns how many other prefixes were removed.
    pub fn sync_rules(
        &mut self,
        slot: u32,
        v4: &[(Ipv4Net, PrefixRules)],
        v6: &[(Ipv6Net, PrefixRules)],
    ) -> Result<usize, BpfError> {
        for (net, rules) in v4 {
            self.set_prefix(slot, ipnet::IpNet::V4(*net), rules)?;
        }
        for (net, rules) in v6 {
            self.set_prefix(slot, ipnet::IpNet::V6(*net), rules)?;
        }
        let slot_be = slot.to_be();
        let keep_v4: std::collections::HashSet<(u32, [u8; 4])> = v4
            .iter()
            .map(|(n, _)| (32 + u32::from(n.prefix_len()), n.network().octets()))
            .collect();
        let keep_v6: std::collections::HashSet<(u32, [u8; 16])> = v6
            .iter()
            .map(|(n, _)| (32 + u32::from(n.prefix_len()), n.network().octets()))
            .collect();
        let stale_v4: Vec<_> = self
            .rules_v4
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                k.data().slot_be == slot_be && !keep_v4.contains(&(k.prefix_len(), k.data().addr))
            })
            .collect();
        let stale_v6: Vec<_> = self
            .rules_v6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                k.data().slot_be == slot_be && !keep_v6.contains(&(k.prefix_len(), k.data().addr))
            })
            .collect();
        let removed = stale_v4.len() + stale_v6.len();
        for k in stale_v4 {
            self.rules_v4
                .remove(&k)
                .map_err(|e| BpfError::map("RULES_V4", e))?;
        }
        for k in stale_v6 {
            self.rules_v6
                .remove(&k)
                .map_err(|e| BpfError::map("RULES_V6", e))?;
        }
        Ok(removed)
    }

    /// Writes (or replaces) the rules of one prefix in `slot`.
    pub fn set_prefix(
        &mut self,
        slot: u32,
        net: ipnet::IpNet,
        rules: &PrefixRules,
    ) -> Result<(), BpfError> {
        match net {
            ipnet::IpNet::V4(n) => {
                let key = Key::new(
                    32 + u32::from(n.prefix_len()),
                    V4Key {
                        slot_be: slot.to_be(),
                        addr: n.network().octets(),
                    },
                );
                self.rules_v4
                    .insert(&key, rules, 0)
                    .map_err(|e| BpfError::map("RULES_V4", e))
            }
            ipnet::IpNet::V6(n) => {
                let key = Key::new(
                    32 + u32::from(n.prefix_len()),
                    V6Key {
                        slot_be: slot.to_be(),
                        addr: n.network().octets(),
                    },
                );
                self.rules_v6
                    .insert(&key, rules, 0)
                    .map_err(|e| BpfError::map("RULES_V6", e))
            }
        }
    }

    /// Removes the rules of one prefix from `slot` (absent is fine).
    pub fn remove_prefix(&mut self, slot: u32, net: ipnet::IpNet) -> Result<(), BpfError> {
        let r = match net {
            ipnet::IpNet::V4(n) => self.rules_v4.remove(&Key::new(
                32 + u32::from(n.prefix_len()),
                V4Key {
                    slot_be: slot.to_be(),
                    addr: n.network().octets(),
                },
            )),
            ipnet::IpNet::V6(n) => self.rules_v6.remove(&Key::new(
                32 + u32::from(n.prefix_len()),
                V6Key {
                    slot_be: slot.to_be(),
                    addr: n.network().octets(),
                },
            )),
        };
        match r {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(BpfError::map("RULES", e)),
        }
    }

    /// Removes every rule stored under `slot`.
    pub fn clear_slot(&mut self, slot: u32) -> Result<(), BpfError> {
        let slot_be = slot.to_be();
        let v4: Vec<_> = self
            .rules_v4
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().slot_be == slot_be)
            .collect();
        for k in v4 {
            self.rules_v4
                .remove(&k)
                .map_err(|e| BpfError::map("RULES_V4", e))?;
        }
        let v6: Vec<_> = self
            .rules_v6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().slot_be == slot_be)
            .collect();
        for k in v6 {
            self.rules_v6
                .remove(&k)
                .map_err(|e| BpfError::map("RULES_V6", e))?;
        }
        Ok(())
    }

    /// Policy slots that hold at least one rule.
    pub fn used_slots(&self) -> Vec<u32> {
        let mut slots: Vec<u32> = self
            .rules_v4
            .keys()
            .filter_map(Result::ok)
            .map(|k| u32::from_be(k.data().slot_be))
            .chain(
                self.rules_v6
                    .keys()
                    .filter_map(Result::ok)
                    .map(|k| u32::from_be(k.data().slot_be)),
            )
            .collect();
        slots.sort_unstable();
        slots.dedup();
        slots
    }

    pub fn set_sandbox(&mut self, cgroup_id: u64, info: SandboxInfo) -> Result<(), BpfError> {
        // Counted before a deny-all entry goes in and after one goes: never too low while
        // a sandbox is denied everything.
        if info.policy_slot == QUARANTINE_SLOT {
            self.count_deny_all(1)?;
        }
        self.sandboxes
            .insert(cgroup_id, info, 0)
            .map_err(|e| BpfError::map("SANDBOXES", e))?;
        self.count_deny_all(0)
    }

    /// Writes how many sandbox entries are deny-all (plus `extra` about to be), for the
    /// `skb_egress` program's check.
    fn count_deny_all(&mut self, extra: u32) -> Result<(), BpfError> {
        let n = self
            .sandboxes
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, info)| info.policy_slot == QUARANTINE_SLOT)
            .count();
        let n = u32::try_from(n).unwrap_or(u32::MAX).saturating_add(extra);
        self.deny_all
            .set(0, n, 0)
            .map_err(|e| BpfError::map("DENY_ALL", e))
    }

    pub fn sandbox(&self, cgroup_id: u64) -> Option<SandboxInfo> {
        self.sandboxes.get(&cgroup_id, 0).ok()
    }

    pub fn remove_sandbox(&mut self, cgroup_id: u64) -> Result<(), BpfError> {
        match self.sandboxes.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => self.count_deny_all(0),
            Err(e) => Err(BpfError::map("SANDBOXES", e)),
        }
    }

    /// Every sandbox entry in the kernel: (cgroup id, entry).
    pub fn sandboxes(&self) -> Vec<(u64, SandboxInfo)> {
        self.sandboxes.iter().filter_map(Result::ok).collect()
    }

    /// Every sandbox entry in the kernel, or an error if any could not be read.
    pub fn sandboxes_all(&self) -> Result<Vec<(u64, SandboxInfo)>, BpfError> {
        self.sandboxes
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| BpfError::map("SANDBOXES", e))
    }

    /// Counters summed over CPUs.
    pub fn counters(&self, index: u32) -> SandboxCounters {
        let mut sum = SandboxCounters::default();
        if let Ok(per_cpu) = self.counters.get(&index, 0) {
            for c in per_cpu.iter() {
                sum.allowed += c.allowed;
                sum.denied += c.denied;
                sum.audited += c.audited;
                sum.redirected += c.redirected;
            }
        }
        sum
    }

    /// Zeroes a sandbox index's counters before it is given to a new sandbox.
    pub fn reset_counters(&mut self, index: u32) -> Result<(), BpfError> {
        let n = aya::util::nr_cpus()
            .map_err(|(what, e)| BpfError::Other(format!("counting CPUs ({what}): {e}")))?;
        let zeros = PerCpuValues::try_from(vec![SandboxCounters::default(); n])
            .map_err(|e| BpfError::Other(format!("per-CPU values: {e}")))?;
        self.counters
            .set(index, zeros, 0)
            .map_err(|e| BpfError::map("COUNTERS", e))
    }

    /// Events the kernel could not put in the ring buffer, since the maps were created.
    /// Lost events by the sandbox index of the event (0: none found), non-zero only,
    /// since the counters were created.
    pub fn lost_by_sandbox(&self) -> Vec<(u32, u64)> {
        Self::nonzero(&self.lost_by_sandbox)
    }

    /// Denials among the lost events, by sandbox index (those with any).
    pub fn lost_denied_by_sandbox(&self) -> Vec<(u32, u64)> {
        Self::nonzero(&self.lost_denied_by_sandbox)
    }

    fn nonzero(map: &PerCpuArray<MapData, u64>) -> Vec<(u32, u64)> {
        nonzero(map)
    }

    pub fn lost_total(&self) -> u64 {
        self.lost.get(&0, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }
}

/// The indices of a per-CPU loss counter map with any, and their totals.
fn nonzero(map: &PerCpuArray<MapData, u64>) -> Vec<(u32, u64)> {
    (0..agent_common::MAX_SANDBOXES)
        .filter_map(|index| {
            let total: u64 = map.get(&index, 0).ok()?.iter().sum();
            (total > 0).then_some((index, total))
        })
        .collect()
}

/// Another build's loss counters, from its maps directory `maps`: events its programs
/// could not put in its ring buffer, in all and by sandbox index (those with any).
pub fn read_lost(maps: &std::path::Path) -> Result<(u64, Vec<(u32, u64)>), BpfError> {
    let open = |name: &'static str| -> Result<PerCpuArray<MapData, u64>, BpfError> {
        let data = MapData::from_pin(maps.join(name)).map_err(|e| BpfError::map(name, e))?;
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(|e| BpfError::map(name, e))
    };
    let lost = open("LOST")?;
    let total = lost.get(&0, 0).map(|v| v.iter().sum()).unwrap_or(0);
    Ok((total, nonzero(&open("LOST_BY_SANDBOX")?)))
}

/// The proxy's view of redirected connections: original destinations by peer.
pub struct PeerMap {
    by_peer: HashMap<MapData, PeerKey, OrigDst>,
}

impl PeerMap {
    pub fn new(programs: &mut Programs) -> Result<Self, BpfError> {
        Ok(Self {
            by_peer: take(programs, "BY_PEER")?,
        })
    }

    /// Looks up and forgets the original destination of the connection whose client is
    /// `peer` in the network namespace with cookie `netns_cookie`.
    pub fn take(&mut self, netns_cookie: u64, peer: std::net::SocketAddr) -> Option<OrigDst> {
        let addr = match peer.ip() {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(v6) => v6.octets(),
        };
        let key = PeerKey {
            netns_cookie,
            addr,
            port: peer.port(),
            _pad: [0; 6],
        };
        let orig = self.by_peer.get(&key, 0).ok()?;
        let _ = self.by_peer.remove(&key);
        Some(orig)
    }
}
