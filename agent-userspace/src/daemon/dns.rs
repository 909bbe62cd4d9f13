//! The daemon's side of DNS: one resolver per sandbox that uses host names (listening on
//! its own port on the loopback of the sandbox's network namespace; the kernel sends all
//! of the sandbox's DNS there), and the table of addresses learned from the answers, which
//! live in the sandbox's kernel rules until their TTL (plus grace) runs out.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, OnceLock, RwLock,
    },
    time::{Duration, Instant},
};

use ipnet::IpNet;

use super::netns::{bind_in_netns, bind_udp_in_netns, OpenNetns};
use crate::{
    alerts::Alerts,
    audit::{AuditHandle, Record},
    dns::{self, Learned, ResolverCtx},
    net::Dialer,
    policy::Policy,
};

/// Counts refused queries toward the sandbox's `denial-burst` (sandbox index, how many).
pub type DenialSink = Arc<dyn Fn(u32, u64) + Send + Sync>;

/// How long a resolver gathers refusals before it hands them to the denial-burst count
/// (one lock of the daemon's core per batch, not per refused query).
const DENIALS_GATHERED: Duration = Duration::from_millis(20);

/// Installs addresses a sandbox's resolver learned: (sandbox index, addresses).
pub type LearnSink =
    Arc<dyn Fn(u32, &[Learned]) -> Result<Vec<dns::Refusal>, String> + Send + Sync>;

/// One address in a sandbox's kernel rules because an allowed name resolved to it.
#[derive(Debug, Clone)]
pub struct LearnedAddr {
    /// The name whose answer held it last.
    pub name: String,
    /// The rules of every name that resolved to it (they all apply), each with the name
    /// that brought it and until when: a rule goes when the answers of the names that
    /// carry it run out, however long another name's answers keep the address.
    pub rules: std::collections::BTreeMap<u16, (String, Instant)>,
    pub slot: u32,
    /// Until when any answer holds the address (an answer may carry no name rule: a
    /// special address only a static rule names): then it goes whole.
    pub expires: Instant,
}

impl LearnedAddr {
    /// The rules still in force at `now`.
    pub fn rule_ids_at(&self, now: Instant) -> Vec<u16> {
        self.rules
            .iter()
            .filter(|(_, (_, until))| *until > now)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The name that brought rule `rule` (the last name asked for another rule).
    pub fn name_for(&self, rule: u16) -> &str {
        self.rules.get(&rule).map_or(&self.name, |(n, _)| n)
    }
}

impl Server {
    /// Stops its tasks, and raises the budget window it has open (its timer holds the
    /// alert sink weakly, so it would not).
    fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        dns::raise_budget_alert(&self.budget, &self.alert, self.sandbox);
    }
}

struct Server {
    tasks: Vec<tokio::task::AbortHandle>,
    /// The sandbox its records name and the network namespace it listens in: a resolver
    /// is handed a new policy only if both are still the sandbox's.
    sandbox: String,
    netns: super::netns::NetnsId,
    /// Held by every task of the resolver: gone once they all are.
    ctx: std::sync::Weak<dns::ResolverCtx>,
    /// What the resolver counted and raises at the end of a window, raised at once when
    /// it stops (held here, so that it is not left to whichever task ends last).
    limits: Arc<dns::ResolverLimits>,
    budget: Arc<std::sync::Mutex<dns::budget::Budget>>,
    alert: dns::AlertSink,
    policy: Arc<RwLock<Arc<Policy>>>,
    quarantined: Arc<AtomicBool>,
}

pub struct DnsRuntime {
    /// A sandbox's resolver listens on `base_port + sandbox index`.
    pub base_port: u16,
    default_upstream: Vec<SocketAddr>,
    dialer: Arc<Dialer>,
    audit: AuditHandle,
    /// Where budget alerts are raised (so a `dns-budget: quarantine` response applies).
    alerts: Alerts,
    runtime: tokio::runtime::Handle,
    servers: HashMap<u32, Server>,
    /// Set once the daemon's core is shared; resolvers call it before answering.
    pub sink: Arc<OnceLock<LearnSink>>,
    /// Set with `sink`; told of each refused query.
    pub denials: Arc<OnceLock<DenialSink>>,
    /// (sandbox index, address) -> where it came from and when it goes.
    pub learned: HashMap<(u32, IpAddr), LearnedAddr>,
    /// Sandboxes whose resolvers answer `REFUSED` to everything.
    quarantined: HashSet<u32>,
}

/// Whether a policy needs a resolver: it names hosts, or configures DNS.
pub fn uses_dns(policy: &Policy) -> bool {
    policy.dns().is_some() || policy.rules().iter().any(|r| !r.names().is_empty())
}

