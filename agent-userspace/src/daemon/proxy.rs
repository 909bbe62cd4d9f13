//! The daemon's side of the proxy: listeners in each sandbox's network namespace, the
//! original destination of every accepted connection (from the kernel's `BY_PEER` map),
//! and the policy rule that redirected it.
use std::{
    collections::HashMap,
    net::{Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
};

use ipnet::IpNet;
use tokio::sync::Semaphore;

use super::netns::{bind_in_netns, netns_cookie, NetnsId, OpenNetns};
use crate::{
    audit::ConnectionId,
    bpf::PeerMap,
    credentials::CredentialStore,
    policy::Policy,
    proxy::{ConnInfo, Proxy, Route, Unrecorded, Workers},
};

/// Sandbox index -> (name, policy in force, its kernel slot). Written by the daemon core on
/// attach, policy change and detach; read for every accepted connection.
pub type Routes = Arc<RwLock<HashMap<u32, (String, Arc<Policy>, u32)>>>;
/// Attached sandboxes' names by index, routed or not (a quarantined one has no route):
/// what a connection closed unserved is recorded under.
pub type Names = Arc<RwLock<HashMap<u32, String>>>;

pub struct ProxyRuntime {
    pub port: u16,
    pub ca_pem: String,
    credentials: Arc<CredentialStore>,
    proxy: Arc<Proxy>,
    peers: Arc<Mutex<PeerMap>>,
    pub routes: Routes,
    pub names: Names,
    listeners: HashMap<NetnsId, Vec<tokio::task::AbortHandle>>,
    /// Accept tasks of listeners closed, which their workers drop (closing the port) a
    /// moment later.
    closing: HashMap<NetnsId, Vec<tokio::task::AbortHandle>>,
    /// Which namespace's listener each sandbox (by index) uses; a listener no sandbox
    /// uses is closed, so it does not keep a deleted container's namespace alive.
    users: HashMap<u32, NetnsId>,
    conns: Conns,
    limits: Limits,
    /// Where each listener accepts and serves its connections.
    workers: Workers,
}

impl ProxyRuntime {
    pub fn new(
        port: u16,
        ca_pem: String,
        credentials: Arc<CredentialStore>,
        proxy: Proxy,
        peers: PeerMap,
        workers: Workers,
    ) -> Self {
        Self {
            port,
            ca_pem,
            credentials,
            proxy: Arc::new(proxy),
            peers: Arc::new(Mutex::new(peers)),
            routes: Arc::default(),
            names: Arc::default(),
            listeners: HashMap::new(),
            closing: HashMap::new(),
            users: HashMap::new(),
            conns: Conns::default(),
            limits: Limits::default(),
            workers,
        }
    }

    /// Closes a sandbox's open proxied connections (its policy changed or it was
    /// detached); clients reconnect under the policy in force.
    pub fn close_connections(&self, index: u32) {
        let handles = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&index)
            .unwrap_or_default();
        for (h, closing) in handles {
            closing.store(true, std::sync::atomic::Ordering::SeqCst);
            h.abort();
        }
    }

    /// Drops a detached sandbox's limits: a sandbox given its index later starts with
    /// whole ones, not with what the old one's tasks still hold.
    pub fn forget_limits(&self, index: u32) {
        self.limits.forget(index);
    }

    /// Proxied connections open now, by sandbox name (for metrics).
    pub fn open_connections(&self) -> Vec<(String, u64)> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        routes
            .iter()
            .map(|(index, (name, _, _))| {
                let open = conns
                    .get(index)
                    .map_or(0, |hs| hs.iter().filter(|(h, _)| !h.is_finished()).count());
                (name.clone(), open as u64)
            })
            .collect()
    }

    /// The configured credentials (for revocation on quarantine).
    pub fn credentials(&self) -> Arc<CredentialStore> {
        self.credentials.clone()
    }

    /// Stops accepting in every namespace (daemon shutdown).
    pub fn shutdown(&mut self) {
        for handle in self.listeners.drain().flat_map(|(_, hs)| hs) {
            handle.abort();
        }
    }

    /// Closes every proxied connection (daemon shutdown, after [`Self::shutdown`]): each
    /// is recorded as closed by the daemon as its task ends, which the returned handles
    /// tell. None is served past the daemon's stop, nor holds the audit writer open.
    pub fn close_all_connections(&self) -> Vec<tokio::task::AbortHandle> {
        // No route first: an accept loop still running (its abort is seen at its next
        // await) finds none when it checks again under the connection lock, and closes
        // what it accepted unserved.
        self.routes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let all = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|p| p.into_inner()));
        all.into_values()
            .flatten()
            .map(|(h, closing)| {
                closing.store(true, std::sync::atomic::Ordering::SeqCst);
                h.abort();
                h
            })
            .collect()
    }

    pub fn has_credential(&self, name: &str) -> bool {
        self.credentials.contains(name)
    }

    pub fn credential_names(&self) -> Vec<String> {
        self.credentials
            .names()
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    /// Records that sandbox `index` uses the listener of namespace `id` (or none), then
    /// closes every listener no sandbox uses any more.
    pub fn set_user(&mut self, index: u32, id: Option<NetnsId>) {
        match id {
            Some(id) => self.users.insert(index, id),
            None => self.users.remove(&index),
        };
        self.close_unused();
    }

    /// Closes the listeners of namespaces no sandbox uses.
    pub fn close_unused(&mut self) {
        let users = &self.users;
        let closing = &mut self.closing;
        closing.retain(|_, handles| handles.iter().any(|h| !h.is_finished()));
        self.listeners.retain(|id, handles| {
            let used = users.values().any(|u| u == id);
            if !used {
                for h in handles.iter() {
                    h.abort();
                }
                closing.entry(*id).or_default().append(handles);
                tracing::info!(
                    netns_inode = id.1,
                    "Proxy listener closed: no sandbox uses its network namespace"
                );
            }
            used
        });
    }

    /// Network namespaces with a proxy listener (for tests and status).
    pub fn listening_in(&self) -> Vec<NetnsId> {
        self.listeners.keys().copied().collect()
    }

    /// Makes sure a listener runs on the loopback of the network namespace `netns`;
    /// returns the namespace's identity.
    pub fn ensure_listener(&mut self, netns: &OpenNetns) -> std::io::Result<NetnsId> {
        let id = netns.id();
        if self
            .listeners
            .get(&id)
            .is_some_and(|hs| hs.iter().all(|h| !h.is_finished()))
        {
            return Ok(id);
        }
        // A listener closed in this namespace a moment ago holds the port until its
        // worker drops its accept task: waited for (only here, where the port is needed
        // again, not on every close).
        if let Some(closed) = self.closing.remove(&id) {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while closed.iter().any(|h| !h.is_finished()) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        let addrs = vec![
            SocketAddr::from(([127, 0, 0, 1], self.port)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, self.port)),
        ];
        let bound = bind_in_netns(netns, addrs)?;
        // Every worker accepts on each listener and serves what it accepted: a
        // connection never changes threads. All are made before any starts, so a failure
        // leaves nothing running.
        let mut made = Vec::new();
        for l in &bound {
            for worker in self.workers.handles() {
                let _guard = worker.enter();
                made.push((worker, tokio::net::TcpListener::from_std(l.try_clone()?)?));
            }
        }
        drop(bound);
        let mut tasks = Vec::new();
        for (worker, listener) in made {
            let ctx = AcceptCtx {
                proxy: self.proxy.clone(),
                peers: self.peers.clone(),
                routes: self.routes.clone(),
                names: self.names.clone(),
                conns: self.conns.clone(),
                limits: self.limits.clone(),
            };
            tasks.push(worker.spawn(accept_loop(listener, ctx)));
        }
        self.listeners
            .insert(id, tasks.iter().map(|t| t.abort_handle()).collect());
        tracing::info!(netns = %netns.path().display(), port = self.port, "Proxy listening in sandbox network namespace");
        Ok(id)
    }
}

