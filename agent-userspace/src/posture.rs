//! A sandbox's posture: what its processes could do to get around the kernel programs.
//! `CAP_SYS_ADMIN` can mount cgroup2 and move a process out of the sandbox's cgroup,
//! `CAP_NET_ADMIN` can change routes and interfaces, `CAP_NET_RAW` opens packet sockets
//! (refused only where BPF LSM runs). Read from `/proc/PID/status` (`CapEff`, with
//! `CapPrm` and `CapAmb`: what a process can raise at will counts as held; and `CapBnd`
//! for a process running as uid 0, which any program it executes gets) of every
//! process in the sandbox's cgroup and its descendants.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

/// Capability names as policies and records spell them (lowercase, no `cap_` prefix),
/// with their bit numbers (`include/uapi/linux/capability.h`).
pub const CAPABILITIES: [(&str, u8); 41] = [
    ("chown", 0),
    ("dac_override", 1),
    ("dac_read_search", 2),
    ("fowner", 3),
    ("fsetid", 4),
    ("kill", 5),
    ("setgid", 6),
    ("setuid", 7),
    ("setpcap", 8),
    ("linux_immutable", 9),
    ("net_bind_service", 10),
    ("net_broadcast", 11),
    ("net_admin", 12),
    ("net_raw", 13),
    ("ipc_lock", 14),
    ("ipc_owner", 15),
    ("sys_module", 16),
    ("sys_rawio", 17),
    ("sys_chroot", 18),
    ("sys_ptrace", 19),
    ("sys_pacct", 20),
    ("sys_admin", 21),
    ("sys_boot", 22),
    ("sys_nice", 23),
    ("sys_resource", 24),
    ("sys_time", 25),
    ("sys_tty_config", 26),
    ("mknod", 27),
    ("lease", 28),
    ("audit_write", 29),
    ("audit_control", 30),
    ("setfcap", 31),
    ("mac_override", 32),
    ("mac_admin", 33),
    ("syslog", 34),
    ("wake_alarm", 35),
    ("block_suspend", 36),
    ("audit_read", 37),
    ("perfmon", 38),
    ("bpf", 39),
    ("checkpoint_restore", 40),
];

/// Capabilities that let a sandbox get around or change its confinement; holding any is a
/// risky posture.
pub const RISKY: [&str; 6] = [
    "sys_admin",
    "net_admin",
    "net_raw",
    "bpf",
    "sys_module",
    "sys_ptrace",
];

/// The bit of a capability name, if it is one.
pub fn capability_bit(name: &str) -> Option<u8> {
    CAPABILITIES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, b)| *b)
}

/// The mask of capabilities named as an OCI config names them (`CAP_NET_RAW`, any case);
/// `Err` names one that is not known.
pub fn oci_capability_mask(names: &[String]) -> Result<u64, String> {
    names.iter().try_fold(0u64, |mask, name| {
        let lower = name.to_ascii_lowercase();
        let bit = lower
            .strip_prefix("cap_")
            .and_then(capability_bit)
            .ok_or_else(|| format!("unknown capability {name:?}"))?;
        Ok(mask | (1u64 << bit))
    })
}

/// Names of the capabilities set in a `CapEff` mask, in bit order.
pub fn capability_names(mask: u64) -> Vec<&'static str> {
    CAPABILITIES
        .iter()
        .filter(|(_, b)| mask & (1u64 << b) != 0)
        .map(|(n, _)| *n)
        .collect()
}

/// The capabilities a process holds or can take up at will, from the text of
/// `/proc/PID/status`: its effective set with its permitted and ambient sets (a process
/// may raise any permitted capability into its effective set at any time, without a new
/// pid to be read again), and its bounding set unless `no_new_privs` is set (what a
/// program it executes can be given). `None` without a `CapEff` line.
pub fn parse_capabilities(status: &str) -> Option<u64> {
    let set = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    };
    let effective = set("CapEff:")?;
    // Without `no_new_privs`, a program it executes gets from the bounding set: all of
    // it run as uid 0, what a set-user-ID root program or file capabilities
    // (`setcap cap_net_raw+ep`, as `ping` often ships) give otherwise. With it, an exec
    // gains nothing (the kernel keeps the new permitted set within the old).
    let no_new_privs = status
        .lines()
        .find_map(|l| l.strip_prefix("NoNewPrivs:"))
        .map(str::trim)
        == Some("1");
    let bounding = if no_new_privs {
        0
    } else {
        set("CapBnd:").unwrap_or(0)
    };
    Some(effective | set("CapPrm:").unwrap_or(0) | set("CapAmb:").unwrap_or(0) | bounding)
}

