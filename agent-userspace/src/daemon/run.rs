//! `egressd run`: start-up, the event and housekeeping loops, and a clean stop.
use std::{
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
    time::Duration,
};

use anyhow::Context;
use time::OffsetDateTime;

use super::{core::Core, state::State};
use crate::{
    alerts::{AlertSettings, Alerts, QuarantineOrder, RefusalRecords},
    audit::{
        Alert, AuditLog, AuditSink, ClockOffset, DaemonStart, DaemonStop, EventsLost, Hook,
        LostBySandbox, NetworkDecision, OnFailure, ProxyEvent, Record, RefusedOption, StopReason,
    },
    bpf::{
        active_lsms, attach_lsm, EventReader, KernelEvent, PeerMap, PinLayout, PolicyMaps, Programs,
    },
    control::{self, Admission, DetachReason, Handler, Request, Response},
    credentials::CredentialStore,
    metrics,
    proxy::{CertAuthority, Proxy, ProxyConfig},
};

/// How often the daemon records that it is alive (bounds the gap reported after a crash).
const HEARTBEAT: Duration = Duration::from_secs(2);
/// In the state directory: the audit trail's last numbered and written sequence numbers.
const AUDIT_SEQUENCE_FILE: &str = "audit-sequence";
/// How often the kernel's lost-event counter is checked.
const LOST_POLL: Duration = Duration::from_secs(1);

pub struct DaemonOptions {
    /// `-` for stdout.
    pub audit_log: String,
    /// Failure behaviour, rotation and queue of the audit trail.
    pub audit: crate::audit::AuditConfig,
    pub socket: PathBuf,
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    /// Port of the proxy listener on each sandbox namespace's loopback.
    pub proxy_port: u16,
    /// A sandbox's DNS resolver listens on this port plus the sandbox's index.
    pub dns_port_base: u16,
    /// Resolvers asked for sandboxes whose policy has no `dns:` section.
    pub dns_upstream: Vec<std::net::SocketAddr>,
    pub proxy: ProxyConfig,
    pub credentials: CredentialStore,
    /// Where to serve Prometheus metrics (`/metrics`); none when unset.
    pub metrics: Option<std::net::SocketAddr>,
    /// A syslog collector that also gets every audit record; none when unset.
    pub collector: Option<crate::collector::CollectorConfig>,
    /// The configuration's `alerts:`: responses and burst figures for sandboxes whose
    /// policy does not set them.
    pub alerts: AlertSettings,
    /// Proxy worker threads ([`crate::proxy::configured_threads`]).
    pub proxy_threads: usize,
}

/// The answer to a control request that would change something once the stop began.
const STOPPING: &str = "the daemon is stopping: nothing is changed now (sandboxes stay \
                        confined by their pinned programs); retry once it runs again";