#[derive(Clone)]
struct AcceptCtx {
    proxy: Arc<Proxy>,
    peers: Arc<Mutex<PeerMap>>,
    routes: Routes,
    names: Names,
    conns: Conns,
    limits: Limits,
}

/// One sandbox's share of the proxy: its open connections and its handshakes in progress
/// are capped, so one sandbox cannot use up the daemon's descriptors or handshake work
/// that other sandboxes need.
struct SandboxLimits {
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    requests: Arc<Semaphore>,
    held_bodies: Arc<Semaphore>,
}

/// Each sandbox's share, by sandbox index, made at its first connection.
#[derive(Clone, Default)]
struct Limits(Arc<Mutex<HashMap<u32, Arc<SandboxLimits>>>>);

impl Limits {
    /// Sandbox `index`'s share, made whole from `config` if it has none.
    fn for_index(&self, index: u32, config: &crate::proxy::ProxyConfig) -> Arc<SandboxLimits> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(index)
            .or_insert_with(|| {
                Arc::new(SandboxLimits {
                    connections: Arc::new(Semaphore::new(config.max_connections_per_sandbox)),
                    handshakes: Arc::new(Semaphore::new(config.max_handshakes_per_sandbox)),
                    requests: Arc::new(Semaphore::new(config.max_requests_per_sandbox)),
                    held_bodies: crate::proxy::held_bodies_share(),
                })
            })
            .clone()
    }

    /// Drops sandbox `index`'s share: what its tasks still hold is theirs until they end,
    /// and the next sandbox given the index starts whole.
    fn forget(&self, index: u32) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&index);
    }
}