/// What the sandbox's processes hold, summed over all of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Posture {
    /// Processes seen in the cgroup tree.
    pub pids: BTreeSet<u32>,
    /// Union of their capabilities: effective, permitted and ambient.
    pub caps: u64,
}

impl Posture {
    /// Capabilities any process holds or can raise, by name.
    pub fn capabilities(&self) -> Vec<&'static str> {
        capability_names(self.caps)
    }

    /// The risky capabilities held.
    pub fn risky(&self) -> Vec<&'static str> {
        self.capabilities()
            .into_iter()
            .filter(|c| RISKY.contains(c))
            .collect()
    }

    /// Whether a process could mount cgroup2 and move itself out of the cgroup.
    pub fn can_leave_cgroup(&self) -> bool {
        capability_bit("sys_admin").is_some_and(|b| self.caps & (1u64 << b) != 0)
    }

    /// Which of `forbidden` (capability names) are held.
    pub fn violations<'a>(&self, forbidden: &'a [String]) -> Vec<&'a str> {
        forbidden
            .iter()
            .filter(|n| capability_bit(n).is_some_and(|b| self.caps & (1u64 << b) != 0))
            .map(String::as_str)
            .collect()
    }

    /// Reads the posture of every process in `cgroup` and the cgroups below it. Processes
    /// that exit meanwhile are skipped.
    pub fn read(cgroup: &Path) -> Self {
        Self::of(pids_below(cgroup), capabilities_of)
    }

    /// Like [`Posture::read`], with process `pid` taken to hold `caps` (a container's
    /// init process at `createRuntime`, which still runs the runtime's code with the
    /// runtime's capabilities and drops to `caps` before the container's first
    /// instruction).
    pub fn read_declared(cgroup: &Path, pid: u32, caps: u64) -> Self {
        Self::of(pids_below(cgroup), |p| {
            if p == pid {
                Some(caps)
            } else {
                capabilities_of(p)
            }
        })
    }

    /// The posture of `pids`, each holding what `caps_of` says (processes it cannot
    /// read, gone meanwhile, are left out).
    pub fn of(pids: impl IntoIterator<Item = u32>, caps_of: impl Fn(u32) -> Option<u64>) -> Self {
        let mut posture = Self::default();
        for pid in pids {
            if let Some(mask) = caps_of(pid) {
                posture.pids.insert(pid);
                posture.caps |= mask;
            }
        }
        posture
    }
}

/// What process `pid` holds now ([`parse_capabilities`]), if it can be read.
pub fn capabilities_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_capabilities(&status)
}

/// A process's start time (clock ticks since boot, field 22 of `/proc/PID/stat`): with the
/// pid it names one process, even after the pid is reused.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of a `/proc/PID/stat` line; the command name in parentheses may hold spaces.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The cgroup v2 path of a process as `/proc/PID/cgroup` gives it.
pub fn cgroup_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// The most cgroups [`pids_below`] reads: more than a sandbox may make
/// ([`crate::cgroup::TREE_DESCENDANTS`]), so that a tree a sandbox could build where that
/// bound could not be set costs each walk tens of milliseconds at most.
const WALK_BUDGET: usize = 4 * crate::cgroup::TREE_DESCENDANTS as usize;

