//! The listening side: binds the socket root-only and hands each request to the daemon.
//! A client has a few seconds to send its request and to take the response; at most
//! [`MAX_CONNECTIONS`] are open at once, and a new one displaces the longest-idle one, so
//! idle clients cannot lock out `status`.
use std::{
    collections::VecDeque,
    fs,
    os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Notify,
};

use super::{decode_request, Request, Response};

/// Longest request accepted: a policy of the largest size allowed is sent inline, JSON-escaped.
const MAX_REQUEST: usize = 8 * crate::policy::MAX_POLICY_BYTES;

/// What a caller may ask of the daemon, besides the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Anything.
    Any,
    /// To let a container join the sandbox the caller is in, and nothing else: a
    /// runtime's hook run inside a pod's cgroup (CRI-O's `conmon_cgroup = "pod"`).
    JoinOwnSandbox,
    /// Nothing, and why.
    StatusOnly(String),
    /// The status of the sandbox named, the caller's own, and no other's.
    OwnStatus(String),
}

/// Handles one decoded request.
pub trait Handler: Send + Sync + 'static {
    /// Handles `request` from a caller admitted as `admission` says ([`Admission::Any`] or
    /// [`Admission::JoinOwnSandbox`]).
    fn handle(&self, request: Request, admission: &Admission) -> Response;

    /// What a caller in cgroup directory `cgroup` (`None`: a cgroup that cannot be placed)
    /// may ask: only the status if it is in a sandbox's cgroup tree, root or not, or
    /// cannot be told apart from one; but a caller in the sandbox a `Join` names
    /// (`joins`) may join it. A refusal is recorded.
    fn admit(&self, cgroup: Option<&Path>, joins: Option<&str>) -> Admission {
        let _ = joins;
        match cgroup {
            Some(_) => Admission::Any,
            None => Admission::StatusOnly("the caller's cgroup cannot be read".to_owned()),
        }
    }

    /// The sandbox whose status alone a caller in cgroup directory `cgroup` may read (the
    /// one it is in); `None`: every sandbox's.
    fn status_scope(&self, cgroup: &Path) -> Option<String> {
        let _ = cgroup;
        None
    }

    /// The socket refused `count` connections of callers in cgroup directory `cgroup`
    /// (`None`: one that cannot be placed) before any request of theirs reached
    /// [`Handler::handle`]: not root, too large, too slow, not a request, or every slot
    /// busy (`why`, the answer each was given). To be recorded: the refused client (a
    /// runtime's hook among them) may not say so.
    fn refused(&self, cgroup: Option<&Path>, why: &str, count: u64) {
        let _ = (cgroup, why, count);
    }
}

/// Whether `path` can be the control socket: nothing there (`false`), or a socket a
/// daemon left behind (`true`: [`bind`] replaces it). Anything else at the path is not
/// ours to remove, and a socket another daemon still answers on is that daemon's: both
/// are errors. `egressd run` asks before it changes anything.
pub fn check_free(path: &Path) -> std::io::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if listened_on(path)? {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another daemon answers on this socket",
                ));
            }
            Ok(true)
        }
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket (left as it is)",
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether a process listens on the socket at `path`. Asked without waiting: a listener
/// whose queue is full (a daemon that hangs) answers "try again" at once, and that is a
/// listener too.
fn listened_on(path: &Path) -> std::io::Result<bool> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
    match socket.connect(&SockAddr::unix(path)?) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(false),
        Err(e) => Err(e),
    }
}

/// Binds the control socket with mode 0600 in a 0700 directory, replacing a stale socket
/// (see [`check_free`]).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    if check_free(path)? {
        fs::remove_file(path)?;
    }
    // Create the socket with no access for others from the start.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = listener?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Connections served at once. Beyond this, the connection that has waited longest for its
/// request is closed to make room (a busy one, whose request is being handled, never is).
const MAX_CONNECTIONS: usize = 64;
/// Time for a client to send its whole request line.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a client to take the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections open, and those still waiting for their request (oldest first), each with a
/// way to close it.
#[derive(Default)]
struct Slots {
    open: usize,
    next_id: u64,
    waiting: VecDeque<(u64, Arc<Notify>)>,
}