impl AcceptCtx {
    fn limits_for(&self, index: u32) -> Arc<SandboxLimits> {
        self.limits.for_index(index, self.proxy.config())
    }
}

/// Open proxied connections by sandbox index, so a detach or a policy replacement can
/// close them: a keep-alive connection must not outlive the policy it was accepted under.
/// Each sandbox's connection tasks, with the flag that says the daemon closed them.
type Conns =
    Arc<Mutex<HashMap<u32, Vec<(tokio::task::AbortHandle, Arc<std::sync::atomic::AtomicBool>)>>>>;

async fn accept_loop(listener: tokio::net::TcpListener, ctx: AcceptCtx) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "Proxy accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // What the closes below record: the sandbox is not known (or has no route), so
        // the record names what is, and says why the connection was not served.
        let unserved = |sandbox: &str, rule: &str, id: String, dst, reason: String| {
            tracing::warn!(%peer, sandbox, %reason, "Connection to the proxy closed unserved");
            ctx.proxy.record_unserved(sandbox, rule, id, dst, reason);
        };
        let at_port = stream.local_addr().unwrap_or(peer);
        let Ok(cookie) = netns_cookie(&stream) else {
            unserved(
                "unknown",
                "proxy-port",
                String::new(),
                at_port,
                format!("connection from {peer}: its network namespace could not be read; closed"),
            );
            continue;
        };
        let orig = ctx
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(cookie, peer);
        // Only connections the kernel redirected are served: anything else that reaches
        // the port is closed (the proxy never acts as an open relay).
        let Some(orig) = orig else {
            unserved(
                "unknown",
                "proxy-port",
                String::new(),
                at_port,
                format!(
                    "connection from {peer} to the proxy's port that the kernel did not \
                     redirect (not from a sandbox, or its redirect entry is gone); closed"
                ),
            );
            continue;
        };
        let ip = Ipv6Addr::from(orig.addr).to_canonical();
        let original_dst = SocketAddr::new(ip, orig.port);
        let connection_id = ConnectionId::new(cookie, orig.socket_cookie).to_string();
        let index = u32::from(orig.sandbox_index);
        let entry = ctx
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&index)
            .cloned();
        let Some((sandbox, policy, slot)) = entry else {
            let name = ctx
                .names
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&index)
                .cloned();
            unserved(
                name.as_deref().unwrap_or("unknown"),
                "unknown",
                connection_id,
                original_dst,
                format!(
                    "redirected connection from {peer} of sandbox index {}, which has no \
                     route in the proxy (detached, quarantined, or its policy could not be \
                     restored); closed",
                    orig.sandbox_index
                ),
            );
            continue;
        };
        // Redirected under a policy since replaced (the connection waited in the listen
        // backlog meanwhile): its rule id names a rule of that policy, not of this one.
        if u32::from(orig.policy_slot) != slot {
            unserved(
                &sandbox,
                "unknown",
                connection_id,
                original_dst,
                format!(
                    "redirected connection from {peer} under a policy since replaced (slot \
                     {}, now {slot}); closed, the client connects again under the policy in \
                     force",
                    orig.policy_slot
                ),
            );
            continue;
        }
        let Some(route) = route_for(&policy, orig.rule_id) else {
            unserved(
                &sandbox,
                "unknown",
                connection_id,
                original_dst,
                format!(
                    "redirected connection from {peer} under rule id {}, which is not a \
                     proxy or passthrough rule of the sandbox's policy; closed",
                    orig.rule_id
                ),
            );
            continue;
        };
        let limits = ctx.limits_for(index);
        let conn = ConnInfo {
            original_dst,
            peer,
            sandbox,
            connection_id,
            route: Arc::new(route),
            requests: limits.requests.clone(),
            held_bodies: limits.held_bodies.clone(),
            closing: Arc::default(),
        };
        let closing = conn.closing.clone();
        let Ok(conn_permit) = limits.connections.clone().try_acquire_owned() else {
            let max = ctx.proxy.config().max_connections_per_sandbox;
            tracing::debug!(sandbox = %conn.sandbox, max, "Proxied connection refused: sandbox at its connection limit");
            let proxy = ctx.proxy.clone();
            tokio::spawn(async move {
                let reason = format!(
                    "sandbox already has {max} proxied connections open \
                     (proxy.max_connections_per_sandbox)"
                );
                proxy.refuse_connection(stream, conn, reason).await;
            });
            continue;
        };
        let proxy = ctx.proxy.clone();
        let handshakes = limits.handshakes.clone();
        // Armed from here: the daemon may close the connection while it waits its turn.
        let unrecorded = Unrecorded::new(&proxy, &conn);
        let task = tokio::spawn(async move {
            let _conn_permit = conn_permit;
            let wait = std::time::Duration::from_secs(proxy.config().handshake_secs);
            match tokio::time::timeout(wait, handshakes.acquire_owned()).await {
                Ok(Ok(permit)) => {
                    proxy
                        .serve_limited(stream, conn, Some(permit), unrecorded)
                        .await
                }
                _ => {
                    unrecorded.disarm();
                    let reason = format!(
                        "waited {} s for one of the sandbox's {} TLS handshake slots \
                         (proxy.max_handshakes_per_sandbox)",
                        wait.as_secs(),
                        proxy.config().max_handshakes_per_sandbox
                    );
                    proxy.refuse_connection(stream, conn, reason).await;
                }
            }
        });
        // The route may have gone (quarantine, detach) or changed (a new policy) after it
        // was read above; the core changes it before it closes the sandbox's connections,
        // so checking again under the connection lock leaves no gap for a connection
        // served under a policy no longer in force to stay open.
        {
            let mut conns = ctx.conns.lock().unwrap_or_else(|p| p.into_inner());
            let still_routed = ctx
                .routes
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&index)
                .is_some_and(|(_, now, _)| Arc::ptr_eq(now, &policy));
            if still_routed {
                let list = conns.entry(index).or_default();
                list.retain(|(h, _)| !h.is_finished());
                list.push((task.abort_handle(), closing));
            } else {
                // Recorded by its guard as closed unserved.
                task.abort();
            }
        }
        // One connection per turn: every worker was woken by the same readiness, and the
        // others take the next ones meanwhile, so a burst of connections is spread over
        // the workers instead of all landing on the first one awake.
        tokio::task::yield_now().await;
    }
}

