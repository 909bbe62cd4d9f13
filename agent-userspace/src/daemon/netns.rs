//! Network namespaces of sandboxes, and binding the proxy's listener inside one.
//!
//! A connection redirected to `127.0.0.1:PORT` lands on the loopback of the sandbox's own
//! network namespace, so the listener must live there. A thread enters the namespace with
//! `setns`, binds, and exits; the sockets keep their namespace, and the daemon accepts on
//! them from its own.
use std::{
    fs::{self, File},
    io,
    net::{SocketAddr, TcpListener},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

/// `ioctl(2)` request answering the kind of namespace an nsfs file is (`linux/nsfs.h`:
/// `_IO(0xb7, 0x3)`).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Identity of a network namespace: (device, inode) of its nsfs file.
pub type NetnsId = (u64, u64);

pub fn netns_id(path: &Path) -> io::Result<NetnsId> {
    let m = fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// The daemon's own network namespace and the host's (pid 1's: the daemon may run in one
/// of its own, a pod without hostNetwork), which no sandbox may share.
#[derive(Debug, Clone, Copy)]
pub struct HostNetns {
    ours: NetnsId,
    host: Option<NetnsId>,
}

impl HostNetns {
    /// An error when the daemon's own cannot be read.
    pub fn read() -> io::Result<Self> {
        Ok(Self {
            ours: netns_id(Path::new("/proc/self/ns/net"))?,
            host: netns_id(Path::new("/proc/1/ns/net")).ok(),
        })
    }

    /// Whether `id` is one of them.
    pub fn holds(&self, id: NetnsId) -> bool {
        id == self.ours || Some(id) == self.host
    }
}

/// A network namespace opened once. Its identity is read from the open file, and every
/// bind in it goes through that file: a path checked and then opened again (`/proc/PID/
/// ns/net` of a process that exits, whose pid is reused, or that moves to another
/// namespace meanwhile) could name another namespace by the time it is used.
#[derive(Debug)]
pub struct OpenNetns {
    file: File,
    id: NetnsId,
    path: PathBuf,
}

impl OpenNetns {
    /// Opens `path` without blocking (a FIFO put where a namespace was expected would
    /// otherwise hold the daemon's open for ever) and checks that it is a network
    /// namespace.
    pub fn open(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(path)?;
        // SAFETY: an ioctl on a descriptor this function owns, with no argument.
        let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
        if kind != libc::CLONE_NEWNET {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a network namespace", path.display()),
            ));
        }
        let m = file.metadata()?;
        Ok(Self {
            id: (m.dev(), m.ino()),
            file,
            path: path.to_path_buf(),
        })
    }

    /// The identity of the namespace opened (not of whatever the path names now).
    pub fn id(&self) -> NetnsId {
        self.id
    }

    /// The path it was opened from, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Why the network namespace of a sandbox's processes could not be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupNetns {
    /// No process in the cgroup (or its descendants) yet.
    Empty,
    /// Its processes are in several namespaces (one may have made its own), and none was
    /// named at attach.
    Several(usize),
    /// None of its processes is in the namespace it was attached in (inode).
    Gone(u64),
}

/// The network namespace a sandbox's processes use, found from the processes in its
/// cgroup (and descendants, four levels down): the one with inode `attached` if given
/// (the namespace seen at attach: a process that made a namespace of its own later, and
/// comes first in the cgroup, is not taken for the sandbox's), else the one every process
/// is in. The daemon's own namespace is never a stand-in for an empty cgroup, or the
/// proxy would listen on the host's loopback.
pub fn netns_of_cgroup(cgroup: &Path, attached: Option<u64>) -> Result<PathBuf, CgroupNetns> {
    fn pids(dir: &Path, depth: u32, out: &mut Vec<u32>) {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if depth == 0 {
            return;
        }
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.filter_map(Result::ok) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pids(&e.path(), depth - 1, out);
            }
        }
    }
    let mut found = Vec::new();
    pids(cgroup, 4, &mut found);
    // Processes that exit meanwhile are passed over.
    let mut namespaces = found.into_iter().filter_map(|pid| {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        netns_id(&path).ok().map(|id| (path, id))
    });
    match attached {
        Some(inode) => namespaces
            .find(|(_, id)| id.1 == inode)
            .map(|(path, _)| path)
            .ok_or(CgroupNetns::Gone(inode)),
        None => {
            let mut first: Option<(PathBuf, NetnsId)> = None;
            let mut ids = Vec::new();
            for (path, id) in namespaces {
                if !ids.contains(&id) {
                    ids.push(id);
                }
                first.get_or_insert((path, id));
            }
            match (first, ids.len()) {
                (Some((path, _)), 1) => Ok(path),
                (None, _) => Err(CgroupNetns::Empty),
                (Some(_), n) => Err(CgroupNetns::Several(n)),
            }
        }
    }
}

