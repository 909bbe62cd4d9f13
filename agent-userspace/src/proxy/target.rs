//! The request target the proxy judges, which is the one it forwards.
//!
//! A target is normalised once ([`normalize_target`]); the rule's request check and,
//! on a rule with `git:`, the git check judge that form, and the target forwarded is
//! the judged one: the normal form, or for git the target [`GitRule::check_request`]
//! rebuilt from the repository and service it judged. An ambiguous target is refused
//! with 400; nothing else is forwarded.

use super::git::audit_of;
use super::Route;
use crate::audit::GitAudit;
use crate::policy::git::GitRequest;
use crate::policy::normalize_target;

/// What was judged, and is to be forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judged {
    /// Path and query, exactly as forwarded.
    pub target: String,
    /// The git request, on a rule with `git:`.
    pub git: Option<GitRequest>,
}

impl Judged {
    /// The path of the target, without its query.
    pub fn path(&self) -> &str {
        self.target
            .split_once('?')
            .map_or(self.target.as_str(), |(p, _)| p)
    }
}

/// Why a target is not forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetRefusal {
    /// The target could be read two ways (400).
    Ambiguous(String),
    /// The rule does not allow it (403); `git` once the git request was recognised.
    Denied {
        reason: String,
        git: Option<GitAudit>,
    },
}

/// Normalises `raw` (a request's path and query), judges it for `method` on `route`,
/// and returns the target to forward.
pub fn judge_target(route: &Route, method: &str, raw: &str) -> Result<Judged, TargetRefusal> {
    let target = normalize_target(raw).map_err(|why| {
        TargetRefusal::Ambiguous(format!(
            "downstream client: {method} {} refused: {why}",
            crate::policy::target_for_reason(raw)
        ))
    })?;
    if let Some(key) = super::method_override::in_query(&target) {
        return Err(TargetRefusal::Ambiguous(format!(
            "downstream client: {method} {} refused: query parameter {key} makes some \
             origins run another method than the request's",
            crate::policy::target_for_reason(raw)
        )));
    }
    (route.request_allowed)(method, &target)
        .map_err(|reason| TargetRefusal::Denied { reason, git: None })?;
    for operation in super::method_override::runs_as(method, &target) {
        (route.request_allowed)(operation, &target).map_err(|reason| TargetRefusal::Denied {
            reason: format!(
                "{reason} (a GET with `{}=true` runs as {operation} in Vault and OpenBao)",
                operation.to_ascii_lowercase()
            ),
            git: None,
        })?;
    }
    if let Some((key, what)) = second_target_in_query(method, &target) {
        return Err(TargetRefusal::Denied {
            reason: format!(
                "downstream client: {method} {} refused: query parameter {key} makes {what}, \
                 which the policy does not judge",
                crate::policy::target_for_reason(raw)
            ),
            git: None,
        });
    }
    let Some(rule) = &route.git else {
        return Ok(Judged { target, git: None });
    };
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target.as_str(), None),
    };
    match rule.check_request(method, path, query) {
        Ok(request) => Ok(Judged {
            target: request.target.clone(),
            git: Some(request),
        }),
        Err(refusal) => Err(TargetRefusal::Denied {
            reason: refusal.reason,
            git: refusal.request.as_ref().map(audit_of),
        }),
    }
}

/// Headers that name a second object a request acts on, in a form the policy cannot
/// judge (a bucket and key, a URL on another account, a container path): the source of a
/// copy (S3 and the stores that speak its API, Google Cloud Storage, Azure, Alibaba,
/// Tencent and Huawei object stores, OpenStack Swift), of a rename or move (S3's
/// RenameObject, Azure Data Lake and Files), the account a Swift COPY writes to, and what
/// a later read of the object reads instead (Swift manifests and symlinks, Alibaba
/// symlinks). A rule that allows `PUT /mine/*` must not let a request copy, move or
/// link `/theirs/secret` there, so a request carrying one is refused.
const SECOND_TARGET_HEADERS: [&str; 19] = [
    "x-amz-copy-source",
    "x-amz-rename-source",
    "x-oss-symlink-target",
    "destination-account",
    "x-goog-copy-source",
    "x-ms-copy-source",
    "x-ms-rename-source",
    "x-ms-file-rename-source",
    "x-oss-copy-source",
    "x-cos-copy-source",
    "x-obs-copy-source",
    "x-copy-from",
    "x-copy-from-account",
    "x-object-manifest",
    "x-symlink-target",
    "x-symlink-target-account",
    // Swift containers: where old versions are written, and where the whole container
    // is copied to, continuously (another account, another cluster).
    "x-versions-location",
    "x-history-location",
    "x-container-sync-to",
];

