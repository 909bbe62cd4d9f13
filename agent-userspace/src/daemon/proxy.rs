//! The daemon's side of the proxy: listeners in each sandbox's network namespace, the
//! original destination of every accepted connection (from the kernel's `BY_PEER` map),
//! and the policy rule that redirected it.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex, RwLock},
};

use ipnet::IpNet;

use super::netns::{bind_in_netns, netns_cookie, netns_id, NetnsId};
use crate::{
    audit::ConnectionId,
    bpf::PeerMap,
    credentials::CredentialStore,
    policy::Policy,
    proxy::{ConnInfo, Proxy, Route},
};

/// Sandbox index -> (name, policy in force). Written by the daemon core on attach, policy
/// change and detach; read for every accepted connection.
pub type Routes = Arc<RwLock<HashMap<u32, (String, Arc<Policy>)>>>;

pub struct ProxyRuntime {
    pub port: u16,
    pub ca_pem: String,
    credentials: Arc<CredentialStore>,
    proxy: Arc<Proxy>,
    peers: Arc<Mutex<PeerMap>>,
    pub routes: Routes,
    listeners: HashMap<NetnsId, Vec<tokio::task::AbortHandle>>,
    conns: Conns,
    runtime: tokio::runtime::Handle,
}

impl ProxyRuntime {
    pub fn new(
        port: u16,
        ca_pem: String,
        credentials: Arc<CredentialStore>,
        proxy: Proxy,
        peers: PeerMap,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            port,
            ca_pem,
            credentials,
            proxy: Arc::new(proxy),
            peers: Arc::new(Mutex::new(peers)),
            routes: Arc::default(),
            listeners: HashMap::new(),
            conns: Conns::default(),
            runtime,
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
        for h in handles {
            h.abort();
        }
    }

    /// Proxied connections open now, by sandbox name (for metrics).
    pub fn open_connections(&self) -> Vec<(String, u64)> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        routes
            .iter()
            .map(|(index, (name, _))| {
                let open = conns
                    .get(index)
                    .map_or(0, |hs| hs.iter().filter(|h| !h.is_finished()).count());
                (name.clone(), open as u64)
            })
            .collect()
    }

    /// Stops accepting in every namespace (daemon shutdown).
    pub fn shutdown(&mut self) {
        for handle in self.listeners.drain().flat_map(|(_, hs)| hs) {
            handle.abort();
        }
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

    /// Makes sure a listener runs on the loopback of the network namespace at `netns`.
    pub fn ensure_listener(&mut self, netns: &Path) -> std::io::Result<()> {
        let id = netns_id(netns)?;
        if self
            .listeners
            .get(&id)
            .is_some_and(|hs| hs.iter().all(|h| !h.is_finished()))
        {
            return Ok(());
        }
        let addrs = vec![
            SocketAddr::from(([127, 0, 0, 1], self.port)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, self.port)),
        ];
        let bound = bind_in_netns(netns, addrs)?;
        let _guard = self.runtime.enter();
        let mut tasks = Vec::new();
        for l in bound {
            let listener = tokio::net::TcpListener::from_std(l)?;
            let ctx = AcceptCtx {
                proxy: self.proxy.clone(),
                peers: self.peers.clone(),
                routes: self.routes.clone(),
                conns: self.conns.clone(),
            };
            tasks.push(tokio::spawn(accept_loop(listener, ctx)));
        }
        self.listeners
            .insert(id, tasks.iter().map(|t| t.abort_handle()).collect());
        tracing::info!(netns = %netns.display(), port = self.port, "Proxy listening in sandbox network namespace");
        Ok(())
    }
}

#[derive(Clone)]
struct AcceptCtx {
    proxy: Arc<Proxy>,
    peers: Arc<Mutex<PeerMap>>,
    routes: Routes,
    conns: Conns,
}