struct Shared(Mutex<Core>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock leaves data that is still consistent enough to
        // report; keep serving rather than abort enforcement bookkeeping.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Handler for Shared {
    fn admit(&self, cgroup: Option<&std::path::Path>, joins: Option<&str>) -> Admission {
        self.lock().control_from(cgroup, joins)
    }

    fn status_scope(&self, cgroup: &std::path::Path) -> Option<String> {
        self.lock().sandbox_at(cgroup).map(|r| r.name.clone())
    }

    fn refused(&self, cgroup: Option<&std::path::Path>, why: &str, count: u64) {
        self.lock().control_refused(cgroup, why, count);
    }

    fn handle(&self, request: Request, admission: &Admission) -> Response {
        if *admission == Admission::JoinOwnSandbox {
            // From inside the sandbox: nothing of what it sent is parsed or opened, and it
            // can only be let in, never attach.
            let Request::Join {
                name,
                container,
                policy_path,
                runtime_init,
                ..
            } = request
            else {
                return Response::error("permission denied: only a join of the caller's sandbox");
            };
            let mut core = self.lock();
            if core.stopping {
                // The hook records nothing the daemon refused: the daemon does, naming
                // the sandbox's own policy (not a path the caller sent), within the
                // control socket's refusals for the window (the rest counted).
                if core.control_refusals.admit(&name) {
                    let attached = core
                        .state
                        .sandboxes
                        .get(&name)
                        .map_or_else(String::new, |r| r.policy_path.clone());
                    core.policy_rejected(name, &attached, None, STOPPING.to_owned());
                }
                return Response::error(STOPPING);
            }
            return match core.join_from_inside(&name, &container, &policy_path, &runtime_init) {
                Ok(m) => Response::ok(m),
                Err(e) => Response::error(e),
            };
        }
        // Parsing and compiling a large policy takes a while: not under the lock.
        let parsed = match &request {
            Request::Attach {
                policy_path,
                policy_source,
                ..
            }
            | Request::Join {
                policy_path,
                policy_source,
                ..
            } => Some(Core::prepare_policy(policy_source, policy_path)),
            _ => None,
        };
        let mut core = self.lock();
        let changes = !matches!(
            request,
            Request::Status
                | Request::CaExport
                | Request::Credentials
                | Request::HookRefused { .. }
        );
        if core.stopping && changes {
            // An attach or join refused so (a runtime's hook, which records nothing the
            // daemon refused) is recorded.
            if let Request::Attach {
                name: Some(name),
                policy_path,
                ..
            }
            | Request::Join {
                name, policy_path, ..
            } = &request
            {
                core.policy_rejected(name.clone(), policy_path, None, STOPPING.to_owned());
            }
            return Response::error(STOPPING);
        }
        let result = match request {
            Request::Attach {
                cgroup,
                name,
                policy_path,
                policy_source,
                netns,
                runtime_init,
            } => core.attach_parsed(
                &cgroup,
                name,
                policy_path,
                policy_source,
                super::core::Arrival {
                    netns,
                    runtime_init,
                },
                parsed.unwrap_or_else(|| Err("internal error: policy not parsed".into())),
            ),
            Request::Join {
                name,
                container,
                cgroup,
                policy_path,
                policy_source,
                netns,
                runtime_init,
            } => core.attach_or_join(
                super::join::Joining {
                    name,
                    container,
                    cgroup,
                    policy_path,
                    netns,
                    init: runtime_init,
                },
                policy_source,
                parsed.unwrap_or_else(|| Err("internal error: policy not parsed".into())),
            ),
            Request::CaExport => Ok(core.proxy.ca_pem.clone()),
            Request::Placeholder {
                sandbox,
                credential,
            } => core.placeholder(&sandbox, &credential),
            Request::Credentials => {
                return Response {
                    ok: true,
                    credentials: Some(core.credential_states()),
                    ..Default::default()
                }
            }
            Request::Detach {
                name,
                cgroup,
                reason,
            } => core.detach(name, cgroup, reason.unwrap_or(DetachReason::Operator)),
            Request::Quarantine { name, reason } => core.quarantine_by_operator(&name, reason),
            Request::Release { name } => core.release(&name),
            Request::HookRefused { container, reason } => {
                core.hook_refused(&container, &reason);
                Ok("recorded".to_owned())
            }
            Request::Status => {
                let only = match admission {
                    Admission::OwnStatus(name) => Some(name.as_str()),
                    _ => None,
                };
                return Response {
                    ok: true,
                    status: Some(core.status(only)),
                    ..Default::default()
                };
            }
        };
        // A replaced policy's connections are judged again outside the lock.
        let cut = core.pending_cut.take();
        drop(core);
        match (result, cut.and_then(super::connections::CutJob::run)) {
            (Ok(m), Some(cut)) => Response::ok(format!("{m}; {cut}")),
            (Ok(m), None) => Response::ok(m),
            (Err(e), _) => Response::error(e),
        }
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Runs the daemon until SIGTERM or SIGINT.
/// Runs the daemon until it is told to stop. `_claim` ([`super::claim_for`] of the same
/// options) is this process's hold on the state, pins and socket it uses.
pub async fn run(opts: DaemonOptions, _claim: &super::InstanceLock) -> anyhow::Result<()> {
    if let Some(why) = crate::cgroup::v1_socket_hazard() {
        anyhow::bail!("refusing to start: {why}");
    }
    let layout = PinLayout::new(&opts.bpffs);
    // This build's maps made now, not found pinned: loss counts reported so far are
    // another build's (see `State::start_lost_counts`).
    let fresh_maps = !layout.maps().join("LOST").exists();
    let mut programs = Programs::load(&layout)?;
    let maps = PolicyMaps::new(&mut programs)?;
    let mut events = EventReader::new(&mut programs)?;
    // Before the audit trail opens, so that every record is shipped and counted.
    if let Some(config) = &opts.collector {
        if let Some(task) = crate::collector::start(config) {
            let shipping = tokio::spawn(task);
            // It never ends while the daemon runs: one that does (a panic) ships nothing
            // more, and nothing else would say so.
            tokio::spawn(async move {
                if let Err(e) = shipping.await {
                    if e.is_panic() {
                        tracing::error!(
                            "The collector's task panicked: audit records are no longer \
                             shipped to the collector (the audit log still has them)"
                        );
                    }
                }
            });
        }
    }
    let scrape_sources = Arc::new(OnceLock::new());
    let metrics_server = match opts.metrics {
        Some(addr) => Some(start_metrics(addr, &events, scrape_sources.clone()).await?),
        None => None,
    };
    let packet_sockets = cover_packet_sockets(&mut programs, &layout);
    let compat_setsockopt = crate::bpf::compat_setsockopt_coverage();
    if let Err(why) = &compat_setsockopt {
        tracing::warn!(why = %why, "Socket options set by 32-bit calls are NOT judged");
    }

    let sink = if opts.audit_log == "-" {
        AuditSink::Stdout
    } else {
        AuditSink::File(PathBuf::from(&opts.audit_log))
    };
    let (audit, audit_task) = AuditLog::open_with(
        sink,
        &opts.audit,
        Some(opts.state_dir.join(AUDIT_SEQUENCE_FILE)),
    )
    .with_context(|| format!("opening audit log {}", opts.audit_log))?;
    let mut audit_task = tokio::spawn(audit_task.run());
    // Every alert producer raises through a clone of this (see `Alerts::raise`); the
    // quarantine orders it issues are carried out by the loop below.
    let (alerts, mut quarantine_orders) = Alerts::new(audit.clone(), opts.alerts.clone());
    let mut clock = ClockOffset::sample().context("reading clocks")?;

    if opts.dns_upstream.is_empty() {
        tracing::warn!(
            "No dns_upstream: a sandbox whose policy names hosts but gives no dns.upstream \
             gets SERVFAIL for every name (the audit log says why)"
        );
    }
    let ca_dir = opts.state_dir.join("ca");
    let ca = CertAuthority::load_or_create(&ca_dir)
        .with_context(|| format!("loading or creating the local CA in {}", ca_dir.display()))?;
    let ca_pem = ca.ca_pem();
    let mut credentials = opts.credentials;
    // Placeholder sentinels stay the same across restarts: derived with a kept key.
    credentials
        .load_placeholder_key(&opts.state_dir)
        .context("loading the placeholder key")?;
    let credentials = std::sync::Arc::new(credentials);
    // Values that outlive the daemon (files, Vault KV, commands) are read before the proxy
    // serves anything, so that they are matched from the start.
    let (primed, unread) = credentials.prime().await;
    if primed > 0 {
        tracing::info!(
            values = primed,
            "Credential values read ahead, so that they are scrubbed and masked from the start"
        );
    }
    // One task per value, each read to its end however long it takes (a file read that
    // blocks holds one thread, not one more per attempt), again after a failure.
    for (name, why) in unread {
        tracing::warn!(
            credential = %name,
            error = %why,
            "Credential value not read at start: until read (tried again every {} s, and at \
             the first request that needs it) it is not scrubbed from answers, masked or \
             refused on the way out",
            READ_AHEAD_RETRY.as_secs()
        );
        let credentials = credentials.clone();
        tokio::spawn(async move {
            // Each new reason is said once, not every few seconds.
            let mut said = why;
            loop {
                tokio::time::sleep(READ_AHEAD_RETRY).await;
                match credentials.read_ahead_unbounded(&name).await {
                    Ok(()) => {
                        tracing::info!(credential = %name, "Credential value read ahead at last");
                        break;
                    }
                    Err(why) if why != said => {
                        tracing::warn!(credential = %name, error = %why, "Credential value still not read");
                        said = why;
                    }
                    Err(_) => {}
                }
            }
        });
    }
    // The audit trail's last check: whatever field a secret reached (a ref name a sandbox
    // chose, a DNS name, a reason quoting a request), it is masked before it is written.
    // The daemon's own log lines likewise.
    let redact_credentials = credentials.clone();
    let find_secrets: crate::audit::FindSecrets = std::sync::Arc::new(move |line: &[u8]| {
        let mut found = Vec::new();
        redact_credentials
            .matcher()
            .each_match_cut(line, |range, _, _| found.push(range));
        found
    });
    audit.redact_with(find_secrets.clone());
    super::log::redact_with(find_secrets);
    let metrics_credentials = credentials.clone();
    let proxy_audit = audit.clone();
    let proxy_alerts = alerts.clone();
    let refusal_alerts = alerts.clone();
    let refusals = Arc::new(RefusalRecords::new(
        PROXY_REFUSALS_RECORDED,
        PROXY_REFUSAL_WINDOW,
        "proxy refusals and requests abandoned before a response",
        Arc::new(move |alert| {
            refusal_alerts.raise(alert);
        }),
    ));
    // Flushed at the stop: refusals counted in a window not over yet are raised then.
    let proxy_refusals = refusals.clone();
    let proxy = Proxy::new(
        opts.proxy,
        std::sync::Arc::new(ca),
        credentials.clone(),
        std::sync::Arc::new(move |record: crate::audit::ProxyRecord| {
            let time = now();
            // A secret seen in either direction raises an alert beside the request's
            // record, with the response the sandbox's alert settings give it.
            let mut alert = record.alert(time);
            if let Some(alert) = &mut alert {
                alert.response = proxy_alerts.response_for(&alert.sandbox, alert.kind);
            }
            // A sandbox's refusals past the limit are counted, not written one by one.
            if record.may_be_summarised(alert.as_ref()) && !refusals.admit(&record.sandbox) {
                return;
            }
            proxy_audit.emit(Record::Proxy(ProxyEvent { time, record }));
            if let Some(alert) = alert {
                proxy_alerts.raise(alert);
            }
        }),
    )
    .context("setting up the proxy")?;
    // Set at SIGTERM: a request still running then (an HTTP/2 stream's task outlives its
    // connection's by a step) gets no credential after the stop.
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let proxy = {
        let audit = audit.clone();
        let refuse_unrecorded = matches!(opts.audit.on_failure, OnFailure::RefuseCredentials);
        let stopping = stopping.clone();
        proxy.with_credential_gate(Arc::new(move || {
            if stopping.load(std::sync::atomic::Ordering::SeqCst) {
                return Err("the daemon is stopping".to_owned());
            }
            if refuse_unrecorded && !audit.records_credential_use() {
                return Err(
                    "the audit log cannot be written (audit.on_failure: refuse-credentials)"
                        .to_owned(),
                );
            }
            Ok(())
        }))
    };
    let peers = PeerMap::new(&mut programs)?;
    let dns = super::dns::DnsRuntime::new(
        opts.dns_port_base,
        opts.dns_upstream.clone(),
        proxy.dialer(),
        audit.clone(),
        alerts.clone(),
        tokio::runtime::Handle::current(),
    );
    let proxy = super::proxy::ProxyRuntime::new(
        opts.proxy_port,
        ca_pem,
        credentials,
        proxy,
        peers,
        crate::proxy::Workers::start(opts.proxy_threads)
            .context("starting the proxy's worker threads")?,
    );

    let previous = State::load(&opts.state_dir)?;
    let previous_seen = previous
        .as_ref()
        .filter(|s| !s.clean_shutdown)
        .and_then(|s| s.last_seen.as_deref())
        .and_then(|t| {
            OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        });
    let mut state = previous.unwrap_or_default();
    state.start_lost_counts(agent_common::ABI_VERSION, fresh_maps);
    state.clean_shutdown = false;
    state.last_seen = Some(rfc3339(now()));

    let control_alerts = alerts.clone();
    let control_refusals = RefusalRecords::new(
        CONTROL_REFUSALS_RECORDED,
        PROXY_REFUSAL_WINDOW,
        "control-socket refusals",
        Arc::new(move |alert| {
            control_alerts.raise(alert);
        }),
    );
    let mut core = Core {
        poststops_waiting: Default::default(),
        pending_cut: None,
        cut_epochs: std::collections::HashMap::new(),
        stopping: false,
        saver: Default::default(),
        revocations: Default::default(),
        control_refusals,
        retiring: Vec::new(),
        layout,
        bpffs: opts.bpffs.clone(),
        programs,
        maps,
        state,
        state_dir: opts.state_dir.clone(),
        audit: audit.clone(),
        audit_log: opts.audit_log.clone(),
        started_at: now(),
        compiled: Default::default(),
        proxy,
        dns,
        alerts,
        bursts: Default::default(),
        lost_denied_seen: Default::default(),
        runtime: tokio::runtime::Handle::current(),
        packet_sockets,
        compat_setsockopt,
        source_routing: Default::default(),
        known_pids: Default::default(),
        departed: Default::default(),
        replaced: Default::default(),
        rejections: Default::default(),
        lost_unread: 0,
    };
    core.lost_denied_seen = core.maps.lost_denied_by_sandbox().into_iter().collect();
    let adopted = core.reconcile();
    audit.emit(Record::DaemonStart(DaemonStart {
        time: now(),
        pid: std::process::id(),
        adopted_sandboxes: adopted,
        previous_seen,
    }));
    if let Some(seen) = previous_seen {
        tracing::warn!(last_seen = %rfc3339(seen), "Previous daemon stopped without shutting down; sandboxes stayed confined by pinned links");
    }
    tracing::info!(adopted, bpffs = %opts.bpffs.display(), socket = %opts.socket.display(), "egressd running");

    let dns_sink = core.dns.sink.clone();
    let dns_denials = core.dns.denials.clone();
    let shared = Arc::new(Shared(Mutex::new(core)));
    let weak = Arc::downgrade(&shared);
    let denials_to = weak.clone();
    let _ = dns_denials.set(Arc::new(move |index, count| {
        if let Some(shared) = denials_to.upgrade() {
            let mut core = shared.lock();
            let at = monotonic_ns();
            // As many as complete a burst at most: more at the same instant change
            // nothing, and a flood must not hold the daemon's lock in proportion.
            let needed = core
                .state
                .by_index(index)
                .map_or(0, |r| core.alerts.burst_config(&r.name).count);
            for _ in 0..count.min(u64::from(needed)) {
                core.note_denial(index, at);
            }
        }
    }));
    let _ = dns_sink.set(Arc::new(move |index, learned: &[crate::dns::Learned]| {
        let shared = weak.upgrade().ok_or("the daemon is stopping")?;
        let mut core = shared.lock();
        core.learn(index, learned)
    }));
    let listener = control::bind(&opts.socket)
        .with_context(|| format!("binding control socket {}", opts.socket.display()))?;
    let server = tokio::spawn(control::serve(listener, shared.clone()));
    let _ = scrape_sources.set(ScrapeSources {
        shared: Arc::downgrade(&shared),
        credentials: metrics_credentials,
    });
    // Ready: sandboxes are adopted and the control socket accepts requests.
    match super::notify::notify("READY=1") {
        Ok(true) => tracing::debug!("Readiness sent to the service manager"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "Notifying the service manager failed"),
    }

    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut heartbeat_write: Option<tokio::task::JoinHandle<()>> = None;
    let mut lost_poll = tokio::time::interval(LOST_POLL);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    // logrotate's `postrotate` sends SIGHUP after moving the log away (`create` mode).
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    // A failure that stops the daemon after the usual stop (records, connections closed,
    // a `daemon-stop` record with outcome failure), then makes it exit with an error.
    let mut failed: Option<anyhow::Error> = None;
    loop {
        tokio::select! {
            batch = events.next_batch() => {
                match batch.context("reading the kernel ring buffer") {
                    Ok(batch) => record_events(&shared, &clock, batch, audit.backlog() < KERNEL_EVENTS_BACKLOG),
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "Stopping: kernel events can no longer be read (sandboxes stay confined)");
                        failed = Some(e);
                        break;
                    }
                }
            }
            Some(order) = quarantine_orders.recv() => carry_out(&shared, order),
            _ = lost_poll.tick() => {
                // A wall clock set after the daemon started (time synchronisation at
                // boot): kernel records follow it, as the proxy's and resolver's do.
                if let Some(stepped) = ClockOffset::sample().ok().and_then(|s| clock.after_step(s)) {
                    tracing::warn!(
                        moved_ms = (stepped.as_nanos() - clock.as_nanos()) / 1_000_000,
                        "Wall clock stepped; kernel event times follow it from now"
                    );
                    clock = stepped;
                }
                report_lost(&shared);
                let sandboxes = {
                    let mut core = shared.lock();
                    core.flush_alerts();
                    core.expire_learned();
                    core.reap_vanished();
                    core.detach_stopped();
                    core.sandbox_cgroups()
                };
                // The sandboxes' cgroup trees are walked off the lock (and off the
                // runtime's threads): DNS answers, attaches and kernel events go on.
                match tokio::task::spawn_blocking(move || Core::walk_sandboxes(sandboxes)).await {
                    Ok(walked) => shared.lock().check_walked_processes(walked),
                    Err(e) => tracing::error!(error = %e, "Walking the sandboxes' cgroups failed"),
                }
            }
            _ = heartbeat.tick() => {
                // Written off the daemon's lock and its runtime's threads, one at a time:
                // a disk whose `fsync` stalls holds up this write, and a change saved under
                // the lock meanwhile (an attach) waits for it, not every heartbeat.
                if heartbeat_write.as_ref().is_none_or(|w| w.is_finished()) {
                    let (state, number, saver) = {
                        let mut core = shared.lock();
                        core.state.last_seen = Some(rfc3339(now()));
                        (core.state.clone(), core.saver.number(), core.saver.clone())
                    };
                    let dir = opts.state_dir.clone();
                    heartbeat_write = Some(tokio::task::spawn_blocking(move || {
                        if let Err(e) = saver.write(number, &state, &dir) {
                            tracing::error!(error = %e, "Saving state failed");
                        }
                    }));
                }
            }
            _ = sighup.recv() => {
                tracing::info!("SIGHUP: reopening the audit log");
                audit.reopen();
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            // The writer ends only when every handle is gone, which the daemon never lets
            // happen while it runs: it failed. Nothing more could be recorded, so stop
            // (sandboxes stay confined; a supervisor restarts the daemon).
            done = &mut audit_task => {
                let why = match done {
                    Ok(Ok(_)) => "it ended".to_owned(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                };
                let _ = super::notify::notify("STOPPING=1");
                // What was queued and never numbered: the next start reports it lost.
                let held = audit.unnumbered().count();
                if held > 0 {
                    let sequence = opts.state_dir.join(AUDIT_SEQUENCE_FILE);
                    if let Err(e) = crate::audit::note_unnumbered_at_stop(&sequence, held) {
                        tracing::error!(error = %e, held, "Noting the audit records held at the stop failed");
                    }
                }
                anyhow::bail!("the audit writer stopped ({why}); stopping, sandboxes stay confined");
            }
        }
    }

    tracing::info!("Stopping; sandboxes stay confined (pinned links)");
    {
        let mut core = shared.lock();
        core.stopping = true;
        // Cut jobs still running close nothing more (their records would follow the stop).
        core.supersede_cuts(None);
    }
    let _ = super::notify::notify("STOPPING=1");
    server.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    let rest = events.drain_now();
    record_events(&shared, &clock, rest, true);
    // Alerts raised until now still get the response their records say.
    while let Ok(order) = quarantine_orders.try_recv() {
        carry_out(&shared, order);
    }
    report_lost(&shared);
    // Proxied connections end before the stop is recorded: a connection left open would
    // go on injecting credentials after it, and its records (queued as each task ends)
    // belong before it. Bounded: a task ends at its next poll.
    stopping.store(true, std::sync::atomic::Ordering::SeqCst);
    let closing = {
        let mut core = shared.lock();
        core.proxy.shutdown();
        core.proxy.close_all_connections()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while closing.iter().any(|h| !h.is_finished()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The refusals of those connections counted rather than recorded are reported now,
    // before the stop. It holds an audit handle (through the alerts), which the writer
    // waits for below.
    proxy_refusals.flush();
    drop(proxy_refusals);
    // So do the resolvers (a query sent upstream and not answered is recorded as its task
    // ends) and the revocations under way (each credential's outcome, or that it was cut
    // short). Bounded.
    let (dns_stopped, revocations) = {
        let mut core = shared.lock();
        (core.dns.shutdown(), core.revocations.clone())
    };
    if !dns_stopped.finish(Duration::from_secs(2)).await {
        tracing::warn!(
            "DNS resolver tasks still ending at shutdown; their records may follow the stop record"
        );
    }
    let cut = revocations.finish(&audit, REVOCATIONS_AT_STOP).await;
    if cut > 0 {
        tracing::warn!(
            cut,
            "Credential revocations cut short by the stop (recorded as not revoked)"
        );
    }
    {
        let mut core = shared.lock();
        core.control_refusals.flush();
        core.flush_alerts();
    }
    // The alerts raised since the orders were last read (the refusals and windows
    // flushed above) still get the response their records say.
    while let Ok(order) = quarantine_orders.try_recv() {
        carry_out(&shared, order);
    }
    let (mut stopped_state, saver) = {
        let mut core = shared.lock();
        core.audit.emit(Record::DaemonStop(DaemonStop {
            time: now(),
            pid: std::process::id(),
            reason: if failed.is_some() {
                StopReason::Error
            } else {
                StopReason::Signal
            },
        }));
        // Saved as a clean stop only once the writer has written everything (below): a
        // stop whose last records never reached the log is reported by the next run.
        core.state.last_seen = Some(rfc3339(now()));
        core.save_state();
        (core.state.clone(), core.saver.clone())
    };
    let _ = std::fs::remove_file(&opts.socket);
    let unnumbered = audit.unnumbered();
    drop(audit);
    drop(shared);
    // Records are written in order as they arrive, so once the stop record is out nothing
    // earlier is pending; a task still holding a handle must not hold the stop: bounded.
    let mut noted = None;
    match tokio::time::timeout(Duration::from_secs(5), audit_task).await {
        Ok(done) => {
            done.context("audit writer task")?
                .context("writing the audit log")?;
            stopped_state.clean_shutdown = true;
            if let Err(e) = saver.write(saver.number(), &stopped_state, &opts.state_dir) {
                tracing::error!(error = %e, "Saving state failed");
            }
        }
        Err(_) => {
            // Records numbered and not written are in the sequence file; those not yet
            // numbered are counted here, for the next start to report.
            let held = unnumbered.count();
            tracing::warn!(
                held,
                "Audit records still held at shutdown; not waiting for them (the next start \
                 reports this stop as unclean, and the records as lost)"
            );
            let sequence = opts.state_dir.join(AUDIT_SEQUENCE_FILE);
            if let Err(e) = crate::audit::note_unnumbered_at_stop(&sequence, held) {
                tracing::error!(error = %e, held, "Noting the audit records held at the stop failed");
            }
            noted = Some(sequence);
        }
    }
    crate::collector::flush(Duration::from_secs(2)).await;
    // Tasks ending meanwhile (a DNS query, a proxied request dropped with the runtime's
    // last steps) may have emitted more records the stuck writer never numbered: the
    // note counts them too.
    if let Some(sequence) = noted {
        // Taken again whenever any is held: the count and the number stored beside it
        // go together (the writer may have numbered some meanwhile).
        let now = unnumbered.count();
        if now > 0 {
            if let Err(e) = crate::audit::note_unnumbered_at_stop(&sequence, now) {
                tracing::error!(error = %e, held = now, "Noting the audit records held at the stop failed");
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Quarantines a sandbox because an alert's configured response says so.
fn carry_out(shared: &Shared, order: QuarantineOrder) {
    let mut core = shared.lock();
    let trigger = order.kind.as_str();
    if let Err(e) = core.quarantine(&order.sandbox, Some(order.reason), trigger) {
        tracing::error!(sandbox = %order.sandbox, trigger, error = %e, "Quarantine ordered by an alert failed");
    }
}

/// What a scrape reads from the running daemon, set once it is up.
struct ScrapeSources {
    shared: std::sync::Weak<Shared>,
    credentials: Arc<CredentialStore>,
}

/// Installs the metrics fed by the audit records and serves them on `addr`; the values
/// no record carries are read from the daemon on each scrape.
async fn start_metrics(
    addr: std::net::SocketAddr,
    events: &EventReader,
    sources: Arc<OnceLock<ScrapeSources>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let ring = match events.usage_probe() {
        Ok(probe) => Some(probe),
        Err(e) => {
            tracing::warn!(error = %e, "Ring buffer fill not available as a metric");
            None
        }
    };
    let snapshot: metrics::SnapshotFn = Arc::new(move || {
        let mut s = metrics::Snapshot {
            ring: ring.as_ref().map(|p| metrics::RingUsage {
                used_bytes: p.used_bytes(),
                capacity_bytes: p.capacity_bytes(),
            }),
            ..Default::default()
        };
        let Some(sources) = sources.get() else {
            return s;
        };
        s.credentials = sources.credentials.stats();
        if let Some(shared) = sources.shared.upgrade() {
            let core = shared.lock();
            s.sandboxes = Some(core.state.sandboxes.len() as u64);
            s.kernel_events_lost = Some(core.lost_total());
            let audit = core.audit.health();
            s.audit = Some(metrics::AuditTrail {
                healthy: audit.healthy && core.audit.healthy(),
                queued: audit.queued,
                lost: audit.lost,
            });
            s.proxy_open_connections = core.proxy.open_connections();
        }
        s
    });
    let installed = metrics::install(Arc::new(metrics::Metrics::new(Some(snapshot))));
    let (bound, serving) = metrics::serve(addr, installed).await?;
    tracing::info!(%bound, "Serving Prometheus metrics at /metrics");
    Ok(tokio::spawn(serving))
}

/// How often values not read ahead at start are tried again.
const READ_AHEAD_RETRY: Duration = Duration::from_secs(5);

/// Attaches the system-wide LSM program that keeps sandboxes from creating packet and other
/// non-inet sockets, where the kernel runs BPF LSM programs. Says why not otherwise.
fn cover_packet_sockets(programs: &mut Programs, layout: &PinLayout) -> Result<(), String> {
    let result = match active_lsms() {
        Ok(lsms) if lsms.bpf_active() => attach_lsm(programs, layout)
            .map_err(|e| format!("attaching the BPF LSM program failed: {e}")),
        Ok(lsms) => Err(format!(
            "`bpf` is not in the kernel's active LSM list ({}); boot with lsm=...,bpf",
            lsms.active.join(",")
        )),
        Err(e) => Err(format!("cannot read the active LSM list: {e}")),
    };
    match &result {
        Ok(()) => {
            tracing::info!("Packet and other non-inet sockets are refused in sandboxes (BPF LSM)")
        }
        Err(why) => tracing::warn!(
            why = %why,
            "Packet sockets are NOT covered: a sandbox holding CAP_NET_RAW can send raw frames to any address"
        ),
    }
    result
}

/// Proxy refusals one sandbox gets recorded one by one per [`PROXY_REFUSAL_WINDOW`]; the
/// rest are counted in one `rate-limit` alert.
const PROXY_REFUSALS_RECORDED: u32 = 1000;
/// Control-socket refusals recorded one by one per window and caller's sandbox (or the
/// host); the rest are counted in one `rate-limit` alert.
const CONTROL_REFUSALS_RECORDED: u32 = 20;
const PROXY_REFUSAL_WINDOW: Duration = Duration::from_secs(10);
/// Records queued to the audit writer past which the kernel's events are counted as lost
/// instead of queued (a log that blocks must not grow the daemon without bound).
const KERNEL_EVENTS_BACKLOG: u64 = 65_536;
/// How long the stop waits for credential revocations under way (each may run a command
/// or call a store) before it records the rest as not revoked.
const REVOCATIONS_AT_STOP: Duration = Duration::from_secs(5);

/// Records a batch of kernel events; `keep`: queue them to the writer, else (the writer is
/// far behind) count them as lost ([`deliver`]). Either way bursts are counted and their
/// alerts raised.
fn record_events(shared: &Shared, clock: &ClockOffset, batch: Vec<KernelEvent>, keep: bool) {
    let mut core = shared.lock();
    // Sent to the writer together, as one message: a denial that completes a burst sends
    // the records before it first, then its alert, so records stay in the order of the
    // events (one message per denial let a flood of them fill the writer's queue).
    let mut records = Vec::with_capacity(batch.len());
    let mut undecodable = 0;
    for ev in batch {
        match ev {
            KernelEvent::Connect(ev) => {
                let (sandbox, rule) = core.names(ev.sandbox_index, ev.policy_slot, ev.rule_id);
                match NetworkDecision::from_event(&ev, clock, sandbox, rule) {
                    Ok(mut rec) => {
                        if rec.hook.has_destination() && rec.hook != Hook::SkbEgress {
                            rec.domain = core
                                .dns
                                .name_of(ev.sandbox_index, rec.destination_ip, ev.rule_id)
                                .map(str::to_string);
                        }
                        // Only counted here; the alert comes later (`flush_alerts`).
                        if let Some(o) = rec.option.filter(RefusedOption::routes) {
                            core.note_source_routing(&rec.sandbox, o.name);
                        }
                        records.push(Record::Network(rec));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "Undecodable kernel event");
                        undecodable += 1;
                    }
                }
                // After the decision's own record, so a burst alert follows the denial
                // that completed it.
                if ev.verdict == agent_common::verdict::DENY && ev.sandbox_index != 0 {
                    if let Some(alert) = core.denial_burst(ev.sandbox_index, ev.ts_ns) {
                        deliver(&mut core, std::mem::take(&mut records), keep);
                        core.alerts.raise(alert);
                    }
                }
            }
            KernelEvent::Unknown { version, kind, len } => {
                tracing::error!(
                    version,
                    kind,
                    len,
                    "Kernel event of an unknown kind or ABI version"
                );
                undecodable += 1;
            }
        }
    }
    // A decision the kernel recorded that no record can say: counted as lost, under a
    // name no sandbox can have.
    if undecodable > 0 {
        core.lost_unread += undecodable;
        records.push(Record::EventsLost(EventsLost {
            time: now(),
            count: undecodable,
            total: core.lost_total(),
            sandboxes: vec![LostBySandbox {
                name: "undecodable events".to_owned(),
                count: undecodable,
            }],
        }));
    }
    deliver(&mut core, records, keep);
}

/// Queues kernel records to the writer or, while it is far behind (`!keep`), counts the
/// decisions as lost, by sandbox, in one `events-lost` record: the ring buffer is still
/// read, so bursts and the quarantines they order go on, and memory stays bounded.
fn deliver(core: &mut Core, records: Vec<Record>, keep: bool) {
    if keep {
        core.audit.emit_all(records);
        return;
    }
    let mut by: std::collections::BTreeMap<String, u64> = Default::default();
    let mut kept = Vec::new();
    for record in records {
        match record {
            Record::Network(rec) => *by.entry(rec.sandbox).or_default() += 1,
            other => kept.push(other),
        }
    }
    let count: u64 = by.values().sum();
    if count > 0 {
        core.lost_unread += count;
        tracing::warn!(
            count,
            "Audit writer far behind: kernel decisions counted as lost, not queued"
        );
        kept.push(Record::EventsLost(EventsLost {
            time: now(),
            count,
            total: core.lost_total(),
            sandboxes: crate::audit::lost_by_sandbox(by),
        }));
    }
    core.audit.emit_all(kept);
}

fn report_lost(shared: &Shared) {
    let mut core = shared.lock();
    let total = core.maps.lost_total();
    if total > core.state.lost_reported {
        let count = total - core.state.lost_reported;
        // Whose events they were: the per-sandbox counters' increases since the last
        // report (a counter below what was reported was recreated: all of it is new).
        let mut sandboxes = std::collections::BTreeMap::<String, u64>::new();
        let mut alerts = Vec::new();
        for (index, lost) in core.maps.lost_by_sandbox() {
            let reported = core
                .state
                .lost_reported_by_index
                .insert(index, lost)
                .unwrap_or(0);
            let new = if lost >= reported {
                lost - reported
            } else {
                lost
            };
            if new == 0 {
                continue;
            }
            // A sandbox detached since its events were lost is still named.
            let name = core.index_name(index);
            *sandboxes.entry(name).or_default() += new;
        }
        for (index, denied) in core.maps.lost_denied_by_sandbox() {
            let seen = core.lost_denied_seen.insert(index, denied).unwrap_or(0);
            let new = if denied >= seen {
                denied - seen
            } else {
                denied
            };
            if new == 0 {
                continue;
            }
            if let Some(alert) = lost_as_denials(&mut core, index, new) {
                alerts.push(alert);
            }
        }
        core.audit.emit(Record::EventsLost(EventsLost {
            time: now(),
            count,
            total: total + core.lost_unread,
            sandboxes: crate::audit::lost_by_sandbox(sandboxes),
        }));
        for alert in alerts {
            core.alerts.raise(alert);
        }
        core.state.lost_reported = total;
        core.save_state();
    } else if total < core.state.lost_reported {
        // Maps were recreated under a running daemon's state: start counting afresh.
        core.state.lost_reported = total;
        core.state.lost_reported_by_index.clear();
    }
}

/// A sandbox's denials the kernel could not record count toward its denial burst: a
/// sandbox that floods the ring buffer (with allowed sends, say) must not hide its
/// denials from the burst, and its response, so. (Lost allowed calls do not count: a
/// sandbox must not be quarantined for another's flood.) Returns the `denial-burst` alert
/// they complete, if any.
fn lost_as_denials(core: &mut Core, index: u32, lost: u64) -> Option<Alert> {
    let name = core.state.by_index(index)?.name.clone();
    let needed = u64::from(core.alerts.burst_config(&name).count);
    let at = monotonic_ns();
    let mut alert = None;
    for _ in 0..lost.min(needed) {
        if let Some(a) = core.denial_burst(index, at) {
            alert = Some(a);
        }
    }
    let mut alert = alert?;
    alert.reason = format!(
        "{}; {lost} of the sandbox's denials could not be recorded one by one (the \
         kernel's ring buffer was full) and are counted",
        alert.reason
    );
    Some(alert)
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of the kernel's event timestamps.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the pointer, which outlives the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}