pub(crate) fn route_for(policy: &Arc<Policy>, rule_id: u16) -> Option<Route> {
    let rule = policy.proxy_rule(rule_id)?;
    // A special address is named by the rule's static networks or by its `answers`.
    let mut nets: Vec<IpNet> = rule.nets().to_vec();
    let hosts: Vec<std::net::IpAddr> = rule
        .nets()
        .iter()
        .filter(|n| n.prefix_len() == n.max_prefix_len())
        .map(|n| crate::net::judged_as(n.addr()))
        .collect();
    nets.extend(rule.answers().unwrap_or_default());
    let (p1, p2) = (policy.clone(), policy.clone());
    Some(Route {
        rule_name: rule.name().to_string(),
        passthrough: rule.is_passthrough(),
        credential: rule.credential().map(str::to_string),
        host_allowed: Box::new(move |h| {
            p1.proxy_rule(rule_id).is_some_and(|r| r.allows_host(h))
                && p1.name_denied_by(h).is_none()
        }),
        request_allowed: Box::new(move |m, p| {
            p2.proxy_rule(rule_id)
                .map_or(Err("rule is gone".into()), |r| r.check_request(m, p))
        }),
        explicitly_covers: Box::new(move |ip| crate::net::explicitly_covers(&nets, ip)),
        names_exactly: Box::new(move |ip| hosts.contains(&crate::net::judged_as(ip))),
        git: rule.git().cloned(),
    })
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod limits_tests {
    use super::Limits;

    /// A detached sandbox's connections still open hold their permits, but a sandbox
    /// given its index later starts with every permit, and other sandboxes keep theirs.
    #[test]
    fn a_forgotten_share_is_made_whole_for_the_next_sandbox() {
        let config = crate::proxy::ProxyConfig {
            max_connections_per_sandbox: 2,
            ..crate::proxy::ProxyConfig::default()
        };
        let limits = Limits::default();
        let old = limits.for_index(7, &config);
        let held = old.connections.clone().try_acquire_many_owned(2).unwrap();
        let other = limits.for_index(8, &config);
        let other_held = other.connections.clone().try_acquire_owned().unwrap();
        // The same share while the sandbox is attached.
        assert_eq!(
            limits.for_index(7, &config).connections.available_permits(),
            0
        );
        limits.forget(7);
        let new = limits.for_index(7, &config);
        assert_eq!(new.connections.available_permits(), 2);
        assert_eq!(old.connections.available_permits(), 0);
        assert_eq!(
            limits.for_index(8, &config).connections.available_permits(),
            1
        );
        drop((held, other_held));
        assert_eq!(new.connections.available_permits(), 2);
    }
}