/// Open proxied connections by sandbox index, so a detach or a policy replacement can
/// close them: a keep-alive connection must not outlive the policy it was accepted under.
type Conns = Arc<Mutex<HashMap<u32, Vec<tokio::task::AbortHandle>>>>;

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
        let Ok(cookie) = netns_cookie(&stream) else {
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
            tracing::warn!(%peer, "Connection to the proxy port that the kernel did not redirect; closing");
            continue;
        };
        let entry = ctx
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&orig.sandbox_index)
            .cloned();
        let Some((sandbox, policy)) = entry else {
            tracing::warn!(
                index = orig.sandbox_index,
                "Redirected connection of an unknown sandbox; closing"
            );
            continue;
        };
        let Some(route) = route_for(&policy, orig.rule_id) else {
            tracing::warn!(%sandbox, rule_id = orig.rule_id, "Redirected connection without a proxy rule; closing");
            continue;
        };
        let ip = Ipv6Addr::from(orig.addr).to_canonical();
        let conn = ConnInfo {
            original_dst: SocketAddr::new(ip, orig.port),
            peer,
            sandbox,
            connection_id: ConnectionId::new(cookie, orig.socket_cookie).to_string(),
            route: Arc::new(route),
        };
        let task = tokio::spawn(ctx.proxy.clone().serve(stream, conn));
        let mut conns = ctx.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.entry(orig.sandbox_index).or_default();
        list.retain(|h| !h.is_finished());
        list.push(task.abort_handle());
    }
}

/// Whether the rule's `to` names `ip` explicitly: a listed network that contains it and
/// lies inside the special block the address belongs to (so `10.1.2.3/32` or `10.0.0.0/8`
/// covers 10.1.2.3, but `0.0.0.0/0` does not).
pub(super) fn explicitly_covers(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    match crate::proxy::special_block(ip) {
        None => nets.iter().any(|n| n.contains(&ip)),
        Some((_, block)) => nets
            .iter()
            .any(|n| n.contains(&ip) && n.prefix_len() >= block.prefix_len()),
    }
}

fn route_for(policy: &Arc<Policy>, rule_id: u16) -> Option<Route> {
    let rule = policy.proxy_rule(rule_id)?;
    let nets: Vec<IpNet> = rule.nets().to_vec();
    let (p1, p2) = (policy.clone(), policy.clone());
    Some(Route {
        rule_name: rule.name().to_string(),
        passthrough: rule.is_passthrough(),
        credential: rule.credential().map(str::to_string),
        host_allowed: Box::new(move |h| p1.proxy_rule(rule_id).is_some_and(|r| r.allows_host(h))),
        request_allowed: Box::new(move |m, p| {
            p2.proxy_rule(rule_id)
                .map_or(Err("rule is gone".into()), |r| r.check_request(m, p))
        }),
        explicitly_covers: Box::new(move |ip| explicitly_covers(&nets, ip)),
        git: rule.git().cloned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_addresses_need_an_explicit_rule() {
        let n = |s: &str| s.parse::<IpNet>().unwrap_or_else(|_| unreachable!());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap_or_else(|_| unreachable!());
        assert!(explicitly_covers(&[n("192.0.2.10/32")], ip("192.0.2.10")));
        assert!(!explicitly_covers(&[n("0.0.0.0/0")], ip("10.1.2.3")));
        assert!(explicitly_covers(&[n("10.0.0.0/8")], ip("10.1.2.3")));
        assert!(!explicitly_covers(&[n("0.0.0.0/0")], ip("169.254.169.254")));
        assert!(explicitly_covers(
            &[n("169.254.169.254/32")],
            ip("169.254.169.254")
        ));
        assert!(!explicitly_covers(&[n("::/0")], ip("::1")));
        assert!(!explicitly_covers(&[n("::/0")], ip("fd00:ec2::254")));
        assert!(explicitly_covers(&[n("fd00::/8")], ip("fd00:ec2::254")));
        assert!(!explicitly_covers(&[n("::/0")], ip("::ffff:127.0.0.1")));
        // One list of special blocks for the proxy's dial check and this one.
        assert!(!explicitly_covers(&[n("0.0.0.0/0")], ip("100.100.100.200")));
        assert!(explicitly_covers(
            &[n("100.64.0.0/10")],
            ip("100.100.100.200")
        ));
        assert!(!explicitly_covers(&[n("::/0")], ip("64:ff9b::a9fe:a9fe")));
    }
}