/// Every pid in `cgroup.procs` of `cgroup` and its descendants (bounded depth, and at most
/// [`WALK_BUDGET`] cgroups: a larger tree is reported and read in part).
pub fn pids_below(cgroup: &Path) -> BTreeSet<u32> {
    let mut pids = BTreeSet::new();
    let mut stack: Vec<(PathBuf, u32)> = vec![(cgroup.to_path_buf(), 0)];
    let mut read = 0usize;
    while let Some((dir, depth)) = stack.pop() {
        read += 1;
        if read > WALK_BUDGET {
            tracing::warn!(cgroup = %cgroup.display(), budget = WALK_BUDGET, "Cgroup tree larger than the walk reads: its processes are listed in part");
            break;
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if depth >= 16 {
            continue;
        }
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
    }
    pids
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn reads_capabilities() {
        let status = "Name:\tsh\nCapInh:\t0000000000000000\nCapPrm:\t00000000a80425fb\nCapEff:\t00000000a80425fb\nCapAmb:\t0000000000000000\n";
        assert_eq!(parse_capabilities(status), Some(0xa80425fb));
        // Dropped from the effective set but still permitted (or ambient): held, since
        // the process can raise it again whenever it likes.
        let lowered =
            "CapPrm:\t000001ffffffffff\nCapEff:\t0000000000000000\nCapAmb:\t0000000000000000\n";
        assert_eq!(parse_capabilities(lowered), Some(0x1ff_ffff_ffff));
        let ambient =
            "CapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapAmb:\t0000000000001000\n";
        assert_eq!(
            capability_names(parse_capabilities(ambient).unwrap()),
            ["net_admin"]
        );
        let mask = 0xa80425fb;
        // Docker's default set: net_raw is in it, sys_admin and net_admin are not.
        let names = capability_names(mask);
        assert!(names.contains(&"net_raw"));
        assert!(!names.contains(&"sys_admin"));
        assert!(!names.contains(&"net_admin"));
        let p = Posture {
            pids: [1].into(),
            caps: mask,
        };
        assert_eq!(p.risky(), ["net_raw"]);
        assert!(!p.can_leave_cgroup());
        let forbidden = vec!["sys_admin".to_string(), "net_raw".to_string()];
        assert_eq!(p.violations(&forbidden), ["net_raw"]);
        assert_eq!(parse_capabilities("Name: x\n"), None);
        // Effective uid 0: what it executes gets the bounding set.
        let root = "Uid:\t0\t0\t0\t0\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapBnd:\t0000000000002000\n";
        assert_eq!(
            capability_names(parse_capabilities(root).unwrap()),
            ["net_raw"]
        );
        // Another uid gets it through a program with file capabilities, unless
        // `no_new_privs` is set.
        let user = root.replace("Uid:\t0\t0", "Uid:\t1000\t1000");
        assert_eq!(
            capability_names(parse_capabilities(&user).unwrap()),
            ["net_raw"]
        );
        let confined = format!("{user}NoNewPrivs:\t1\n");
        assert_eq!(parse_capabilities(&confined), Some(0));
        let root_confined = format!("{root}NoNewPrivs:\t1\n");
        assert_eq!(parse_capabilities(&root_confined), Some(0));
    }

    #[test]
    fn oci_names_map_to_bits() {
        let names = ["CAP_NET_RAW".to_string(), "cap_kill".to_string()];
        assert_eq!(oci_capability_mask(&names), Ok((1 << 13) | (1 << 5)));
        assert_eq!(oci_capability_mask(&[]), Ok(0));
        let err = oci_capability_mask(&["CAP_WARP_DRIVE".to_string()]).unwrap_err();
        assert!(err.contains("CAP_WARP_DRIVE"), "{err}");
        assert!(oci_capability_mask(&["NET_RAW".to_string()]).is_err());
    }

    #[test]
    fn reads_start_time() {
        let stat = "1234 (a) b) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 2273280 200 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("1234 (x) S 1"), None);
    }

    #[test]
    fn full_root_can_leave() {
        let p = Posture {
            pids: [1].into(),
            caps: 0x1ff_ffff_ffff,
        };
        assert!(p.can_leave_cgroup());
        assert_eq!(p.capabilities().len(), CAPABILITIES.len());
        assert_eq!(capability_bit("sys_admin"), Some(21));
        assert_eq!(capability_bit("cap_sys_admin"), None);
    }
}