/// Accepts connections until the listener fails.
pub async fn serve(listener: UnixListener, handler: Arc<dyn Handler>) {
    let slots = Arc::new(Mutex::new(Slots::default()));
    let busy = Arc::new(BusyRefusals::default());
    let evicted = Arc::new(BusyRefusals::default());
    // Every connection's task (and every busy refusal's) ends with this one: aborted at
    // the daemon's stop, none goes on with the daemon's state (and its audit trail)
    // after the stop is recorded.
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        match accepted {
            Ok((stream, _)) => {
                let (id, evict) = {
                    let mut s = slots.lock().unwrap_or_else(|p| p.into_inner());
                    if s.open >= MAX_CONNECTIONS {
                        match s.waiting.pop_front() {
                            Some((_, oldest)) => oldest.notify_one(),
                            None => {
                                drop(s);
                                tasks.spawn(refuse_busy(stream, handler.clone(), busy.clone()));
                                continue;
                            }
                        }
                    }
                    s.open += 1;
                    s.next_id += 1;
                    let id = s.next_id;
                    let evict = Arc::new(Notify::new());
                    s.waiting.push_back((id, evict.clone()));
                    (id, evict)
                };
                let handler = handler.clone();
                let slots = slots.clone();
                let evicted = evicted.clone();
                tasks.spawn(async move {
                    if let Err(e) = connection(stream, handler, &slots, id, evict, evicted).await {
                        tracing::debug!(error = %e, "Control connection ended with an error");
                    }
                    let mut s = slots.lock().unwrap_or_else(|p| p.into_inner());
                    s.open -= 1;
                    s.waiting.retain(|(i, _)| *i != id);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "Accepting on the control socket failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Connections refused because every slot was busy, not yet put to the handler, by
/// caller: one report at a time covers all those refused meanwhile, so a storm of
/// connections does not become a storm of reports (each takes the daemon's lock).
#[derive(Default)]
struct BusyRefusals {
    pending: Mutex<std::collections::HashMap<Option<std::path::PathBuf>, u64>>,
    reporting: std::sync::atomic::AtomicBool,
}

impl BusyRefusals {
    fn take(&self) -> std::collections::HashMap<Option<std::path::PathBuf>, u64> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn is_empty(&self) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }
}

/// Callers whose busy refusals are reported apart; the rest together, as unplaced.
const MAX_BUSY_CALLERS: usize = 16;

/// Every slot is busy handling a request: say so instead of queueing without bound.
async fn refuse_busy(stream: UnixStream, handler: Arc<dyn Handler>, busy: Arc<BusyRefusals>) {
    let why =
        format!("egressd is busy: {MAX_CONNECTIONS} control requests are being handled; try again");
    let cgroup = Caller::of_peer(&stream).cgroup().map(Path::to_path_buf);
    count_and_report(&busy, &handler, cgroup, &why).await;
    let mut stream = stream;
    let _ = tokio::time::timeout(WRITE_TIMEOUT, respond(&mut stream, &Response::error(why))).await;
}

/// Counts one refusal of the caller in `cgroup` in `pending` and, unless a report is
/// under way, reports what is pending: one report per caller covers all those counted
/// meanwhile, so a storm of connections is not a storm of reports (each takes the
/// daemon's lock).
async fn count_and_report(
    pending: &BusyRefusals,
    handler: &Arc<dyn Handler>,
    cgroup: Option<std::path::PathBuf>,
    why: &str,
) {
    use std::sync::atomic::Ordering::SeqCst;
    {
        let mut counts = pending.pending.lock().unwrap_or_else(|p| p.into_inner());
        // A caller able to make many cgroups gets one report for all past a few.
        let key = if counts.len() < MAX_BUSY_CALLERS || counts.contains_key(&cgroup) {
            cgroup
        } else {
            None
        };
        *counts.entry(key).or_default() += 1;
    }
    if pending.reporting.swap(true, SeqCst) {
        return;
    }
    loop {
        for (cgroup, n) in pending.take() {
            let (handler, why) = (handler.clone(), why.to_owned());
            let _ = tokio::task::spawn_blocking(move || {
                handler.refused(cgroup.as_deref(), &why, n);
            })
            .await;
        }
        pending.reporting.store(false, SeqCst);
        // One counted after the counts were taken: this task reports it too, unless
        // another has begun to.
        if pending.is_empty() || pending.reporting.swap(true, SeqCst) {
            break;
        }
    }
}

/// Tells the handler (off the async threads) that the socket refused `caller`.
async fn refused(handler: Arc<dyn Handler>, caller: &Caller, why: String) {
    let cgroup = caller.cgroup().map(Path::to_path_buf);
    let _ = tokio::task::spawn_blocking(move || handler.refused(cgroup.as_deref(), &why, 1)).await;
}

async fn respond(stream: &mut UnixStream, response: &Response) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(response).unwrap_or_default();
    out.push(b'\n');
    stream.write_all(&out).await?;
    stream.shutdown().await
}

/// Why reading a request ended without one.
enum ReadEnd {
    Request(Request),
    /// The response to send instead.
    Refuse(Response),
    /// The request is over the size limit: this response, then the rest is drained.
    TooLarge(Response),
    /// The client went away.
    Drop,
    /// Closed to make room for a newer connection before its request came.
    Evicted,
}

async fn read_request(stream: &mut UnixStream) -> std::io::Result<ReadEnd> {
    let mut reader = BufReader::new((&mut *stream).take(MAX_REQUEST as u64 + 1));
    let mut line = Vec::new();
    let read = tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    match read {
        Err(_) => Ok(ReadEnd::Refuse(Response::error(format!(
            "no complete request within {} seconds",
            READ_TIMEOUT.as_secs()
        )))),
        Ok(Err(e)) => Err(e),
        Ok(Ok(0)) => Ok(ReadEnd::Drop),
        Ok(Ok(_)) if line.len() > MAX_REQUEST => Ok(ReadEnd::TooLarge(Response::error(format!(
            "request larger than {MAX_REQUEST} bytes (a policy may have at most {} bytes)",
            crate::policy::MAX_POLICY_BYTES
        )))),
        Ok(Ok(_)) => Ok(match decode_request(line) {
            Ok(request) => ReadEnd::Request(request),
            Err(error) => ReadEnd::Refuse(Response::error(error)),
        }),
    }
}

async fn connection(
    mut stream: UnixStream,
    handler: Arc<dyn Handler>,
    slots: &Mutex<Slots>,
    id: u64,
    evict: Arc<Notify>,
    evicted: Arc<BusyRefusals>,
) -> std::io::Result<()> {
    // A process confined by it (a sandbox sharing the host's mounts) may only read the
    // status (a runtime's hook can run inside a pod's cgroup: CRI-O's conmon with
    // `conmon_cgroup = "pod"`); a peer whose cgroup cannot be told is treated alike.
    let caller = Caller::of_peer(&stream);
    // Only root may drive the daemon, whatever the socket's mode says.
    if stream.peer_cred()?.uid() != 0 {
        let why = "permission denied: only root may use the egressd control socket";
        refused(handler, &caller, why.to_owned()).await;
        return tokio::time::timeout(WRITE_TIMEOUT, respond(&mut stream, &Response::error(why)))
            .await
            .unwrap_or(Ok(()));
    }
    let end = tokio::select! {
        end = read_request(&mut stream) => end?,
        () = evict.notified() => ReadEnd::Evicted,
    };
    // From here on the connection is busy, not idle: it is never evicted.
    slots
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .waiting
        .retain(|(i, _)| *i != id);
    if let ReadEnd::TooLarge(r) | ReadEnd::Refuse(r) = &end {
        refused(
            handler.clone(),
            &caller,
            r.error.clone().unwrap_or_default(),
        )
        .await;
    }
    let response = match end {
        ReadEnd::Drop => return Ok(()),
        // Its client (a runtime's hook, say) gets no answer and cannot record anything:
        // the daemon does, rate-limited per caller like every refusal.
        ReadEnd::Evicted => {
            // Closed at once; the report, counted per caller (one task reports for all
            // counted meanwhile, the others return at once), comes after.
            drop(stream);
            let cgroup = caller.cgroup().map(Path::to_path_buf);
            let why = "closed before its request came: the control socket was full of idle \
                       connections and this one was the oldest";
            count_and_report(&evicted, &handler, cgroup, why).await;
            return Ok(());
        }
        ReadEnd::TooLarge(r) => {
            // Take (and discard) the rest for a while, so the client finishes sending
            // and reads this answer instead of failing with a broken pipe.
            let sent = tokio::time::timeout(WRITE_TIMEOUT, respond(&mut stream, &r)).await;
            let _ = tokio::time::timeout(
                READ_TIMEOUT,
                tokio::io::copy(
                    &mut (&mut stream).take(8 * MAX_REQUEST as u64),
                    &mut tokio::io::sink(),
                ),
            )
            .await;
            return sent.unwrap_or(Ok(()));
        }
        ReadEnd::Refuse(r) => r,
        ReadEnd::Request(req) if !matches!(req, Request::Status) => {
            let joins = match &req {
                Request::Join { name, .. } => Some(name.as_str()),
                _ => None,
            };
            match caller.admission(handler.as_ref(), joins) {
                Admission::StatusOnly(why) => {
                    Response::error(format!("permission denied: egressd control socket: {why}"))
                }
                admission => handle(handler.clone(), req, admission).await,
            }
        }
        ReadEnd::Request(req) => {
            let admission = caller.status_admission(handler.as_ref());
            handle(handler.clone(), req, admission).await
        }
    };
    let sent = match tokio::time::timeout(WRITE_TIMEOUT, respond(&mut stream, &response)).await {
        Ok(sent) => sent,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client did not read it",
        )),
    };
    if let Err(e) = &sent {
        // What was done stands (an attach the client gave up waiting for, whose
        // container the runtime then removes: its cgroup's removal detaches it).
        tracing::warn!(
            caller = ?caller.cgroup(),
            error = %e,
            done = response.ok,
            "A control-socket answer was not delivered"
        );
    }
    sent
}

/// Who is calling, as far as the socket tells.
#[derive(Debug, PartialEq, Eq)]
enum Caller {
    Cgroup(std::path::PathBuf),
    Unknown,
}

impl Caller {
    /// The process at the other end of `stream`, by its cgroup.
    fn of_peer(stream: &UnixStream) -> Self {
        Self::of(
            stream
                .peer_cred()
                .ok()
                .and_then(|cred| cred.pid())
                .and_then(|pid| crate::cgroup::of_pid(pid.unsigned_abs()).ok()),
        )
    }

    /// From the caller's cgroup directory, if it could be read. A path outside the
    /// daemon's cgroup namespace (`/../..`: the daemon runs in a private one) cannot be
    /// placed: unknown.
    fn of(cgroup: Option<std::path::PathBuf>) -> Self {
        match cgroup {
            Some(c) if !c.components().any(|p| p == std::path::Component::ParentDir) => {
                Self::Cgroup(c)
            }
            _ => Self::Unknown,
        }
    }

    /// The caller's cgroup directory, if it could be placed.
    fn cgroup(&self) -> Option<&Path> {
        match self {
            Self::Cgroup(cgroup) => Some(cgroup),
            Self::Unknown => None,
        }
    }

    /// What this caller may ask (a refusal is recorded by `handler`).
    fn admission(&self, handler: &dyn Handler, joins: Option<&str>) -> Admission {
        handler.admit(self.cgroup(), joins)
    }

    /// Whose status this caller may read: a caller inside a sandbox its own sandbox's
    /// only; one that cannot be placed (outside the daemon's cgroup namespace, or gone),
    /// which may be a sandbox's, no sandbox's; any other every sandbox's.
    fn status_admission(&self, handler: &dyn Handler) -> Admission {
        match self.cgroup() {
            Some(cgroup) => handler
                .status_scope(cgroup)
                .map_or(Admission::Any, Admission::OwnStatus),
            // No sandbox is named "": the daemon's own figures only.
            None => Admission::OwnStatus(String::new()),
        }
    }
}

/// Runs `req` on the handler (off the async threads).
async fn handle(handler: Arc<dyn Handler>, req: Request, admission: Admission) -> Response {
    tokio::task::spawn_blocking(move || handler.handle(req, &admission))
        .await
        .unwrap_or_else(|e| Response::error(format!("internal error: {e}")))
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod caller_tests {
    use super::{Admission, Caller};

    #[test]
    fn a_caller_outside_the_cgroup_namespace_is_unknown() {
        let c = |p: &str| Caller::of(Some(p.into()));
        assert_eq!(
            c("/sys/fs/cgroup/a/b"),
            Caller::Cgroup("/sys/fs/cgroup/a/b".into())
        );
        assert_eq!(c("/sys/fs/cgroup/../../user.slice"), Caller::Unknown);
        assert_eq!(Caller::of(None), Caller::Unknown);
    }

    /// Records which callers the handler was asked about.
    #[derive(Default)]
    struct Asked(std::sync::Mutex<Vec<Option<std::path::PathBuf>>>);

    impl super::Handler for Asked {
        fn handle(&self, _: super::Request, _: &Admission) -> super::Response {
            super::Response::error("unused")
        }

        fn admit(&self, cgroup: Option<&std::path::Path>, _joins: Option<&str>) -> Admission {
            self.0.lock().unwrap().push(cgroup.map(Into::into));
            Admission::StatusOnly("refused".into())
        }
    }

    /// A caller that cannot be placed is put to the handler too (which records the
    /// refusal), not refused by the socket alone.
    #[test]
    fn every_caller_is_put_to_the_handler() {
        let asked = Asked::default();
        let refused = Admission::StatusOnly("refused".into());
        assert_eq!(Caller::Unknown.admission(&asked, None), refused);
        let placed = Caller::Cgroup("/sys/fs/cgroup/a".into());
        assert_eq!(placed.admission(&asked, None), refused);
        assert_eq!(
            *asked.0.lock().unwrap(),
            [None, Some("/sys/fs/cgroup/a".into())]
        );
    }

    /// A caller that cannot be placed reads no sandbox's status; a placed one outside
    /// every sandbox reads them all, one inside a sandbox its own.
    #[test]
    fn status_is_scoped_by_caller() {
        struct Scoped;
        impl super::Handler for Scoped {
            fn handle(&self, _: super::Request, _: &Admission) -> super::Response {
                super::Response::error("unused")
            }
            fn status_scope(&self, cgroup: &std::path::Path) -> Option<String> {
                cgroup.starts_with("/sb").then(|| "sb".to_owned())
            }
        }
        assert_eq!(
            Caller::Unknown.status_admission(&Scoped),
            Admission::OwnStatus(String::new())
        );
        assert_eq!(
            Caller::Cgroup("/host".into()).status_admission(&Scoped),
            Admission::Any
        );
        assert_eq!(
            Caller::Cgroup("/sb/x".into()).status_admission(&Scoped),
            Admission::OwnStatus("sb".into())
        );
    }

    /// The default handler refuses a caller it cannot place, and no other.
    #[test]
    fn by_default_only_an_unplaced_caller_is_refused() {
        struct Plain;
        impl super::Handler for Plain {
            fn handle(&self, _: super::Request, _: &Admission) -> super::Response {
                super::Response::error("unused")
            }
        }
        assert!(matches!(
            Caller::Unknown.admission(&Plain, None),
            Admission::StatusOnly(_)
        ));
        assert_eq!(
            Caller::Cgroup("/a".into()).admission(&Plain, None),
            Admission::Any
        );
    }

    /// What the socket itself refuses (a line that is no request) is put to the handler
    /// with the answer the caller got; a request it reads is not.
    #[tokio::test]
    async fn the_sockets_own_refusals_are_put_to_the_handler() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        #[derive(Default)]
        struct Refusals(std::sync::Mutex<Vec<(Option<std::path::PathBuf>, String)>>);
        impl super::Handler for Refusals {
            fn handle(&self, _: super::Request, _: &Admission) -> super::Response {
                super::Response::ok("handled")
            }
            fn refused(&self, cgroup: Option<&std::path::Path>, why: &str, count: u64) {
                assert_eq!(count, 1);
                self.0
                    .lock()
                    .unwrap()
                    .push((cgroup.map(Into::into), why.to_owned()));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let handler = std::sync::Arc::new(Refusals::default());
        let server = tokio::spawn(super::serve(super::bind(&path).unwrap(), handler.clone()));
        let ask = |line: &'static [u8]| {
            let path = path.clone();
            async move {
                let mut stream = tokio::net::UnixStream::connect(&path).await.unwrap();
                stream.write_all(line).await.unwrap();
                let mut answer = String::new();
                stream.read_to_string(&mut answer).await.unwrap();
                serde_json::from_str::<super::Response>(&answer).unwrap()
            }
        };
        let answer = ask(b"{\"op\":\"no-such-op\"}\n").await;
        assert!(!answer.ok);
        let answer_error = answer.error.unwrap();
        assert!(
            answer_error.starts_with("malformed request"),
            "{answer_error}"
        );
        assert!(ask(b"{\"op\":\"status\"}\n").await.ok);
        let refusals = handler.0.lock().unwrap().clone();
        assert_eq!(refusals.len(), 1, "{refusals:?}");
        let (cgroup, why) = &refusals[0];
        assert_eq!(*why, answer_error);
        // This test's own cgroup, read the way the socket reads a caller's.
        let own = crate::cgroup::of_pid(std::process::id()).ok();
        assert_eq!(*cgroup, own);

        // A connection closed to make room before its request came is put to the handler
        // too (its client, a runtime's hook, could not record it), counted per caller.
        handler.0.lock().unwrap().clear();
        let mut idle = Vec::new();
        for _ in 0..super::MAX_CONNECTIONS + 1 {
            idle.push(tokio::net::UnixStream::connect(&path).await.unwrap());
        }
        let evicted = async {
            loop {
                let seen = handler.0.lock().unwrap().clone();
                if let Some((_, why)) = seen.iter().find(|(_, w)| w.contains("closed before")) {
                    return why.clone();
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        let why = tokio::time::timeout(std::time::Duration::from_secs(5), evicted)
            .await
            .unwrap();
        assert!(why.contains("full of idle connections"), "{why}");
        drop(idle);
        server.abort();
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod socket_path_tests {
    use super::{bind, check_free};

    #[test]
    fn only_a_socket_nobody_answers_on_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("egressd.sock");
        assert!(!check_free(&path).unwrap());

        // A file given as the socket by mistake stays.
        std::fs::write(&path, "config").unwrap();
        let err = bind(&path).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "config");
        std::fs::remove_file(&path).unwrap();

        // A running daemon's socket is that daemon's.
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_eq!(
            check_free(&path).unwrap_err().kind(),
            std::io::ErrorKind::AddrInUse
        );
        // A daemon that hangs with its queue full is still that daemon's, and asking does
        // not wait for it.
        drop(live);
        std::fs::remove_file(&path).unwrap();
        let hung =
            socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        hung.bind(&socket2::SockAddr::unix(&path).unwrap()).unwrap();
        hung.listen(0).unwrap();
        let mut queued = Vec::new();
        for _ in 0..4 {
            let c = socket2::Socket::new(
                socket2::Domain::UNIX,
                socket2::Type::STREAM.nonblocking(),
                None,
            )
            .unwrap();
            let _ = c.connect(&socket2::SockAddr::unix(&path).unwrap());
            queued.push(c);
        }
        let asked = std::time::Instant::now();
        assert_eq!(
            check_free(&path).unwrap_err().kind(),
            std::io::ErrorKind::AddrInUse
        );
        assert!(asked.elapsed() < std::time::Duration::from_secs(1));
        // One left behind is replaced.
        drop(hung);
        assert!(check_free(&path).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { drop(bind(&path).unwrap()) });
    }
}