impl DnsRuntime {
    pub fn new(
        base_port: u16,
        default_upstream: Vec<SocketAddr>,
        dialer: Arc<Dialer>,
        audit: AuditHandle,
        alerts: Alerts,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            base_port,
            default_upstream,
            dialer,
            audit,
            alerts,
            runtime,
            servers: HashMap::new(),
            sink: Arc::new(OnceLock::new()),
            denials: Arc::new(OnceLock::new()),
            learned: HashMap::new(),
            quarantined: HashSet::new(),
        }
    }

    /// Makes a sandbox's resolver refuse every query (quarantine) or answer again
    /// (release). Holds for a resolver started later too.
    pub fn set_quarantined(&mut self, index: u32, on: bool) {
        if on {
            self.quarantined.insert(index);
        } else {
            self.quarantined.remove(&index);
        }
        if let Some(server) = self.servers.get(&index) {
            server.quarantined.store(on, Ordering::Release);
        }
    }

    pub fn port_for(&self, index: u32) -> u16 {
        self.base_port.saturating_add(index as u16)
    }

    /// Starts the sandbox's resolver, or hands a running one the new policy.
    pub fn ensure(
        &mut self,
        index: u32,
        sandbox: &str,
        policy: &Arc<Policy>,
        netns: &OpenNetns,
    ) -> Result<(), String> {
        if let Some(server) = self.servers.get(&index) {
            let same = server.sandbox == sandbox && server.netns == netns.id();
            if same && server.tasks.iter().all(|t| !t.is_finished()) {
                *server.policy.write().unwrap_or_else(|p| p.into_inner()) = policy.clone();
                return Ok(());
            }
        }
        // A listener that ended takes the others down with it (and their connections):
        // none may go on under the old context beside the new one. So does a resolver
        // of another sandbox given the index, or in another namespace (a re-attach with
        // another `--netns`).
        if let Some(server) = self.servers.remove(&index) {
            server.stop();
        }
        let port = self.port_for(index);
        let addrs = vec![
            SocketAddr::from(([127, 0, 0, 1], port)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
        ];
        let udp = bind_udp_in_netns(netns, addrs.clone()).map_err(|e| {
            format!(
                "binding the DNS resolver (udp {port}) in {}: {e}",
                netns.path().display()
            )
        })?;
        let tcp = bind_in_netns(netns, addrs).map_err(|e| {
            format!(
                "binding the DNS resolver (tcp {port}) in {}: {e}",
                netns.path().display()
            )
        })?;
        let shared_policy = Arc::new(RwLock::new(policy.clone()));
        let quarantined = Arc::new(AtomicBool::new(self.quarantined.contains(&index)));
        let sink = self.sink.clone();
        let audit = self.audit.clone();
        let denials = self.denials.clone();
        let alerts = self.alerts.clone();
        let ctx = Arc::new(ResolverCtx {
            sandbox: sandbox.to_string(),
            policy: shared_policy.clone(),
            default_upstream: self.default_upstream.clone(),
            dialer: self.dialer.clone(),
            learn: Arc::new(move |learned: &[Learned]| match sink.get() {
                Some(sink) => sink(index, learned),
                None => Err("the daemon is still starting".into()),
            }),
            audit: Arc::new(move |r| audit.emit(Record::Dns(r))),
            // A refused query counts toward a denial burst as a kernel denial does, its
            // record written or counted past the refusal limit; gathered for a moment,
            // so that a flood of refusals does not take the daemon's lock for each.
            denied: {
                let pending = Arc::new(std::sync::atomic::AtomicU64::new(0));
                Arc::new(move || {
                    use std::sync::atomic::Ordering;
                    if pending.fetch_add(1, Ordering::AcqRel) != 0 {
                        return;
                    }
                    let (pending, denials) = (pending.clone(), denials.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(DENIALS_GATHERED).await;
                        let n = pending.swap(0, Ordering::AcqRel);
                        if let Some(count) = denials.get() {
                            count(index, n);
                        }
                    });
                })
            },
            alert: Arc::new(move |a| {
                alerts.raise(a);
            }),
            budget: Arc::default(),
            timeout: Duration::from_secs(3),
            max_label: dns::DEFAULT_MAX_LABEL,
            quarantined: quarantined.clone(),
        });
        let _guard = self.runtime.enter();
        let mut tasks = Vec::new();
        // One set of bounds for the resolver, whatever number of listeners (IPv4, IPv6).
        let limits = dns::ResolverLimits::new(&ctx);
        for s in udp {
            let s = tokio::net::UdpSocket::from_std(s).map_err(|e| e.to_string())?;
            tasks.push(tokio::spawn(dns::serve_udp(s, ctx.clone(), limits.clone())).abort_handle());
        }
        for l in tcp {
            let l = tokio::net::TcpListener::from_std(l).map_err(|e| e.to_string())?;
            tasks.push(tokio::spawn(dns::serve_tcp(l, ctx.clone(), limits.clone())).abort_handle());
        }
        tracing::info!(%sandbox, port, netns = %netns.path().display(), "DNS resolver listening");
        self.servers.insert(
            index,
            Server {
                tasks,
                sandbox: sandbox.to_string(),
                netns: netns.id(),
                ctx: Arc::downgrade(&ctx),
                limits,
                budget: ctx.budget.clone(),
                alert: ctx.alert.clone(),
                policy: shared_policy,
                quarantined,
            },
        );
        Ok(())
    }

    /// Stops a sandbox's resolver and forgets what it learned (the caller removes the
    /// kernel entries with the policy slot).
    pub fn stop(&mut self, index: u32) {
        if let Some(server) = self.servers.remove(&index) {
            server.stop();
        }
        self.learned.retain(|(i, _), _| *i != index);
    }

    /// Forgets everything about a detached sandbox, quarantine included.
    pub fn forget(&mut self, index: u32) {
        self.stop(index);
        self.quarantined.remove(&index);
    }

    /// Stops every resolver (daemon shutdown). Their last records (a query sent upstream
    /// and not answered, the refusals and budget windows counted) are written by
    /// [`DnsStopped::finish`], which the stop awaits before its own record.
    pub fn shutdown(&mut self) -> DnsStopped {
        let mut servers = Vec::new();
        for (_, server) in self.servers.drain() {
            for t in &server.tasks {
                t.abort();
            }
            servers.push(server);
        }
        DnsStopped { servers }
    }

    /// The name an address of a sandbox was learned from, for a decision by rule `rule`.
    pub fn name_of(&self, index: u32, ip: IpAddr, rule: u16) -> Option<&str> {
        self.learned
            .get(&(index, crate::net::judged_as(ip)))
            .map(|l| l.name_for(rule))
    }

    /// Learned entries whose time, or some rule's, is up.
    pub fn expired(&self, now: Instant) -> Vec<(u32, IpAddr, LearnedAddr)> {
        self.learned
            .iter()
            .filter(|(_, l)| l.expires <= now || l.rules.values().any(|(_, until)| *until <= now))
            .map(|((i, a), l)| (*i, *a, l.clone()))
            .collect()
    }
}