/// The first header of `headers` that names a second target the policy cannot judge.
pub fn unjudged_second_target(headers: &http::HeaderMap) -> Option<&'static str> {
    // One pass over the names the request has (a few), not a lookup of each listed one.
    headers.keys().find_map(second_target)
}

/// The listed name `name` is, if it names a second target (see
/// [`unjudged_second_target`]).
pub fn second_target(name: &http::HeaderName) -> Option<&'static str> {
    SECOND_TARGET_HEADERS
        .into_iter()
        .find(|n| *n == name.as_str())
}

/// A query parameter that makes the origin act on objects the path does not name (keys
/// and values decoded as form fields are), with what it makes the origin do:
/// - `mount` or `from` on a `POST` to a container registry's blob uploads (`/v2/<name>/
///   blobs/uploads/`): the registry copies a blob into the repository the path names,
///   from one the policy never judged;
/// - OpenStack Swift's `multipart-manifest` (but `=get`, which reads the manifest
///   itself): a static large object's manifest names its segments by paths anywhere in
///   the account, read or deleted with the request's credential;
/// - Swift's `bulk-delete` and `extract-archive`: the body lists the objects to delete
///   or holds an archive whose entries name the objects to create;
/// - Google Cloud Storage's `compose` (XML API, any method): the body lists the objects
///   whose bytes make the one the path names, a copy of objects the policy never judged.
fn second_target_in_query(method: &str, target: &str) -> Option<(String, &'static str)> {
    let (path, query) = target.split_once('?')?;
    let uploads = method == "POST" && path.contains("/blobs/uploads");
    super::method_override::query_pairs(query).find_map(|(key, value)| {
        let what = match key.as_str() {
            "mount" | "from" if uploads => "a registry copy a blob from another repository",
            "multipart-manifest" if value != "get" => {
                "OpenStack Swift write or delete a large object's segments, named by paths \
                 in its manifest"
            }
            "bulk-delete" | "extract-archive" => {
                "OpenStack Swift delete or create the objects its body names"
            }
            "compose" => "Google Cloud Storage copy the objects its body names into this one",
            _ => return None,
        };
        Some((key, what))
    })
}

/// A form field that mounts a blob from another repository, sent in the body of a request
/// to a container registry's blob uploads: registries read `mount` and `from` as form
/// values (Go's `Request.FormValue`), which a `POST`, `PUT` or `PATCH` body declared as a
/// form (`application/x-www-form-urlencoded`, `multipart/form-data`) supplies, ahead of
/// the query. Such a body is refused there; the upload's own bytes are never a form.
pub fn form_to_blob_uploads(method: &str, path: &str, headers: &http::HeaderMap) -> bool {
    matches!(method, "POST" | "PUT" | "PATCH")
        && path.contains("/blobs/uploads")
        && headers
            .get_all(http::header::CONTENT_TYPE)
            .iter()
            .any(|value| {
                let media = value.as_bytes().split(|&b| b == b';').next().unwrap_or(b"");
                let media = media.trim_ascii();
                media.eq_ignore_ascii_case(b"application/x-www-form-urlencoded")
                    || media.eq_ignore_ascii_case(b"multipart/form-data")
            })
}

