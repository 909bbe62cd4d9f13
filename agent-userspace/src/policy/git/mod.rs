//! Git over smart HTTP, as a policy sees it: which repositories a rule lets a sandbox
//! fetch from and push to, and which refs a push may update.
//!
//! A proxy rule with a `git:` block ([`RawGitRule`], compiled into [`GitRule`]) allows
//! only the three smart-HTTP requests of the listed repositories:
//!
//! - `GET /<owner>/<repo>[.git]/info/refs?service=git-upload-pack|git-receive-pack`
//! - `POST /<owner>/<repo>[.git]/git-upload-pack` (clone, fetch; protocol v0, v1 and v2
//!   alike, passed through)
//! - `POST /<owner>/<repo>[.git]/git-receive-pack` (push)
//!
//! `<owner>/<repo>` must be spelled as the rule lists it, case included, with or without
//! one `.git`: an origin such as `git http-backend` on a case-sensitive file system serves
//! `Acme/Widgets` and `acme/widgets.git.git` as other repositories than `acme/widgets`.
//! The request target forwarded is [`GitRequest::target`], rebuilt from the judged parts,
//! so the origin routes exactly the repository and service that were judged.
//!
//! Anything else on such a rule is refused with a reason. A push's commands
//! ([`CommandList`], read from the request by the proxy) are judged all or nothing by
//! [`GitRule::judge_push`]; the proxy streams the packfile after them, never parsed.

mod refs;

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
pub(crate) mod tests;

use std::collections::BTreeSet;

use serde::Deserialize;

pub use refs::{invalid_ref_name, RefGlob};

use crate::text::sanitize;

/// One ref update a push asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Object id the ref has now, in hex; all zeros to create it.
    pub old: String,
    /// Object id the ref is to get, in hex; all zeros to delete it.
    pub new: String,
    /// The full ref name, e.g. `refs/heads/main`.
    pub name: String,
}

impl Command {
    /// Whether the update deletes the ref.
    pub fn is_delete(&self) -> bool {
        is_zero(&self.new)
    }
}

/// Whether an object id is the all-zeros id (no object: a creation or deletion).
pub fn is_zero(oid: &str) -> bool {
    oid.bytes().all(|b| b == b'0')
}

/// The command section of a push, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommandList {
    pub commands: Vec<Command>,
    /// The capabilities after the first command's NUL, e.g. `report-status`,
    /// `side-band-64k`, `agent=git/2.47.0`.
    pub capabilities: Vec<String>,
    /// The push options (`git push -o`), when the `push-options` capability was given.
    pub options: Vec<String>,
    /// Bytes of the request the section took, flush included (and the push options with
    /// their flush).
    pub len: usize,
}

impl CommandList {
    /// Whether the first command announced `capability`, bare or with a value
    /// (`push-options=1`), as git reads it.
    pub fn has(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| {
            c.strip_prefix(capability)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('='))
        })
    }
}

/// The `git:` block of a proxy rule, as written in the policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGitRule {
    /// Repositories as `owner/name` (letters, digits, `_`, `.`, `-`; a `.git` suffix is
    /// ignored), compared exactly, case included. URLs may add one `.git`.
    pub repos: Vec<String>,
    /// Whether clone/fetch/pull (`git-upload-pack`) is allowed. Default true.
    #[serde(default = "default_true")]
    pub fetch: bool,
    /// Whether, and to which refs, pushes (`git-receive-pack`) are allowed; absent: none.
    #[serde(default)]
    pub push: Option<RawPush>,
}

fn default_true() -> bool {
    true
}

/// What a push may update.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPush {
    /// Ref globs every updated ref must match, e.g. `refs/heads/agent/**`: `*` matches
    /// within one segment, `**` whole segments (at least one when last).
    pub refs: Vec<String>,
    /// Whether refs may be deleted. Default false.
    #[serde(default)]
    pub delete: bool,
    /// Whether `refs/tags/*` may be touched at all (each tag must also match `refs`).
    /// Default false.
    #[serde(default)]
    pub tags: bool,
    /// Push options (`git push -o <option>`) allowed: `true` for any, `false` for none,
    /// or a list of options, each exact (`ci.skip`) or `<name>=*` for any value of one
    /// (`merge_request.title=*`). Default: none.
    #[serde(default)]
    pub options: RawPushOptions,
}

/// `push.options`: a switch or a list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RawPushOptions {
    All(bool),
    Listed(Vec<String>),
}

impl Default for RawPushOptions {
    fn default() -> Self {
        Self::All(false)
    }
}

/// A checked `git:` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitRule {
    /// `owner/name` as the rule spells it, without `.git`.
    repos: BTreeSet<String>,
    fetch: bool,
    push: Option<PushRule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PushRule {
    refs: Vec<RefGlob>,
    delete: bool,
    tags: bool,
    options: PushOptions,
}