/// Why an answer's address must not become reachable through a name whose rules are
/// `rule_ids`: DNS rebinding to a special address ([`crate::net::special`]: loopback,
/// private, link-local, metadata, tunnels into IPv4, ...) unless a static rule or the
/// `answers` of one of the name's rules names it explicitly, or an address a static
/// `deny` rule covers. `None`: it may be learned.
pub fn learning_refusal(policy: &Policy, rule_ids: &[u16], addr: IpAddr) -> Option<String> {
    let addr = crate::net::judged_as(addr);
    // The `answers` pins of the policy in force (the query may have started under another).
    if let Some(why) = policy.answer_refusal(rule_ids, addr) {
        return Some(why);
    }
    let static_rules = || {
        policy
            .rules()
            .iter()
            .filter(move |r| r.nets().iter().any(|n| n.contains(&addr)))
    };
    if let Some(rule) = static_rules().find(|r| r.action() == crate::policy::Action::Deny) {
        return Some(format!("deny rule `{}` covers the address", rule.name()));
    }
    let special = crate::net::special_address(addr)?;
    let named = static_rules().any(|r| crate::net::explicitly_covers(r.nets(), addr))
        || !rules_carrying(policy, rule_ids.to_vec(), addr).is_empty();
    (!named).then(|| {
        format!(
            "{addr} is a {special}, and no rule names it explicitly (a static rule or `answers`)"
        )
    })
}

/// The rules of `rule_ids` (a name's) that a learned `addr` gets. A special address
/// ([`crate::net::special`]) gets only those whose own `answers` name it: one named only
/// by a static rule (`db: 10.1.2.3, ports [5432]`) is reachable as that rule says, not on
/// every port a wildcard name rule (`**.example.com`, any port) would add.
pub fn rules_carrying(policy: &Policy, rule_ids: Vec<u16>, addr: IpAddr) -> Vec<u16> {
    let addr = crate::net::judged_as(addr);
    if crate::net::special_address(addr).is_none() {
        return rule_ids;
    }
    rule_ids
        .into_iter()
        .filter(|&id| {
            policy
                .rule(id)
                .and_then(|r| r.answers())
                .is_some_and(|pins| crate::net::explicitly_covers(pins, addr))
        })
        .collect()
}