/// The second target a request acts on, named in `Destination` (WebDAV's COPY and MOVE):
/// judged as the request's own is, for `method`, and returned in the form to forward:
/// the judged path, behind `https://` and `upstream` (the authority the request itself
/// is sent with) where the client gave an absolute URI, which must be an `https` one
/// naming `server_name` at the connection's port, with no user. `Ok(None)`: there is none.
pub fn judge_destination(
    route: &Route,
    server_name: &str,
    upstream: &http::uri::Authority,
    method: &str,
    headers: &http::HeaderMap,
) -> Result<Option<http::HeaderValue>, TargetRefusal> {
    let ambiguous = |why: &str| {
        TargetRefusal::Ambiguous(format!(
            "downstream client: {method} refused: Destination {why}"
        ))
    };
    let mut all = headers.get_all("destination").iter();
    let Some(value) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(ambiguous("given more than once"));
    }
    if route.git.is_some() {
        return Err(ambiguous("on a git route"));
    }
    let text = value.to_str().map_err(|_| ambiguous("is not ASCII"))?;
    let uri: http::Uri = text.parse().map_err(|_| ambiguous("is not a URI"))?;
    let (front, raw) = match (uri.scheme_str(), uri.authority()) {
        (Some(scheme), Some(authority)) => {
            if crate::credentials::normalize_host(authority.host()) != server_name {
                return Err(ambiguous(&format!(
                    "names host {}, not {server_name}",
                    crate::policy::target_for_reason(authority.host())
                )));
            }
            // What the origin would read as another origin is refused, not rewritten:
            // another scheme, another port, a user.
            if !scheme.eq_ignore_ascii_case("https") {
                return Err(ambiguous("is not an https URI"));
            }
            if authority.as_str().contains('@') {
                return Err(ambiguous("names a user"));
            }
            let port = |a: &http::uri::Authority| a.port_u16().unwrap_or(443);
            if port(authority) != port(upstream) {
                return Err(ambiguous(&format!(
                    "names port {}, not the connection's {}",
                    port(authority),
                    port(upstream)
                )));
            }
            (
                format!("https://{upstream}"),
                uri.path_and_query()
                    .map_or("/", http::uri::PathAndQuery::as_str),
            )
        }
        (None, None) if text.starts_with('/') => (String::new(), text),
        _ => return Err(ambiguous("is neither an absolute URI nor an absolute path")),
    };
    let judged = judge_target(route, method, raw).map_err(|refusal| match refusal {
        TargetRefusal::Ambiguous(why) => TargetRefusal::Ambiguous(format!("Destination: {why}")),
        TargetRefusal::Denied { reason, git } => TargetRefusal::Denied {
            reason: format!("Destination: {reason}"),
            git,
        },
    })?;
    http::HeaderValue::try_from(format!("{front}{}", judged.target))
        .map(Some)
        .map_err(|_| ambiguous("cannot be re-sent"))
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::policy::{parse_str, Policy};

    const POLICY: &str = r#"version: 1
default: deny
rules:
  - name: api
    to: [192.0.2.10]
    ports: [443]
    action: proxy
    hosts: [api.github.com]
    http:
      - methods: [GET, POST]
        paths: ["/repos/acme/widgets/**", "/a/*/c"]
  - name: git
    to: [192.0.2.11]
    ports: [443]
    action: proxy
    hosts: [github.com]
    git:
      repos: [acme/widgets]
      push: { refs: ["refs/heads/agent/**"] }