/// Which push options a push may carry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PushOptions {
    Any,
    /// Exact options, and names (with their `=`) whose options may take any value.
    Listed {
        exact: Vec<String>,
        any_value: Vec<String>,
    },
}

impl PushOptions {
    fn allows(&self, option: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Listed { exact, any_value } => {
                exact.iter().any(|o| o == option)
                    || any_value
                        .iter()
                        .any(|prefix| option.starts_with(prefix.as_str()))
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Any => "any".to_owned(),
            Self::Listed { exact, any_value } if exact.is_empty() && any_value.is_empty() => {
                "none".to_owned()
            }
            Self::Listed { exact, any_value } => exact
                .iter()
                .cloned()
                .chain(any_value.iter().map(|p| format!("{p}*")))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

/// Checks `push.options`.
fn compile_options(raw: &RawPushOptions) -> Result<PushOptions, String> {
    let listed = match raw {
        RawPushOptions::All(true) => return Ok(PushOptions::Any),
        RawPushOptions::All(false) => &[][..],
        RawPushOptions::Listed(listed) => listed.as_slice(),
    };
    let (mut exact, mut any_value) = (Vec::new(), Vec::new());
    for (i, option) in listed.iter().enumerate() {
        let bad = |why: &str| {
            format!(
                "push.options[{i}]: `{}` {why} (valid: an option such as `ci.skip`, or \
                 `<name>=*` for any value of one; printable characters, no spaces)",
                sanitize(option, 100)
            )
        };
        if option.is_empty() {
            return Err(bad("is empty"));
        }
        if option.chars().any(|c| !c.is_ascii_graphic()) {
            return Err(bad("contains a space, control or non-ASCII character"));
        }
        match option.strip_suffix('*') {
            Some(prefix) if prefix.ends_with('=') && !prefix[..prefix.len() - 1].is_empty() => {
                if prefix.contains('*') {
                    return Err(bad("has `*` other than as a whole value"));
                }
                any_value.push(prefix.to_owned());
            }
            _ if option.contains('*') => return Err(bad("has `*` other than as `<name>=*`")),
            _ => exact.push(option.clone()),
        }
    }
    Ok(PushOptions::Listed { exact, any_value })
}

/// The two git services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    /// Clone and fetch.
    UploadPack,
    /// Push.
    ReceivePack,
}

impl Service {
    /// `git-upload-pack` or `git-receive-pack`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UploadPack => "git-upload-pack",
            Self::ReceivePack => "git-receive-pack",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "git-upload-pack" => Some(Self::UploadPack),
            "git-receive-pack" => Some(Self::ReceivePack),
            _ => None,
        }
    }
}

/// A git request a rule allows (so far: a push still has its commands judged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitRequest {
    /// `owner/name` as the URL spells it, without `.git`.
    pub repo: String,
    pub service: Service,
    /// `GET info/refs` (the ref advertisement) rather than the `POST` itself.
    pub advertisement: bool,
    /// The request target judged, and the one to forward: `/<owner>/<name>[.git]/`
    /// followed by `info/refs?service=<service>` or `<service>`, nothing else.
    pub target: String,
}

impl GitRequest {
    /// Whether this is the push itself, whose body must be inspected.
    pub fn is_push(&self) -> bool {
        self.service == Service::ReceivePack && !self.advertisement
    }
}

/// Why a request was refused, with what is known of it for the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitRefusal {
    pub reason: String,
    /// Present once the repository and service were recognised.
    pub request: Option<GitRequest>,
}

/// How a rule judged a push's commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushJudgement {
    /// Per command: `Ok` or the reason the status report gives.
    pub results: Vec<Result<(), String>>,
    /// Per command, for the record: the rule's verdict on that ref alone.
    pub allowed: Vec<bool>,
    /// A summary for the record's reason when something was refused.
    pub refused: Option<String>,
}

const TAGS: &str = "refs/tags/";

/// Gerrit's magic refs, whose name may carry push options after `%`.
const GERRIT_MAGIC: [&str; 3] = ["refs/for/", "refs/drafts/", "refs/publish/"];

/// A ref name as Gerrit reads it: the name before the first `%` of a magic ref, and the
/// comma-separated push options after it (none for any other ref).
fn gerrit_options(name: &str) -> (&str, Vec<&str>) {
    let magic = GERRIT_MAGIC.iter().any(|m| name.starts_with(m));
    match name.split_once('%') {
        Some((name, options)) if magic => (name, options.split(',').collect()),
        _ => (name, Vec::new()),
    }
}

