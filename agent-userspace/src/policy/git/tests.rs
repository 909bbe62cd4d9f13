//! The `git:` rule: what it compiles, which requests and ref updates it allows.

use super::*;

pub(crate) const A: &str = "1111111111111111111111111111111111111111";
pub(crate) const B: &str = "2222222222222222222222222222222222222222";
pub(crate) const Z: &str = "0000000000000000000000000000000000000000";

pub(crate) fn rule(yaml: &str) -> GitRule {
    GitRule::compile(&serde_yaml_ng::from_str::<RawGitRule>(yaml).unwrap()).unwrap()
}

pub(crate) fn agent_rule() -> GitRule {
    rule("repos: [acme/widgets, acme/tools.git]\npush: { refs: [\"refs/heads/agent/**\"] }\n")
}

pub(crate) fn command(old: &str, new: &str, name: &str) -> Command {
    Command {
        old: old.to_owned(),
        new: new.to_owned(),
        name: name.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------------

#[test]
fn rules_are_checked_when_compiled() {
    let err = |yaml: &str| {
        GitRule::compile(&serde_yaml_ng::from_str::<RawGitRule>(yaml).unwrap()).unwrap_err()
    };
    assert!(err("repos: []\n").starts_with("repos:"));
    assert!(err("repos: [widgets]\n").starts_with("repos[0]:"));
    assert!(err("repos: [a/b, \"https://github.com/a/b\"]\n").starts_with("repos[1]:"));
    assert!(err("repos: [a/*]\n").starts_with("repos[0]:"));
    assert!(err("repos: [a/..]\n").starts_with("repos[0]:"));
    assert!(err("repos: [a/b]\npush: { refs: [] }\n").starts_with("push.refs:"));
    assert!(err("repos: [a/b]\npush: { refs: [heads/x] }\n").starts_with("push.refs[0]:"));
    assert!(err("repos: [a/b]\nfetch: false\n").contains("allow nothing"));
    assert!(serde_yaml_ng::from_str::<RawGitRule>("repos: [a/b]\nclone: true\n").is_err());
    assert!(serde_yaml_ng::from_str::<RawGitRule>(
        "repos: [a/b]\npush: { refs: [], force: true }\n"
    )
    .is_err());

    let r = agent_rule();
    assert_eq!(
        r.repos().collect::<Vec<_>>(),
        ["acme/tools", "acme/widgets"]
    );
    assert!(r.allows_fetch() && r.allows_push());
    let fetch_only = rule("repos: [a/b]\n");
    assert!(fetch_only.allows_fetch() && !fetch_only.allows_push());
}

#[test]
fn only_smart_http_requests_of_listed_repos_pass() {
    let r = agent_rule();
    let ok = |method: &str, path: &str, query: Option<&str>| {
        r.check_request(method, path, query).unwrap()
    };
    let refused = |method: &str, path: &str, query: Option<&str>| {
        r.check_request(method, path, query).unwrap_err()
    };

    let g = ok(
        "GET",
        "/acme/widgets.git/info/refs",
        Some("service=git-upload-pack"),
    );
    assert_eq!(
        g,
        GitRequest {
            repo: "acme/widgets".to_owned(),
            service: Service::UploadPack,
            advertisement: true,
            target: "/acme/widgets.git/info/refs?service=git-upload-pack".to_owned(),
        }
    );
    // Spelled otherwise, it is another repository to a case-sensitive origin; and
    // `.git` goes only once.
    for path in ["/Acme/Widgets.git/info/refs", "/ACME/WIDGETS/info/refs"] {
        let e = r
            .check_request("GET", path, Some("service=git-upload-pack"))
            .unwrap_err();
        assert!(
            e.reason.contains("not allowed") && e.reason.contains("did you mean acme/widgets?"),
            "{}",
            e.reason
        );
    }
    for path in [
        "/acme/widgets.git.git/git-upload-pack",
        "/acme/tools.git.git/git-upload-pack",
        "/acme/widgets.git/.git/git-upload-pack",
        "/acme/widgets/.git/git-upload-pack",
    ] {
        assert!(r.check_request("POST", path, None).is_err(), "{path}");
    }
    // An empty query on a POST is not forwarded.
    assert_eq!(
        ok("POST", "/acme/tools/git-upload-pack", Some("")).target,
        "/acme/tools/git-upload-pack"
    );
    assert!(!g.is_push());
    let g = ok("POST", "/acme/widgets/git-upload-pack", None);
    assert_eq!(g.repo, "acme/widgets");
    assert_eq!(g.target, "/acme/widgets/git-upload-pack");
    assert_eq!(g.service.as_str(), "git-upload-pack");
    assert!(ok("POST", "/acme/tools/git-receive-pack", None).is_push());
    assert!(!ok(
        "GET",
        "/acme/tools/info/refs",
        Some("service=git-receive-pack")
    )
    .is_push());

    // Not git at all, or the dumb protocol: no repository in the record.
    for (method, path, query) in [
        ("GET", "/acme/widgets", None),
        ("GET", "/acme/widgets/info/refs", None),
        (
            "GET",
            "/acme/widgets/info/refs",
            Some("service=git-upload-archive"),
        ),
        (
            "GET",
            "/acme/widgets/info/refs",
            Some("service=git-upload-pack&x=1"),
        ),
        ("GET", "/acme/widgets.git/HEAD", None),
        ("GET", "/acme/widgets.git/objects/info/packs", None),
        ("POST", "/acme/widgets.git/info/lfs/objects/batch", None),
        ("GET", "/api/v3/repos/acme/widgets", None),
        ("POST", "/acme/widgets/git-upload-pack/", None),
        ("POST", "//acme/widgets/git-upload-pack", None),
        ("POST", "/acme/wid%67ets/git-upload-pack", None),
        ("POST", "/acme/../git-upload-pack", None),
    ] {
        let e = refused(method, path, query);
        assert_eq!(e.request, None, "{path}");
        assert!(e.reason.starts_with("git: "), "{}", e.reason);
    }
    let e = refused("GET", "/acme/widgets/info/refs", None);
    assert!(e.reason.contains("dumb HTTP"), "{}", e.reason);

    // Recognised, but refused: the record names the repository.
    let e = refused("POST", "/acme/other/git-upload-pack", None);
    assert_eq!(e.request.unwrap().repo, "acme/other");
    assert!(
        e.reason.contains("acme/other is not allowed"),
        "{}",
        e.reason
    );
    let e = refused("GET", "/acme/widgets/git-upload-pack", None);
    assert!(e.reason.contains("must be POST"), "{}", e.reason);
    let e = refused("POST", "/acme/widgets/git-receive-pack", Some("x=1"));
    assert!(e.reason.contains("query"), "{}", e.reason);

    let fetch_only = rule("repos: [a/b]\n");
    let e = fetch_only
        .check_request("GET", "/a/b/info/refs", Some("service=git-receive-pack"))
        .unwrap_err();
    assert_eq!(e.reason, "git: pushing to a/b is not allowed");
    assert_eq!(e.request.unwrap().service, Service::ReceivePack);
    let push_only = rule("repos: [a/b]\nfetch: false\npush: { refs: [\"refs/**\"] }\n");
    let e = push_only
        .check_request("POST", "/a/b.git/git-upload-pack", None)
        .unwrap_err();
    assert_eq!(e.reason, "git: fetching from a/b is not allowed");
}

#[test]
fn ref_updates_are_judged() {
    let r = agent_rule();
    assert_eq!(r.check_update(&command(A, B, "refs/heads/agent/x")), Ok(()));
    assert_eq!(
        r.check_update(&command(Z, B, "refs/heads/agent/a/b")),
        Ok(())
    );
    assert_eq!(
        r.check_update(&command(A, B, "refs/heads/main")),
        Err("refused by egress policy: allowed refs/heads/agent/**".to_owned())
    );
    assert_eq!(
        r.check_update(&command(A, Z, "refs/heads/agent/x")),
        Err("refused by egress policy: deleting refs is not allowed".to_owned())
    );
    assert!(r
        .check_update(&command(A, B, "refs/heads/agent/x.lock"))
        .unwrap_err()
        .contains("invalid ref name"));
    assert!(r
        .check_update(&command(A, B, "refs/heads/agent/../../main"))
        .unwrap_err()
        .contains("invalid ref name"));

    // Gerrit's `%` options in a magic ref are push options: judged as `-o` ones.
    let gerrit = rule("repos: [a/b]\npush: { refs: [\"refs/for/*\"] }\n");
    assert_eq!(gerrit.check_update(&command(Z, B, "refs/for/main")), Ok(()));
    for name in ["refs/for/main%submit", "refs/for/main%topic=x,submit"] {
        let refused = gerrit.check_update(&command(Z, B, name)).unwrap_err();
        assert!(refused.contains("push option"), "{name}: {refused}");
    }
    let topics = rule("repos: [a/b]\npush: { refs: [\"refs/for/*\"], options: [\"topic=*\"] }\n");
    assert_eq!(
        topics.check_update(&command(Z, B, "refs/for/main%topic=x")),
        Ok(())
    );
    assert!(topics
        .check_update(&command(Z, B, "refs/for/main%topic=x,submit"))
        .is_err());
    // A tag in another case is a tag (a case-insensitive ref store).
    let any = rule("repos: [a/b]\npush: { refs: [\"refs/**\"] }\n");
    assert_eq!(
        any.check_update(&command(Z, B, "refs/TAGS/v1")),
        Err("refused by egress policy: tags are not allowed".to_owned())
    );
    // And in Unicode's case folding (long s), which APFS and NTFS apply.
    assert_eq!(
        any.check_update(&command(Z, B, "refs/tag\u{17f}/v1")),
        Err("refused by egress policy: tags are not allowed".to_owned())
    );
    assert_eq!(any.check_update(&command(Z, B, "refs/tagset/v1")), Ok(()));

    // Tags: only with `tags: true`, and still only those `refs` matches.
    let tags = rule(
        "repos: [a/b]\npush: { refs: [\"refs/heads/agent/**\", \"refs/tags/agent-*\"], delete: true }\n",
    );
    assert_eq!(
        tags.check_update(&command(Z, B, "refs/tags/agent-1")),
        Err("refused by egress policy: tags are not allowed".to_owned())
    );
    assert_eq!(
        tags.check_update(&command(A, Z, "refs/tags/agent-1")),
        Err("refused by egress policy: tags are not allowed".to_owned())
    );
    let tags = rule(
        "repos: [a/b]\npush: { refs: [\"refs/heads/agent/**\", \"refs/tags/agent-*\"], delete: true, tags: true }\n",
    );
    assert_eq!(
        tags.check_update(&command(Z, B, "refs/tags/agent-1")),
        Ok(())
    );
    assert_eq!(
        tags.check_update(&command(A, Z, "refs/heads/agent/x")),
        Ok(())
    );
    assert_eq!(
        tags.check_update(&command(Z, B, "refs/tags/v1")),
        Err("refused by egress policy: allowed refs/heads/agent/**, refs/tags/agent-*".to_owned())
    );
    let everything = rule("repos: [a/b]\npush: { refs: [\"refs/**\"] }\n");
    assert!(everything
        .check_update(&command(Z, B, "refs/tags/v1"))
        .is_err());
}

#[test]
fn a_push_is_all_or_nothing() {
    let r = agent_rule();
    let list = CommandList {
        commands: vec![
            command(A, B, "refs/heads/main"),
            command(Z, B, "refs/heads/agent/x"),
        ],
        capabilities: vec!["report-status".to_owned()],
        options: Vec::new(),
        len: 0,
    };
    let j = r.judge_push(&list);
    assert_eq!(
        j.results,
        [
            Err("refused by egress policy: allowed refs/heads/agent/**".to_owned()),
            Err("not pushed: another ref was refused".to_owned()),
        ]
    );
    assert_eq!(j.allowed, [false, true]);
    assert_eq!(
        j.refused.as_deref(),
        Some(
            "git push refused: 1 of 2 ref updates refused; refs/heads/main: refused by egress \
             policy: allowed refs/heads/agent/**"
        )
    );
    let ok = CommandList {
        commands: vec![command(Z, B, "refs/heads/agent/x")],
        ..list
    };
    let j = r.judge_push(&ok);
    assert_eq!(j.results, [Ok(())]);
    assert_eq!(j.refused, None);
}

// ---------------------------------------------------------------------------------------
// End to end with git
// ---------------------------------------------------------------------------------------