"#;

    fn route(policy: &Arc<Policy>, id: u16) -> Route {
        let rule = policy.proxy_rule(id).unwrap();
        let p = policy.clone();
        Route {
            rule_name: rule.name().to_string(),
            passthrough: false,
            credential: None,
            host_allowed: Box::new(|_| true),
            request_allowed: Box::new(move |m, t| p.proxy_rule(id).unwrap().check_request(m, t)),
            explicitly_covers: Box::new(|_| false),
            names_exactly: Box::new(|_| false),
            git: rule.git().cloned(),
        }
    }

    /// A GET that Vault runs as LIST is judged as LIST too.
    #[test]
    fn a_get_with_list_true_is_judged_as_list() {
        let policy = Arc::new(parse_str(POLICY, "test.yaml").unwrap());
        let api = route(&policy, 1);
        let judge = |t: &str| judge_target(&api, "GET", t);
        assert!(judge("/repos/acme/widgets/x").is_ok());
        assert!(judge("/repos/acme/widgets/x?list=false").is_ok());
        assert!(judge("/repos/acme/widgets/x?listing=true").is_ok());
        for listed in ["list=true", "a=1&list=1", "%6Cist=True", "list=%74"] {
            assert!(
                matches!(
                    judge(&format!("/repos/acme/widgets/x?{listed}")),
                    Err(TargetRefusal::Denied { .. })
                ),
                "{listed}"
            );
        }
        // A rule that lists LIST allows it.
        let listing = Arc::new(
            parse_str(
                &POLICY.replace("methods: [GET, POST]", "methods: [GET, POST, LIST]"),
                "test.yaml",
            )
            .unwrap(),
        );
        let api = route(&listing, 1);
        assert!(judge_target(&api, "GET", "/repos/acme/widgets/x?list=true").is_ok());
        // OpenBao runs `?scan=true` as SCAN, a recursive listing: a rule that lists LIST
        // does not allow it.
        for scanned in ["scan=true", "%73can=1", "list=true&scan=T"] {
            assert!(
                matches!(
                    judge_target(&api, "GET", &format!("/repos/acme/widgets/x?{scanned}")),
                    Err(TargetRefusal::Denied { .. })
                ),
                "{scanned}"
            );
        }
        let scanning = Arc::new(
            parse_str(
                &POLICY.replace("methods: [GET, POST]", "methods: [GET, POST, SCAN]"),
                "test.yaml",
            )
            .unwrap(),
        );
        let api = route(&scanning, 1);
        assert!(judge_target(&api, "GET", "/repos/acme/widgets/x?scan=true").is_ok());
        assert!(matches!(
            judge_target(&api, "GET", "/repos/acme/widgets/x?scan=1&list=1"),
            Err(TargetRefusal::Denied { .. })
        ));
    }

    /// A copy, rename or link source in a header is refused, whichever store's spelling,
    /// in any case; other headers are not.
    #[test]
    fn second_targets_the_policy_cannot_judge_are_found() {
        let mut h = http::HeaderMap::new();
        h.insert("x-amz-meta-note", http::HeaderValue::from_static("copy"));
        h.insert("content-type", http::HeaderValue::from_static("text/plain"));
        assert_eq!(unjudged_second_target(&h), None);
        for name in [
            "X-Amz-Copy-Source",
            "x-goog-copy-source",
            "X-MS-COPY-SOURCE",
            "x-ms-rename-source",
            "x-ms-file-rename-source",
            "x-copy-from",
            "x-object-manifest",
            "x-symlink-target",
            "X-Versions-Location",
            "x-history-location",
            "x-container-sync-to",
            "X-Amz-Rename-Source",
            "Destination-Account",
            "x-oss-symlink-target",
        ] {
            let mut with = h.clone();
            with.insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                http::HeaderValue::from_static("/acme/secret/db.dump"),
            );
            assert_eq!(
                unjudged_second_target(&with),
                Some(name.to_ascii_lowercase().as_str()),
                "{name}"
            );
        }
    }

    /// A registry blob mount from another repository is refused; other uploads are not.
    #[test]
    fn registry_mounts_from_other_repositories_are_refused() {
        let policy = Arc::new(
            parse_str(
                &POLICY.replace("/a/*/c", "/v2/acme/widgets/**"),
                "test.yaml",
            )
            .unwrap(),
        );
        let api = route(&policy, 1);
        assert!(judge_target(&api, "POST", "/v2/acme/widgets/blobs/uploads/").is_ok());
        assert!(judge_target(
            &api,
            "POST",
            "/v2/acme/widgets/blobs/uploads/?digest=sha256:1"
        )
        .is_ok());
        for query in [
            "mount=sha256:1&from=acme/secret",
            "from=acme/secret",
            "%6Dount=sha256:1",
        ] {
            assert!(
                matches!(
                    judge_target(
                        &api,
                        "POST",
                        &format!("/v2/acme/widgets/blobs/uploads/?{query}")
                    ),
                    Err(TargetRefusal::Denied { .. })
                ),
                "{query}"
            );
        }
    }

    /// The same mount sent as form fields in the body is refused: any form body to blob
    /// uploads, however its type is spelled; an upload's own bytes are not.
    #[test]
    fn registry_mounts_in_a_form_body_are_refused() {
        let with = |types: &[&str]| {
            let mut h = http::HeaderMap::new();
            for t in types {
                h.append(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_str(t).unwrap(),
                );
            }
            h
        };
        let uploads = "/v2/acme/widgets/blobs/uploads/";
        for types in [
            &["application/x-www-form-urlencoded"][..],
            &["Application/X-WWW-Form-URLEncoded; charset=utf-8"],
            &[" multipart/form-data ;boundary=x"],
            &[
                "application/octet-stream",
                "multipart/form-data; boundary=x",
            ],
        ] {
            for method in ["POST", "PUT", "PATCH"] {
                assert!(
                    form_to_blob_uploads(method, uploads, &with(types)),
                    "{method} {types:?}"
                );
            }
        }
        let form = with(&["application/x-www-form-urlencoded"]);
        assert!(!form_to_blob_uploads("GET", uploads, &form));
        assert!(!form_to_blob_uploads(
            "POST",
            "/v2/acme/widgets/manifests/1",
            &form
        ));
        for types in [
            &[][..],
            &["application/octet-stream"],
            &["text/plain; x=multipart/form-data"],
        ] {
            assert!(
                !form_to_blob_uploads("PATCH", uploads, &with(types)),
                "{types:?}"
            );
        }
    }

    /// OpenStack Swift's parameters that act on objects named elsewhere (a large object's
    /// manifest, a bulk delete's list, an archive's entries) are refused, in any spelling
    /// of the key; reading a manifest is not.
    #[test]
    fn swift_second_targets_in_the_query_are_refused() {
        let policy = Arc::new(
            parse_str(
                &POLICY
                    .replace("/a/*/c", "/v1/AUTH_acct/mine/**")
                    .replace("[GET, POST]", "[GET, POST, PUT, DELETE]"),
                "test.yaml",
            )
            .unwrap(),
        );
        let api = route(&policy, 1);
        let judge = |method: &str, query: &str| {
            judge_target(&api, method, &format!("/v1/AUTH_acct/mine/x?{query}"))
        };
        for method in ["GET", "PUT", "DELETE", "POST"] {
            for query in [
                "multipart-manifest=get",
                "format=json",
                "multipart=put",
                "composed=1",
            ] {
                assert!(judge(method, query).is_ok(), "{method} {query}");
            }
        }
        for (method, query) in [
            ("PUT", "multipart-manifest=put"),
            ("PUT", "multipart%2Dmanifest=put"),
            ("PUT", "multipart-manifest=get&multipart-manifest=put"),
            ("PUT", "multipart-manifest=PUT"),
            ("DELETE", "multipart-manifest=delete"),
            ("DELETE", "bulk-delete"),
            ("POST", "bulk-delete=1"),
            ("PUT", "extract-archive=tar"),
            ("PUT", "x=1;extract-archive=tar.gz"),
            ("PUT", "compose"),
            ("PUT", "c%6Fmpose="),
            ("POST", "a=1&compose"),
        ] {
            assert!(
                matches!(judge(method, query), Err(TargetRefusal::Denied { .. })),
                "{method} {query}"
            );
        }
    }

    /// WebDAV's second target is judged like the first, and sent in the form judged.
    #[test]
    fn destinations_are_judged_and_normalised() {
        let policy = Arc::new(parse_str(POLICY, "test.yaml").unwrap());
        let api = route(&policy, 1);
        let upstream = http::uri::Authority::from_static("api.github.com");
        let judge = |values: &[&str]| {
            let mut h = http::HeaderMap::new();
            for v in values {
                h.append("destination", http::HeaderValue::from_str(v).unwrap());
            }
            judge_destination(&api, "api.github.com", &upstream, "POST", &h)
        };
        assert!(matches!(judge(&[]), Ok(None)));
        let sent = |v: &str| {
            judge(&[v])
                .ok()
                .flatten()
                .map(|h| h.to_str().unwrap().to_owned())
        };
        assert_eq!(
            sent("https://API.github.com./repos/acme/widgets/b%41").as_deref(),
            Some("https://api.github.com/repos/acme/widgets/bA")
        );
        assert_eq!(
            sent("HTTPS://api.github.com:443/repos/acme/widgets/x").as_deref(),
            Some("https://api.github.com/repos/acme/widgets/x")
        );
        assert_eq!(
            sent("/repos/acme/widgets/x").as_deref(),
            Some("/repos/acme/widgets/x")
        );
        assert!(matches!(
            judge(&["https://api.github.com/repos/acme/other"]),
            Err(TargetRefusal::Denied { .. })
        ));
        for ambiguous in [
            "https://evil.example/repos/acme/widgets/x",
            "https://api.github.com/repos/acme/widgets/../other",
            "https://api.github.com/repos/acme/widgets/%2e%2e/x",
            "repos/acme/widgets/x",
            "http://api.github.com/repos/acme/widgets/x",
            "https://user@api.github.com/repos/acme/widgets/x",
            "https://u:p@api.github.com/repos/acme/widgets/x",
            "https://api.github.com:8443/repos/acme/widgets/x",
            "ftp://api.github.com/repos/acme/widgets/x",
        ] {
            assert!(
                matches!(judge(&[ambiguous]), Err(TargetRefusal::Ambiguous(_))),
                "{ambiguous}"
            );
        }
        assert!(matches!(
            judge(&["/repos/acme/widgets/a", "/repos/acme/widgets/b"]),
            Err(TargetRefusal::Ambiguous(_))
        ));
        let git = route(&policy, 2);
        let mut h = http::HeaderMap::new();
        h.insert(
            "destination",
            http::HeaderValue::from_static("/acme/widgets.git"),
        );
        assert!(matches!(
            judge_destination(
                &git,
                "github.com",
                &http::uri::Authority::from_static("github.com"),
                "POST",
                &h
            ),
            Err(TargetRefusal::Ambiguous(_))
        ));
    }

    /// Every byte of `s` percent-decoded, as an origin that decodes everything reads it.
    fn decode(s: &str) -> Vec<u8> {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let hex = (b[i] == b'%')
                .then(|| b.get(i + 1..i + 3))
                .flatten()
                .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
            match hex {
                Some(v) => {
                    out.push(v);
                    i += 3;
                }
                None => {
                    out.push(b[i]);
                    i += 1;
                }
            }
        }
        out
    }

    /// The path an origin routes on (nginx, then `git http-backend`): decoded, `\`
    /// taken as `/` (as some servers do), slashes merged, dot segments removed
    /// (RFC 3986 section 5.2.4). `None` when the decoded bytes are not UTF-8.
    fn origin_path(path: &str) -> Option<String> {
        let decoded = String::from_utf8(decode(path)).ok()?.replace('\\', "/");
        let mut out: Vec<&str> = Vec::new();
        let segments: Vec<&str> = decoded.split('/').skip(1).collect();
        let last = segments.len().saturating_sub(1);
        for (i, seg) in segments.iter().enumerate() {
            match *seg {
                "" if i != last => {}
                "." => {}
                ".." => {
                    out.pop();
                }
                s => out.push(s),
            }
        }
        Some(format!("/{}", out.join("/")))
    }

    /// What `git http-backend` behind nginx serves for a target: (repository directory,
    /// service, advertisement), from the routed path and the decoded `service`
    /// parameters.
    fn origin_git(target: &str) -> Option<(String, String, bool)> {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let path = origin_path(path)?;
        let services: Vec<String> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| decode(k) == b"service")
            .map(|(_, v)| String::from_utf8_lossy(&decode(v)).into_owned())
            .collect();
        if let Some(dir) = path.strip_suffix("/info/refs") {
            let [service] = services.as_slice() else {
                return None;
            };
            return Some((dir[1..].to_owned(), service.clone(), true));
        }
        for service in ["git-upload-pack", "git-receive-pack"] {
            if let Some(dir) = path.strip_suffix(&format!("/{service}")) {
                return Some((dir.get(1..)?.to_owned(), service.to_owned(), false));
            }
        }
        None
    }

    const SEGMENTS: &[&str] = &[
        "acme",
        "Acme",
        "ACME",
        "widgets",
        "Widgets",
        "widgets.git",
        "Widgets.git",
        "widgets.git.git",
        "other",
        "other.git",
        ".git",
        ".",
        "..",
        "",
        "%2e",
        "%2E%2e",
        ".%2e",
        "%2e.",
        "%2F",
        "%2f",
        "%5C",
        "\\",
        "%00",
        "%0a",
        "%41",
        "%77idgets",
        "wid%67ets",
        "%61cme",
        "info",
        "refs",
        "INFO",
        "info%2Frefs",
        "git-upload-pack",
        "git-receive-pack",
        "git%2Dupload-pack",
        "git-upload-pack%3F",
        ";",
        "..;",
        "widgets;x",
        "%3B",
        "%C0%AE",
        "%C0%AE%C0%AE",
        "%E0%80%AE",
        "%EF%BC%8E%EF%BC%8E",
        "%EF%BC%8F",
        "%EF%B8%B0",
        "%25",
        "%252e",
        "~",
        "%7E",
        "%20",
        "x",
        "repos",
        "a",
        "c",
        "%C3%A9",
        "%c3%a9",
        "%ff",
    ];
    const SUFFIXES: &[&str] = &[
        "",
        "?service=git-upload-pack",
        "?service=git-receive-pack",
        "?service=git-upload-pack&service=git-receive-pack",
        "?service=git%2Dreceive-pack",
        "?%73ervice=git-receive-pack",
        "?",
        "?x=1",
        "#frag",
        "?service=git-upload-pack#x",
        "/",
    ];

    /// xorshift64*: a fixed sequence, so a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
        }
    }

    /// Paths made of tricky segments; the git and API shapes are seeded so that a fair
    /// share passes.
    fn generated(n: usize) -> Vec<String> {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let templates: &[&[&str]] = &[
            &["acme", "widgets", "info", "refs"],
            &["acme", "widgets.git", "git-upload-pack"],
            &["acme", "widgets", "git-receive-pack"],
            &["repos", "acme", "widgets", "x"],
            &["a", "x", "c"],
        ];
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let mut segs: Vec<&str> = if rng.below(2) == 0 {
                templates[rng.below(templates.len())].to_vec()
            } else {
                (0..1 + rng.below(5))
                    .map(|_| SEGMENTS[rng.below(SEGMENTS.len())])
                    .collect()
            };
            // Replace or insert a few segments of a template with tricky ones.
            for _ in 0..rng.below(3) {
                let at = rng.below(segs.len() + 1);
                let seg = SEGMENTS[rng.below(SEGMENTS.len())];
                if rng.below(2) == 0 && at < segs.len() {
                    segs[at] = seg;
                } else {
                    segs.insert(at, seg);
                }
            }
            let lead = if rng.below(8) == 0 { "//" } else { "/" };
            let suffix = SUFFIXES[rng.below(SUFFIXES.len())];
            out.push(format!("{lead}{}{suffix}", segs.join("/")));
        }
        out
    }

    #[test]
    fn the_forwarded_target_is_the_judged_one_and_the_origin_routes_it_alike() {
        let policy = Arc::new(parse_str(POLICY, "test.yaml").unwrap());
        let (api, git) = (route(&policy, 1), route(&policy, 2));
        let allowed_dirs = ["acme/widgets", "acme/widgets.git"];
        let mut passed = (0, 0);
        for raw in generated(40_000) {
            for method in ["GET", "POST"] {
                // An API rule: the origin reads the same segments that were judged.
                if let Ok(judged) = judge_target(&api, method, &raw) {
                    passed.0 += 1;
                    let target = &judged.target;
                    assert_eq!(normalize_target(target).as_ref(), Ok(target), "{raw}");
                    let pq = http::uri::PathAndQuery::try_from(target.as_str()).unwrap();
                    assert_eq!(pq.as_str(), target, "{raw}");
                    let path = judged.path();
                    let decoded = String::from_utf8(decode(path)).unwrap();
                    assert_eq!(
                        origin_path(path).as_deref(),
                        Some(decoded.as_str()),
                        "{raw}"
                    );
                    assert_eq!(
                        decoded.matches('/').count(),
                        path.matches('/').count(),
                        "{raw}"
                    );
                    assert!(
                        decoded.starts_with("/repos/acme/widgets")
                            || (decoded.starts_with("/a/") && decoded.ends_with("/c")),
                        "{raw} -> {target} reaches {decoded}"
                    );
                }
                // A git rule: the origin serves exactly the judged repository and service.
                if let Ok(judged) = judge_target(&git, method, &raw) {
                    passed.1 += 1;
                    let request = judged.git.as_ref().unwrap();
                    assert_eq!(request.target, judged.target);
                    assert_eq!(
                        normalize_target(&judged.target).as_ref(),
                        Ok(&judged.target)
                    );
                    let routed = origin_git(&judged.target);
                    assert!(routed.is_some(), "{raw} -> {} is not git", judged.target);
                    let (dir, service, advertisement) = routed.unwrap();
                    assert!(allowed_dirs.contains(&dir.as_str()), "{raw} reaches {dir}");
                    assert_eq!(service, request.service.as_str(), "{raw}");
                    assert_eq!(advertisement, request.advertisement, "{raw}");
                    assert_eq!(request.repo, "acme/widgets", "{raw}");
                }
            }
        }
        // Not vacuous: plenty of each kind passed.
        assert!(passed.0 > 1000 && passed.1 > 300, "{passed:?}");
    }

    #[test]
    fn method_override_query_parameters_are_refused() {
        let policy = Arc::new(parse_str(POLICY, "test.yaml").unwrap());
        let api = route(&policy, 1);
        let base = "/repos/acme/widgets/issues";
        for query in [
            "_method=DELETE",
            "a=1&_method=PUT",
            "%5Fmethod=DELETE",
            "%5fMETHOD=delete",
            "_method",
            "X-HTTP-Method-Override=DELETE",
            "a=1;_method=DELETE",
            ".method=DELETE",
            "+method=DELETE",
            "%20method=DELETE",
        ] {
            let raw = format!("{base}?{query}");
            let refused = judge_target(&api, "POST", &raw).map(|j| j.target);
            assert!(
                matches!(&refused, Err(TargetRefusal::Ambiguous(why)) if why.contains("another method")),
                "{raw}: {refused:?}"
            );
        }
        for query in ["method=x", "x_method=1", "a=_method"] {
            let raw = format!("{base}?{query}");
            assert!(judge_target(&api, "POST", &raw).is_ok(), "{raw}");
        }
    }

    #[test]
    fn path_tricks_are_refused_with_400_or_403() {
        let policy = Arc::new(parse_str(POLICY, "test.yaml").unwrap());
        let git = route(&policy, 2);
        let q = "?service=git-upload-pack";
        for raw in [
            format!("/acme/widgets.git/../other.git/info/refs{q}"),
            format!("/acme/widgets/%2e%2e/other/info/refs{q}"),
            format!("//acme/widgets/info/refs{q}"),
            format!("/acme/widgets.git%2F..%2Fother.git/info/refs{q}"),
            format!("/acme/widgets/%C0%AE%C0%AE/other/info/refs{q}"),
            format!("/acme/widgets/info/refs{q}#x"),
        ] {
            assert!(
                matches!(
                    judge_target(&git, "GET", &raw),
                    Err(TargetRefusal::Ambiguous(_))
                ),
                "{raw}"
            );
        }
        for raw in [
            format!("/acme/Widgets/info/refs{q}"),
            format!("/acme/widgets.git.git/info/refs{q}"),
            format!("/acme/widgets/.git/info/refs{q}"),
            "/acme/widgets/info/refs?service=git-upload-pack&service=git-receive-pack".into(),
            "/acme/widgets/info/refs?service=git%2Dreceive-pack".into(),
        ] {
            assert!(
                matches!(
                    judge_target(&git, "GET", &raw),
                    Err(TargetRefusal::Denied { .. })
                ),
                "{raw}"
            );
        }
        let ok = judge_target(&git, "GET", &format!("/%61cme/wid%67ets.git/info/refs{q}"));
        assert_eq!(
            ok.unwrap().target,
            format!("/acme/widgets.git/info/refs{q}")
        );
    }
}