impl GitRule {
    /// Checks a `git:` block. Errors name the field (`repos[1]`, `push.refs[0]`, ...) and
    /// say what would be valid.
    pub fn compile(raw: &RawGitRule) -> Result<Self, String> {
        if raw.repos.is_empty() {
            return Err("repos: list at least one repository as `owner/name`".to_owned());
        }
        let mut repos = BTreeSet::new();
        for (i, repo) in raw.repos.iter().enumerate() {
            let normalized = normalize_repo(repo).ok_or_else(|| {
                format!(
                    "repos[{i}]: `{repo}` is not `owner/name` (letters, digits, `_`, `.`, `-`; \
                     no URL, no wildcards)"
                )
            })?;
            repos.insert(normalized);
        }
        let push = match &raw.push {
            None => None,
            Some(push) => {
                if push.refs.is_empty() {
                    return Err(
                        "push.refs: list at least one ref glob such as `refs/heads/agent/**` \
                         (leave `push` out to forbid pushing)"
                            .to_owned(),
                    );
                }
                let refs = push
                    .refs
                    .iter()
                    .enumerate()
                    .map(|(i, glob)| {
                        RefGlob::parse(glob).map_err(|e| format!("push.refs[{i}]: {e}"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Some(PushRule {
                    refs,
                    delete: push.delete,
                    tags: push.tags,
                    options: compile_options(&push.options)?,
                })
            }
        };
        if !raw.fetch && push.is_none() {
            return Err(
                "fetch is false and there is no push: the rule would allow nothing".to_owned(),
            );
        }
        Ok(Self {
            repos,
            fetch: raw.fetch,
            push,
        })
    }

    /// The allowed repositories, `owner/name` as the rule spells them.
    pub fn repos(&self) -> impl Iterator<Item = &str> {
        self.repos.iter().map(String::as_str)
    }

    /// Whether fetching is allowed.
    pub fn allows_fetch(&self) -> bool {
        self.fetch
    }

    /// Whether pushing (to some refs) is allowed.
    pub fn allows_push(&self) -> bool {
        self.push.is_some()
    }

    /// Judges a request line: the three smart-HTTP requests of an allowed repository, for
    /// an allowed service. A push's commands are judged later by [`Self::judge_push`].
    pub fn check_request(
        &self,
        method: &str,
        path: &str,
        query: Option<&str>,
    ) -> Result<GitRequest, GitRefusal> {
        let refuse = |reason: String| GitRefusal {
            reason,
            request: None,
        };
        let not_git = || {
            refuse(format!(
                "git: {method} {path} is not a git smart-HTTP request; only info/refs, \
                 git-upload-pack and git-receive-pack of the allowed repositories are"
            ))
        };
        let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
        let (owner, name, service, advertisement) = match segments.as_slice() {
            [owner, name, "info", "refs"] => {
                let service = query
                    .and_then(|q| q.strip_prefix("service="))
                    .and_then(Service::parse)
                    .ok_or_else(|| {
                        refuse(format!(
                            "git: {path} needs ?service=git-upload-pack or \
                             ?service=git-receive-pack (the dumb HTTP protocol is not allowed)"
                        ))
                    })?;
                (*owner, *name, service, true)
            }
            [owner, name, rpc] => {
                let Some(service) = Service::parse(rpc) else {
                    return Err(not_git());
                };
                if query.is_some_and(|q| !q.is_empty()) {
                    return Err(refuse(format!(
                        "git: {method} {path} must not carry a query string"
                    )));
                }
                (*owner, *name, service, false)
            }
            _ => return Err(not_git()),
        };
        let (name, suffix) = match name.strip_suffix(".git") {
            Some(bare) => (bare, ".git"),
            None => (name, ""),
        };
        let repo = format!("{owner}/{name}");
        // `name.git.git` is the repository `name.git`, which no rule lists (a listed
        // name has its `.git` dropped): refused below as not allowed.
        if normalize_repo(&repo).is_none() {
            return Err(not_git());
        }
        let rpc = if advertisement {
            format!("info/refs?service={}", service.as_str())
        } else {
            service.as_str().to_owned()
        };
        let request = GitRequest {
            target: format!("/{repo}{suffix}/{rpc}"),
            repo,
            service,
            advertisement,
        };
        let refuse_known = |reason: String| GitRefusal {
            reason,
            request: Some(request.clone()),
        };
        let expected = if advertisement { "GET" } else { "POST" };
        if method != expected {
            return Err(refuse_known(format!(
                "git: {method} {path}: this git request must be {expected}"
            )));
        }
        if !self.repos.contains(&request.repo) {
            let spelled = self
                .repos
                .iter()
                .find(|r| r.eq_ignore_ascii_case(&request.repo))
                .map(|r| format!("; names are compared exactly: did you mean {r}?"))
                .unwrap_or_default();
            return Err(refuse_known(format!(
                "git: repository {} is not allowed (allowed: {}){spelled}",
                request.repo,
                self.repos.iter().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        match service {
            Service::UploadPack if !self.fetch => Err(refuse_known(format!(
                "git: fetching from {} is not allowed",
                request.repo
            ))),
            Service::ReceivePack if self.push.is_none() => Err(refuse_known(format!(
                "git: pushing to {} is not allowed",
                request.repo
            ))),
            _ => Ok(request),
        }
    }

    /// The reason one ref update is refused (as `ng <ref> <reason>` says it), or `Ok`.
    pub fn check_update(&self, command: &Command) -> Result<(), String> {
        let Some(push) = &self.push else {
            return Err("refused by egress policy: pushing is not allowed".to_owned());
        };
        if let Some(why) = invalid_ref_name(&command.name) {
            return Err(format!(
                "refused by egress policy: invalid ref name: it {why}"
            ));
        }
        // Gerrit reads what follows `%` in a magic ref (`refs/for/main%submit,r=alice`)
        // as push options: the ref is the part before it, and each option is judged as
        // one given with `-o`.
        let (name, options) = gerrit_options(&command.name);
        if !push.refs.iter().any(|g| g.matches(name)) {
            let allowed: Vec<&str> = push.refs.iter().map(RefGlob::as_str).collect();
            return Err(format!(
                "refused by egress policy: allowed {}",
                allowed.join(", ")
            ));
        }
        if let Some(option) = options.iter().find(|o| !push.options.allows(o)) {
            return Err(format!(
                "refused by egress policy: push option \"{}\" (after `%` in the ref name) is \
                 not allowed (allowed: {})",
                sanitize(option, 100),
                push.options.describe()
            ));
        }
        // In any case, Unicode's included: a server keeping loose refs on a
        // case-insensitive file system stores `refs/TAGS/v1` as tag `v1`, and one that
        // folds as Unicode does (APFS, NTFS) `refs/tagſ/v1` (long s) too.
        let tag = name
            .strip_prefix("refs/")
            .and_then(|rest| rest.split('/').next())
            .is_some_and(|first| first.to_uppercase() == "TAGS" || first.to_lowercase() == "tags")
            || name
                .get(..TAGS.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(TAGS));
        if !push.tags && tag {
            return Err("refused by egress policy: tags are not allowed".to_owned());
        }
        if !push.delete && command.is_delete() {
            return Err("refused by egress policy: deleting refs is not allowed".to_owned());
        }
        Ok(())
    }

    /// Why a push carrying `options` is refused, if it is: the first option the rule does
    /// not list (shown escaped and cut short).
    pub fn refused_option(&self, options: &[String]) -> Option<String> {
        let allowed = match &self.push {
            Some(push) => &push.options,
            None => return Some("refused by egress policy: pushing is not allowed".to_owned()),
        };
        let option = options.iter().find(|o| !allowed.allows(o))?;
        Some(format!(
            "refused by egress policy: push option \"{}\" is not allowed (allowed: {})",
            sanitize(option, 100),
            allowed.describe()
        ))
    }

    /// Judges every command of a push, and its push options. All or nothing: if one is refused, the others are
    /// reported as not pushed.
    pub fn judge_push(&self, list: &CommandList) -> PushJudgement {
        let verdicts: Vec<Result<(), String>> =
            list.commands.iter().map(|c| self.check_update(c)).collect();
        let allowed = verdicts.iter().map(Result::is_ok).collect();
        let refused: Vec<(&Command, &String)> = list
            .commands
            .iter()
            .zip(&verdicts)
            .filter_map(|(c, v)| v.as_ref().err().map(|e| (c, e)))
            .collect();
        if let Some(reason) = self.refused_option(&list.options) {
            let results = list.commands.iter().map(|_| Err(reason.clone())).collect();
            return PushJudgement {
                results,
                allowed,
                refused: Some(format!("git push refused: {reason}")),
            };
        }
        let Some((first, reason)) = refused.first() else {
            return PushJudgement {
                results: verdicts,
                allowed,
                refused: None,
            };
        };
        let summary = format!(
            "git push refused: {} of {} ref updates refused; {}: {reason}",
            refused.len(),
            list.commands.len(),
            first.name
        );
        let results = verdicts
            .into_iter()
            .map(|v| v.and(Err("not pushed: another ref was refused".to_owned())))
            .collect();
        PushJudgement {
            results,
            allowed,
            refused: Some(summary),
        }
    }
}

/// `owner/name` without `.git`, or `None` when it is not one.
fn normalize_repo(repo: &str) -> Option<String> {
    let (owner, name) = repo.split_once('/')?;
    let name = name.strip_suffix(".git").unwrap_or(name);
    let valid = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.len() <= 100
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    };
    (valid(owner) && valid(name)).then(|| format!("{owner}/{name}"))
}