/// The single-address network of a learned address.
pub fn host_net(addr: IpAddr) -> IpNet {
    IpNet::from(crate::net::judged_as(addr))
}

/// Resolvers stopped at the daemon's stop, whose tasks may still be ending.
pub struct DnsStopped {
    servers: Vec<Server>,
}

impl DnsStopped {
    /// Waits up to `within` for every task of the stopped resolvers to end (a query's
    /// task writes its record as it ends), then raises what they counted and had not
    /// raised. Returns whether every task had ended.
    pub async fn finish(self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        let ended = |servers: &[Server]| servers.iter().all(|s| s.ctx.strong_count() == 0);
        while !ended(&self.servers) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let all = ended(&self.servers);
        for server in self.servers {
            server.limits.flush();
            dns::raise_budget_alert(&server.budget, &server.alert, server.sandbox.clone());
        }
        all
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::policy::parse_str;

    #[test]
    fn a_special_address_named_by_a_static_rule_gets_only_the_rules_that_pin_it() {
        let policy = parse_str(
            "version: 1
rules:
  - {name: db, to: [10.1.2.3], ports: [5432], action: allow}
  - {name: web, to: [\"**.example.com\"], action: allow}
  - {name: pinned, to: [wiki.example.com], answers: [10.1.2.0/24], action: allow}
",
            "s.yaml",
        )
        .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // Learnable (the static rule names it), but not with `web`'s any port.
        assert_eq!(learning_refusal(&policy, &[2], ip("10.1.2.3")), None);
        assert_eq!(
            rules_carrying(&policy, vec![2], ip("10.1.2.3")),
            Vec::<u16>::new()
        );
        assert_eq!(rules_carrying(&policy, vec![2, 3], ip("10.1.2.3")), [3]);
        // An ordinary address keeps every rule of its name.
        assert_eq!(rules_carrying(&policy, vec![2, 3], ip("192.0.2.7")), [2, 3]);
        // The learned entry then allows 5432 only.
        let entries = policy.learned_entries(ip("10.1.2.3"), &[]).unwrap();
        assert_eq!(entries.count, 1);
    }

    #[test]
    fn rebinding_to_special_addresses_needs_a_rule_naming_them() {
        let policy = parse_str(
            "version: 1
rules:
  - {name: open, to: [\"**.example.com\"], action: allow}
  - {name: internal, to: [wiki.corp.example], answers: [10.0.0.0/8], action: allow}
  - {name: lab, to: [192.168.7.0/24], action: allow}
  - {name: world, to: [0.0.0.0/0, \"::/0\"], action: allow}
  - {name: no-doc, to: [198.51.100.0/24], action: deny}
",
            "l.yaml",
        )
        .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let open = policy.rules_for_name("a.example.com");
        let internal = policy.rules_for_name("wiki.corp.example");
        let refused = |ids: &[u16], a: &str| learning_refusal(&policy, ids, ip(a));
        // Ordinary and documentation addresses are learned.
        assert_eq!(refused(&open, "93.184.216.34"), None);
        assert_eq!(refused(&open, "192.0.2.10"), None);
        // Special ones are not, even with `0.0.0.0/0` in a static rule.
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "169.254.169.254",
            "100.100.100.200",
            "::1",
            "fd00:ec2::254",
            "64:ff9b::7f00:1",
            "2002:7f00:1::1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
            "240.0.0.1",
        ] {
            let why = refused(&open, a).unwrap_or_default();
            assert!(why.contains("no rule names it explicitly"), "{a}: {why}");
        }
        // A NAT64 address is judged as the IPv4 address it reaches.
        let why = refused(&open, "64:ff9b::7f00:1").unwrap();
        assert!(why.starts_with("127.0.0.1 is a loopback"), "{why}");
        // Named by the name's own `answers`, or by a static rule inside the block.
        assert_eq!(refused(&internal, "10.1.2.3"), None);
        assert!(refused(&internal, "127.0.0.1").is_some());
        // Outside the name's `answers` (checked again here, against the policy in force
        // when the answer is installed): refused, even an ordinary address.
        assert!(refused(&internal, "93.184.216.34")
            .is_some_and(|why| why.contains("outside the `answers` of rule `internal`")));
        assert_eq!(refused(&open, "192.168.7.9"), None);
        // A deny rule covering the address wins.
        assert_eq!(
            refused(&open, "198.51.100.7").as_deref(),
            Some("deny rule `no-doc` covers the address")
        );
        // In any IPv6 spelling that reaches it (a DNS64 answer).
        for a in ["64:ff9b::c633:6407", "::ffff:198.51.100.7"] {
            assert_eq!(
                refused(&open, a).as_deref(),
                Some("deny rule `no-doc` covers the address"),
                "{a}"
            );
        }
    }
}