/// Runs `f` on a thread that entered the network namespace `netns`. Sockets `f` creates
/// belong to that namespace for their whole life; the thread exits when `f` returns.
pub(super) fn in_netns<T: Send + 'static>(
    netns: &OpenNetns,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let ns = netns.file.try_clone()?;
    std::thread::spawn(move || {
        // SAFETY: setns changes only this thread, which exits after `f`.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| io::Error::other("netns thread panicked"))?
}

/// Binds every address it can with `bind`; fails if none binds, or if one is taken (a
/// process there would get the traffic the kernel sends to it). An address the namespace
/// does not have (`::1` with IPv6 disabled) is skipped.
fn bind_all<S>(
    addrs: Vec<SocketAddr>,
    bind: impl Fn(SocketAddr) -> io::Result<S>,
) -> io::Result<Vec<S>> {
    let mut out = Vec::new();
    let mut last_err = None;
    for a in addrs {
        match bind(a) {
            Ok(s) => out.push(s),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{a} is already taken by another process: {e}"),
                ))
            }
            Err(e) => last_err = Some(e),
        }
    }
    match (out.is_empty(), last_err) {
        (true, Some(e)) => Err(e),
        _ => Ok(out),
    }
}

/// Non-blocking TCP listeners on `addrs` inside the network namespace `netns`.
pub fn bind_in_netns(netns: &OpenNetns, addrs: Vec<SocketAddr>) -> io::Result<Vec<TcpListener>> {
    in_netns(netns, move || {
        let ports = ports_of(&addrs);
        let bound = bind_all(addrs, |a| {
            let l = TcpListener::bind(a)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        reserve_here(&ports);
        warn_nonlocal_bind_here();
        Ok(bound)
    })
}

/// Non-blocking UDP sockets on `addrs` inside the network namespace `netns`.
pub fn bind_udp_in_netns(
    netns: &OpenNetns,
    addrs: Vec<SocketAddr>,
) -> io::Result<Vec<std::net::UdpSocket>> {
    in_netns(netns, move || {
        let ports = ports_of(&addrs);
        let bound = bind_all(addrs, |a| {
            let s = std::net::UdpSocket::bind(a)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })?;
        reserve_here(&ports);
        warn_nonlocal_bind_here();
        Ok(bound)
    })
}

fn ports_of(addrs: &[SocketAddr]) -> Vec<u16> {
    let mut ports: Vec<u16> = addrs
        .iter()
        .map(SocketAddr::port)
        .filter(|p| *p != 0)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The current thread's namespace's ports the kernel never picks for a socket that did
/// not name one (IPv4 and IPv6 alike).
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Reserves `ports` in the namespace the calling thread is in (`/proc/sys/net` shows the
/// reader's namespace): the bind hook refuses a sandbox's `bind()` to a listener's port,
/// but the kernel also picks ports by itself (`listen()` or `connect()` on an unbound
/// socket, `bind()` to port 0), which no hook sees; in a namespace whose local port range
/// covers a listener's port, a sandbox could take it so while the listener is away (a
/// daemon restart) and receive what the kernel redirects there. A failure is logged: the
/// listener is bound, and the bind hook still guards the port.
fn reserve_here(ports: &[u16]) {
    let result =
        fs::read_to_string(RESERVED_PORTS).and_then(|now| match with_reserved(now.trim(), ports) {
            Some(list) => fs::write(RESERVED_PORTS, list),
            None => Ok(()),
        });
    if let Err(e) = result {
        tracing::warn!(?ports, error = %e, "Reserving the listeners' ports in the sandbox's namespace failed; a sandbox whose local port range covers them could take one while the daemon is away");
    }
}

/// Says so when the calling thread's namespace lets sockets bind to and send from
/// addresses that are not the host's (`ip_nonlocal_bind`): the `sysctl` program keeps a
/// sandbox from turning it on, but it may have been on before (a runtime's setting), and
/// the daemon does not change a namespace's setting that others may rely on.
fn warn_nonlocal_bind_here() {
    for path in [
        "/proc/sys/net/ipv4/ip_nonlocal_bind",
        "/proc/sys/net/ipv6/ip_nonlocal_bind",
    ] {
        if fs::read_to_string(path).is_ok_and(|v| v.trim() != "0") {
            tracing::warn!(sysctl = path, "A sandbox's network namespace allows binding to and sending from addresses that are not its own (a forged source); set it to 0 there");
        }
    }
}

/// The reserved-ports list `list` (the kernel's form: `1,3-5`) with `ports` added, or
/// `None` if it already has them.
fn with_reserved(list: &str, ports: &[u16]) -> Option<String> {
    let has = |port: u16| {
        list.split(',').filter(|r| !r.is_empty()).any(|r| {
            let (lo, hi) = r.split_once('-').unwrap_or((r, r));
            match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
                (Ok(lo), Ok(hi)) => (lo..=hi).contains(&port),
                _ => false,
            }
        })
    };
    let missing: Vec<String> = ports
        .iter()
        .filter(|p| !has(**p))
        .map(u16::to_string)
        .collect();
    if missing.is_empty() {
        return None;
    }
    let mut out = list.to_owned();
    for p in missing {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&p);
    }
    Some(out)
}

/// `SO_NETNS_COOKIE` of a socket: the same value the kernel programs see.
pub fn netns_cookie(fd: &impl AsRawFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer and length of the right size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    /// Only a network namespace opens: a FIFO where one was expected fails at once
    /// (instead of holding the open, and the daemon's lock, until a writer comes), as
    /// does a plain file or another kind of namespace.
    #[test]
    fn only_a_network_namespace_opens() {
        let own = super::OpenNetns::open(std::path::Path::new("/proc/self/ns/net")).unwrap();
        assert_eq!(
            own.id(),
            super::netns_id(std::path::Path::new("/proc/self/ns/net")).unwrap()
        );
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "x").unwrap();
        for not_netns in [
            fifo.as_path(),
            plain.as_path(),
            "/proc/self/ns/uts".as_ref(),
        ] {
            assert!(
                super::OpenNetns::open(not_netns).is_err(),
                "{}",
                not_netns.display()
            );
        }
    }

    use super::*;

    fn addrs() -> Vec<SocketAddr> {
        vec![
            SocketAddr::from(([127, 0, 0, 1], 15001)),
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 15001)),
        ]
    }

    /// The namespace opened is the one used and named, whatever its path names later.
    #[test]
    fn an_opened_namespace_keeps_its_identity_when_its_path_changes() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("ns");
        std::os::unix::fs::symlink("/proc/self/ns/net", &link).unwrap();
        let opened = OpenNetns::open(&link).unwrap();
        let net = netns_id(Path::new("/proc/self/ns/net")).unwrap();
        assert_eq!(opened.id(), net);
        // The path now names another namespace (the mount namespace's nsfs file).
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink("/proc/self/ns/mnt", &link).unwrap();
        assert_ne!(netns_id(&link).unwrap(), net);
        assert_eq!(opened.id(), net);
        assert_eq!(opened.path(), link.as_path());
        // Binding goes through the opened file: into the network namespace it named
        // (entering one's own needs CAP_SYS_ADMIN; the test suite runs as root).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let bound =
                bind_in_netns(&opened, vec![SocketAddr::from(([127, 0, 0, 1], 0))]).unwrap();
            assert_eq!(bound.len(), 1);
        }
    }

    #[test]
    fn reserved_ports_are_added_once_in_the_kernels_list_form() {
        assert_eq!(with_reserved("", &[15001]).as_deref(), Some("15001"));
        assert_eq!(
            with_reserved("80,15300-15400", &[15001, 15350]).as_deref(),
            Some("80,15300-15400,15001")
        );
        assert_eq!(with_reserved("15000-15002", &[15001]), None);
        assert_eq!(with_reserved("15001", &[15001]), None);
        assert_eq!(
            ports_of(&[
                SocketAddr::from(([127, 0, 0, 1], 15300)),
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 15300)),
                SocketAddr::from(([127, 0, 0, 1], 0)),
            ]),
            vec![15300]
        );
    }

    /// An address another process holds fails the bind (its traffic would go there); an
    /// address the namespace lacks is skipped.
    #[test]
    fn a_taken_address_fails_and_a_missing_one_is_skipped() {
        let taken = bind_all(addrs(), |a| {
            if a.is_ipv4() {
                Err(io::Error::from(io::ErrorKind::AddrInUse))
            } else {
                Ok(a)
            }
        });
        assert_eq!(
            taken.map_err(|e| e.kind()).err(),
            Some(io::ErrorKind::AddrInUse)
        );
        let missing = bind_all(addrs(), |a| {
            if a.is_ipv6() {
                Err(io::Error::from(io::ErrorKind::AddrNotAvailable))
            } else {
                Ok(a)
            }
        });
        assert_eq!(missing.ok(), Some(vec![addrs()[0]]));
        let none = bind_all(addrs(), |_| -> io::Result<SocketAddr> {
            Err(io::Error::from(io::ErrorKind::AddrNotAvailable))
        });
        assert!(none.is_err());
    }
}
