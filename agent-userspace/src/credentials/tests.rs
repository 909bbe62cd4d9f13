use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::HeaderName;

use super::*;

fn store(yaml: &str) -> Result<CredentialStore, CredentialError> {
    let raw: RawCredentials = serde_yaml_ng::from_str(yaml).unwrap();
    CredentialStore::from_config(&raw)
}

fn write(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.display().to_string()
}

async fn value(store: &CredentialStore, name: &str, host: &str) -> Option<String> {
    store
        .header_for(name, host)
        .await
        .unwrap()
        .map(|(_, v)| v.to_str().unwrap().to_owned())
}

/// Long enough for a `file` source's next check to be due.
const AFTER_CHECK: Duration = Duration::from_millis(1100);

#[tokio::test]
async fn file_source_rotation_takes_effect_within_a_second_and_one_newline_trimmed() {
    assert_eq!(FILE_CHECK_INTERVAL, Duration::from_secs(1));
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "token", "ghp-one\n");
    let s = store(&format!(
        "github:\n  source: {{ file: {path} }}\n  inject: {{ header: Authorization, format: \"Bearer {{}}\" }}\n  hosts: [api.github.com, github.com]\n"
    ))
    .unwrap();
    let (name, v) = s
        .header_for("github", "api.github.com")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(name, AUTHORIZATION);
    assert_eq!(v.to_str().unwrap(), "Bearer ghp-one");
    assert!(v.is_sensitive());

    // Rotation takes effect within the check interval; only one trailing newline goes.
    std::fs::write(&path, "ghp-two\r\n").unwrap();
    tokio::time::sleep(AFTER_CHECK).await;
    assert_eq!(
        value(&s, "github", "github.com").await.as_deref(),
        Some("Bearer ghp-two")
    );
    std::fs::write(&path, "ghp-three\n\n").unwrap();
    tokio::time::sleep(AFTER_CHECK).await;
    assert!(matches!(
        s.header_for("github", "github.com").await,
        Err(CredentialError::InvalidValue { .. })
    ));
    // A fixed file is used at the next request: failures are not cached.
    std::fs::write(&path, "ghp-four").unwrap();
    let (_, v) = s.header_for("github", "github.com").await.unwrap().unwrap();
    assert_eq!(v.to_str().unwrap(), "Bearer ghp-four");
    assert!(v.is_sensitive());
}

#[tokio::test]
async fn file_source_is_served_from_memory_between_checks() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "token", "tok-aaaa\n");
    let mut s = store(&format!(
        "c:\n  source: {{ file: {path} }}\n  inject: {{ header: X-Token }}\n  hosts: [h.example.com]\n"
    ))
    .unwrap();
    s.set_file_check_interval(Duration::from_millis(300));
    assert_eq!(
        value(&s, "c", "h.example.com").await.as_deref(),
        Some("tok-aaaa")
    );
    // Within the interval the file is not looked at: neither a rewrite nor a removal shows.
    std::fs::write(&path, "tok-bbbb\n").unwrap();
    assert_eq!(
        value(&s, "c", "h.example.com").await.as_deref(),
        Some("tok-aaaa")
    );
    // The rewrite kept the size and most likely the timestamps of the first version; the
    // file is read again anyway because it had changed just before the first read.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        value(&s, "c", "h.example.com").await.as_deref(),
        Some("tok-bbbb")
    );
    // Renamed over (a new inode), then removed.
    let next = write(dir.path(), "token.new", "tok-cccc");
    std::fs::rename(&next, &path).unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        value(&s, "c", "h.example.com").await.as_deref(),
        Some("tok-cccc")
    );
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        value(&s, "c", "h.example.com").await.as_deref(),
        Some("tok-cccc")
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    let err = s.header_for("c", "h.example.com").await.unwrap_err();
    assert!(matches!(err, CredentialError::Read { .. }), "{err}");
    assert!(!err.to_string().contains("tok-"), "{err}");
}

#[tokio::test]
async fn file_source_unchanged_file_is_checked_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "token", "tok-1\n");
    let mut s = store(&format!(
        "c:\n  source: {{ file: {path} }}\n  inject: {{ basic: {{ user: u }} }}\n  hosts: [h.example.com]\n"
    ))
    .unwrap();
    s.set_file_check_interval(Duration::from_millis(50));
    let first = value(&s, "c", "h.example.com").await;
    assert_eq!(first.as_deref(), Some("Basic dTp0b2stMQ=="));
    assert_eq!(s.file_counts("c"), Some((1, 1)));
    // Many requests within the interval: no check at all.
    for _ in 0..100 {
        assert_eq!(value(&s, "c", "h.example.com").await, first);
    }
    assert_eq!(s.file_counts("c"), Some((1, 1)));
    // A file changed just before it was read is read again at the next check; once it
    // has been left alone for a while, a check is a stat only.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(value(&s, "c", "h.example.com").await, first);
    assert_eq!(s.file_counts("c"), Some((2, 2)));
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        // Concurrent callers share one check.
        let (a, b, c) = tokio::join!(
            value(&s, "c", "h.example.com"),
            value(&s, "c", "h.example.com"),
            value(&s, "c", "h.example.com"),
        );
        assert_eq!((&a, &b), (&first, &first));
        assert_eq!(c, first);
    }
    assert_eq!(s.file_counts("c"), Some((5, 2)));
}

#[tokio::test]
async fn env_source_is_read_at_load() {
    // A variable every test process has, so no environment needs changing.
    let var = "CARGO_PKG_NAME";
    let expected = std::env::var(var).unwrap();
    let s = store(&format!(
        "pkg:\n  source: {{ env: {var} }}\n  inject: {{ header: X-Api-Key }}\n  hosts: [api.example.com]\n"
    ))
    .unwrap();
    let (name, v) = s
        .header_for("pkg", "API.Example.com.")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(name, HeaderName::from_static("x-api-key"));
    assert_eq!(v.to_str().unwrap(), expected);

    let missing = store(
        "x:\n  source: { env: EGRESSD_TEST_SURELY_UNSET_VARIABLE }\n  inject: { header: X-Key }\n  hosts: [a.example.com]\n",
    )
    .unwrap_err();
    assert!(matches!(missing, CredentialError::EnvMissing { .. }));
}

#[tokio::test]
async fn basic_injection_encodes_user_and_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "pw", "s3cret");
    let s = store(&format!(
        "gh:\n  source: {{ file: {path} }}\n  inject: {{ basic: {{ user: x-access-token }} }}\n  hosts: [github.com]\n"
    ))
    .unwrap();
    // base64("x-access-token:s3cret")
    assert_eq!(
        value(&s, "gh", "github.com").await.as_deref(),
        Some("Basic eC1hY2Nlc3MtdG9rZW46czNjcmV0")
    );
    assert_eq!(s.injected_header_names(), vec![AUTHORIZATION]);
}

#[tokio::test]
async fn command_source_runs_without_shell_and_trims_output() {
    let s = store(
        "c:\n  source: { command: { argv: [/bin/echo, \"  tok-en  \"], ttl: 60 } }\n  inject: { header: Authorization, format: \"token {}\" }\n  hosts: [h.example.com]\n",
    )
    .unwrap();
    assert_eq!(
        value(&s, "c", "h.example.com").await.as_deref(),
        Some("token tok-en")
    );

    let relative = store(
        "c:\n  source: { command: { argv: [echo, x] } }\n  inject: { header: X-K }\n  hosts: [h.example.com]\n",
    )
    .unwrap_err();
    assert!(relative.to_string().contains("absolute path"), "{relative}");
}

/// A command that increments a counter in a file and prints it.
fn counter_yaml(dir: &Path, ttl: u64, extra: &str) -> String {
    let counter = write(dir, "counter", "0");
    let script =
        format!("{extra} n=$(cat {counter}); n=$((n+1)); echo $n > {counter}; echo tok-$n");
    let script = script.replace('"', "\\\"");
    format!(
        "c:\n  source: {{ command: {{ argv: [/bin/sh, -c, \"{script}\"], ttl: {ttl} }} }}\n  inject: {{ header: X-Token }}\n  hosts: [h.example.com]\n"
    )
}

#[tokio::test]
async fn command_value_is_cached_for_ttl_then_refreshed() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&counter_yaml(dir.path(), 1, "")).unwrap();
    assert_eq!(
        value(&s, "c", "h.example.com").await.as_deref(),
        Some("tok-1")
    );
    assert_eq!(
        value(&s, "c", "h.example.com").await.as_deref(),
        Some("tok-1")
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        value(&s, "c", "h.example.com").await.as_deref(),
        Some("tok-2")
    );
    assert_eq!(
        value(&s, "c", "h.example.com").await.as_deref(),
        Some("tok-2")
    );
}

/// A value that cannot be read at start is named (the daemon warns and tries again), and
/// matched once a later read ahead gets it, before any request used it.
#[tokio::test]
async fn a_value_not_read_at_start_is_named_and_read_later() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("late");
    let s = store(&format!(
        "c:\n  source: {{ file: {} }}\n  inject: {{ header: X-K }}\n  hosts: [h.example.com]\n",
        path.display()
    ))
    .unwrap();
    let (read, unread) = s.prime().await;
    assert_eq!(read, 0);
    let [(name, why)] = unread.as_slice() else {
        unreachable!("{unread:?}")
    };
    assert_eq!(name, "c");
    // Why, with the path: a mistyped one is seen in the warning and in `egressctl
    // credentials`, not only at the first request.
    assert!(why.contains(&path.display().to_string()), "{why}");
    assert!(why.contains("No such file"), "{why}");
    let state = |s: &CredentialStore| s.states().into_iter().find(|c| c.name == "c").unwrap();
    assert_eq!(state(&s).last_error.as_deref(), Some(why.as_str()));
    std::fs::write(&path, "late-file-secret-value\n").unwrap();
    assert!(s.matcher().find(b"x late-file-secret-value x").is_none());
    assert!(s.read_ahead_unbounded("nope").await.is_err());
    s.read_ahead_unbounded("c").await.unwrap();
    assert_eq!(s.matcher().find(b"x late-file-secret-value x"), Some("c"));
    assert_eq!(state(&s).last_error, None);
}

/// A command's value is read ahead with the files (so that a value a previous run
/// injected is scrubbed before any request uses it), run once, and served from that run
/// within its `ttl`.
#[tokio::test]
async fn command_values_are_read_ahead_once() {
    let dir = tempfile::tempdir().unwrap();
    let yaml =
        counter_yaml(dir.path(), 60, "").replace("echo tok-$n", "echo primed-command-value-$n");
    let s = store(&yaml).unwrap();
    let found = |s: &CredentialStore| {
        s.matcher()
            .find(b"echoed: primed-command-value-1")
            .map(str::to_owned)
    };
    assert_eq!(found(&s), None);
    assert_eq!(s.prime().await, (1, Vec::new()));
    assert_eq!(found(&s).as_deref(), Some("c"));
    assert_eq!(
        value(&s, "c", "h.example.com").await.as_deref(),
        Some("primed-command-value-1")
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("counter"))
            .unwrap()
            .trim(),
        "1",
        "the command ran once"
    );
}

#[tokio::test]
async fn concurrent_callers_share_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&counter_yaml(dir.path(), 60, "sleep 0.3;")).unwrap();
    let (a, b, c) = tokio::join!(
        value(&s, "c", "h.example.com"),
        value(&s, "c", "h.example.com"),
        value(&s, "c", "h.example.com"),
    );
    assert_eq!(a.as_deref(), Some("tok-1"));
    assert_eq!(b, a);
    assert_eq!(c, a);
}

#[tokio::test]
async fn command_failures_are_errors() {
    let s = store(
        "c:\n  source: { command: { argv: [/bin/sh, -c, \"echo leaked-value; exit 3\"] } }\n  inject: { header: X-K }\n  hosts: [h.example.com]\n",
    )
    .unwrap();
    let err = s.header_for("c", "h.example.com").await.unwrap_err();
    assert!(matches!(err, CredentialError::Command { .. }));
    assert!(!err.to_string().contains("leaked-value"), "{err}");

    let mut s = store(
        "c:\n  source: { command: { argv: [/bin/sleep, \"5\"] } }\n  inject: { header: X-K }\n  hosts: [h.example.com]\n",
    )
    .unwrap();
    s.set_command_timeout(Duration::from_millis(200));
    let started = std::time::Instant::now();
    let err = s.header_for("c", "h.example.com").await.unwrap_err();
    assert!(err.to_string().contains("did not finish"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn values_with_cr_lf_or_nul_are_refused_without_showing_them() {
    let dir = tempfile::tempdir().unwrap();
    for (i, bad) in ["abc\r\nX-Evil: 1", "abc\ndef", "abc\0def", "abc\rdef"]
        .iter()
        .enumerate()
    {
        let path = write(dir.path(), &format!("t{i}"), bad);
        let s = store(&format!(
            "c:\n  source: {{ file: {path} }}\n  inject: {{ header: Authorization, format: \"Bearer {{}}\" }}\n  hosts: [h.example.com]\n"
        ))
        .unwrap();
        let err = s.header_for("c", "h.example.com").await.unwrap_err();
        assert!(matches!(err, CredentialError::InvalidValue { .. }), "{err}");
        let text = format!("{err} {err:?}");
        assert!(!text.contains("abc"), "{text}");
    }

    let s = store(
        "c:\n  source: { command: { argv: [/usr/bin/printf, \"ab%bcd\", \"\\\\r\\\\n\"] } }\n  inject: { header: X-K }\n  hosts: [h.example.com]\n",
    )
    .unwrap();
    let err = s.header_for("c", "h.example.com").await.unwrap_err();
    assert!(matches!(err, CredentialError::InvalidValue { .. }), "{err}");
}

#[tokio::test]
async fn credential_goes_only_to_its_hosts() {
    let dir = tempfile::tempdir().unwrap();
    // A file that does not exist: a host outside `hosts` must not even read it.
    let path = dir.path().join("missing").display().to_string();
    let s = store(&format!(
        "gh:\n  source: {{ file: {path} }}\n  inject: {{ header: Authorization }}\n  hosts: [API.GitHub.com.]\n"
    ))
    .unwrap();
    assert!(s
        .header_for("gh", "evil.example.com")
        .await
        .unwrap()
        .is_none());
    assert!(s.header_for("gh", "github.com").await.unwrap().is_none());
    assert!(s
        .header_for("gh", "api.github.com.evil.example")
        .await
        .unwrap()
        .is_none());
    assert!(matches!(
        s.header_for("gh", "api.github.com").await,
        Err(CredentialError::Read { .. })
    ));
    assert!(matches!(
        s.header_for("nope", "api.github.com").await,
        Err(CredentialError::Unknown(_))
    ));
}

#[test]
fn secret_debug_and_display_are_redacted() {
    let secret = Secret::new("hunter2".to_owned());
    assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
    assert_eq!(format!("{secret}"), "Secret(<redacted>)");
    assert_eq!(secret.expose(), "hunter2");

    let s = store(
        "pkg:\n  source: { env: CARGO_PKG_NAME }\n  inject: { header: X-Api-Key }\n  hosts: [api.example.com]\n",
    )
    .unwrap();
    let debug = format!("{s:?}");
    assert!(debug.contains("Secret(<redacted>)"), "{debug}");
    assert!(
        !debug.contains(&std::env::var("CARGO_PKG_NAME").unwrap()),
        "{debug}"
    );
}

#[test]
fn bad_definitions_are_rejected_with_field_names() {
    let cases = [
        ("c:\n  source: { file: relative/path }\n  inject: { header: X-K }\n  hosts: [a.example.com]\n", "source.file"),
        ("c:\n  source: { file: /x }\n  inject: { header: X-K }\n  hosts: []\n", "hosts"),
        ("c:\n  source: { file: /x }\n  inject: { header: X-K }\n  hosts: [\"*.example.com\"]\n", "hosts"),
        ("c:\n  source: { file: /x }\n  inject: { header: X-K, format: \"no placeholder\" }\n  hosts: [a.example.com]\n", "inject.format"),
        ("c:\n  source: { file: /x }\n  inject: { header: X-K, format: \"{} {}\" }\n  hosts: [a.example.com]\n", "inject.format"),
        ("c:\n  source: { file: /x }\n  inject: { header: Host }\n  hosts: [a.example.com]\n", "inject.header"),
        ("c:\n  source: { file: /x }\n  inject: { basic: { user: \"a:b\" } }\n  hosts: [a.example.com]\n", "inject.basic.user"),
        ("c:\n  source: { file: /x }\n  inject: {}\n  hosts: [a.example.com]\n", "inject"),
        ("c:\n  source: { command: { argv: [] } }\n  inject: { header: X-K }\n  hosts: [a.example.com]\n", "source.command.argv"),
    ];
    for (yaml, field) in cases {
        let err = store(yaml).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("credentials.c.{field}")),
            "{yaml}: {err}"
        );
    }
    let unknown: Result<BTreeMap<String, RawCredential>, _> = serde_yaml_ng::from_str(
        "c:\n  source: { file: /x }\n  inject: { header: X-K }\n  hosts: [a.example.com]\n  extra: 1\n",
    );
    assert!(unknown.is_err());
}

#[tokio::test]
async fn stats_count_fetches_and_failures_and_show_time_left() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&counter_yaml(dir.path(), 60, "")).unwrap();
    let before = s.stats();
    assert_eq!(before.len(), 1);
    assert_eq!(
        (before[0].source, before[0].fetches, before[0].failures),
        ("command", 0, 0)
    );
    assert_eq!(before[0].expires_in, None, "nothing fetched yet");
    value(&s, "c", "h.example.com").await;
    value(&s, "c", "h.example.com").await; // cached: no second run
    let after = s.stats();
    assert_eq!((after[0].fetches, after[0].failures), (1, 0));
    let left = after[0].expires_in.unwrap();
    assert!(
        left <= Duration::from_secs(60) && left > Duration::from_secs(55),
        "{left:?}"
    );

    let failing = store(
        "c:\n  source: { command: { argv: [/bin/sh, -c, \"exit 3\"] } }\n  inject: { header: X-K }\n  hosts: [h.example.com]\n",
    )
    .unwrap();
    assert!(failing.header_for("c", "h.example.com").await.is_err());
    let st = failing.stats();
    assert_eq!(
        (st[0].fetches, st[0].failures, st[0].expires_in),
        (0, 1, None)
    );
}

/// A value revoked at a quarantine is never sent again while the source still gives it
/// (a file not rewritten, a variable, a KV secret not rotated): its use is refused, with
/// a reason, until the source gives a new one.
#[tokio::test]
async fn a_revoked_value_is_not_sent_again_until_the_source_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "t", "tok-before-revoke\n");
    let s = store(&format!(
        "c:\n  source: {{ file: {} }}\n  inject: {{ header: X-K }}\n  hosts: [h.example.com]\n  revoke: {{ argv: [/bin/sh, -c, \"cat > /dev/null\"] }}\n",
        path
    ))
    .unwrap();
    assert_eq!(
        value(&s, "c", "h.example.com").await.as_deref(),
        Some("tok-before-revoke")
    );
    s.revoke("c").await.unwrap();
    let refused = s
        .header_for("c", "h.example.com")
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("revoked"), "{refused}");
    assert!(!refused.contains("tok-before"), "{refused}");
    assert!(s.value_for("c", "h.example.com").await.is_err());
    // A new value is used once the file is read again...
    std::fs::write(&path, "tok-after-revoke\n").unwrap();
    tokio::time::sleep(AFTER_CHECK).await;
    assert_eq!(
        value(&s, "c", "h.example.com").await.as_deref(),
        Some("tok-after-revoke")
    );
    // ...and the revoked one never again, even given back (a restored backup).
    std::fs::write(&path, "tok-before-revoke\n").unwrap();
    tokio::time::sleep(AFTER_CHECK).await;
    assert!(s.header_for("c", "h.example.com").await.is_err());
}

#[tokio::test]
async fn revoke_command_gets_the_live_value_on_stdin_only() {
    let dir = tempfile::tempdir().unwrap();
    let got = dir.path().join("revoked");
    let args = dir.path().join("args");
    // Writes its stdin, its arguments and its environment where the test can read them,
    // and prints the value (which must not end up anywhere).
    let script = write(
        dir.path(),
        "revoke.sh",
        &format!(
            "#!/bin/sh\ncat > '{got}'\necho \"$@\" > '{args}'\nenv >> '{args}'\ncat '{got}'\ncat '{got}' >&2\n",
            got = got.display(),
            args = args.display()
        ),
    );
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let s = store(&format!(
        "c:\n  source: {{ command: {{ argv: [/bin/echo, tok-live-1], ttl: 60 }} }}\n  inject: {{ header: X-K }}\n  hosts: [h.example.com]\n  revoke: {{ argv: [\"{script}\", --why, quarantine] }}\n"
    ))
    .unwrap();
    assert!(s.can_revoke("c"));
    // No value held yet: the command is not run.
    assert!(s.revoke("c").await.unwrap().contains("no live value"));
    assert!(!got.exists());
    assert_eq!(
        value(&s, "c", "h.example.com").await.as_deref(),
        Some("tok-live-1")
    );
    let how = s.revoke("c").await.unwrap();
    assert!(
        how.contains("succeeded") && !how.contains("tok-live"),
        "{how}"
    );
    assert_eq!(std::fs::read_to_string(&got).unwrap(), "tok-live-1\n");
    let seen = std::fs::read_to_string(&args).unwrap();
    assert!(seen.starts_with("--why quarantine\n"), "{seen}");
    assert!(
        !seen.contains("tok-live"),
        "the value reached argv or env: {seen}"
    );
    // The held value was dropped: the next use runs the source again.
    std::fs::remove_file(&got).unwrap();
    assert!(s.revoke("c").await.unwrap().contains("no live value"));
    assert!(!got.exists());

    // A failing command is an error naming the program and status, never the value.
    let s = store(
        "c:\n  source: { env: PATH }\n  inject: { header: X-K }\n  hosts: [h.example.com]\n  revoke: { argv: [/bin/sh, -c, \"cat; exit 4\"] }\n",
    )
    .unwrap();
    let err = s.revoke("c").await.unwrap_err();
    assert!(err.contains("/bin/sh") && err.contains("4"), "{err}");
    // A credential without a revocation cannot be revoked; a relative program is refused.
    let s =
        store("c:\n  source: { env: PATH }\n  inject: { header: X-K }\n  hosts: [h.example.com]\n")
            .unwrap();
    assert!(!s.can_revoke("c"));
    let err = store("c:\n  source: { env: PATH }\n  inject: { header: X-K }\n  hosts: [h.example.com]\n  revoke: { argv: [revoke] }\n").unwrap_err();
    assert!(err.to_string().contains("revoke.argv"), "{err}");
}

#[tokio::test]
async fn the_matcher_follows_every_value_and_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "token", "file-secret-one\n");
    // SAFETY: this variable is set once, by this test only.
    unsafe { std::env::set_var("EGRESS_MATCHER_TEST_TOKEN", "env-secret-value") };
    let mut s = store(&format!(
        "github:\n  source: {{ file: {path} }}\n  inject: {{ header: Authorization, format: \"Bearer {{}}\" }}\n  hosts: [api.github.com]\n\
         git:\n  source: {{ env: EGRESS_MATCHER_TEST_TOKEN }}\n  inject: {{ basic: {{ user: x-access-token }} }}\n  hosts: [github.com]\n"
    ))
    .unwrap();
    s.set_file_check_interval(Duration::from_millis(50));
    let found =
        |s: &CredentialStore, text: &str| s.matcher().find(text.as_bytes()).map(str::to_owned);
    // Environment values are known at load, files once read.
    assert_eq!(found(&s, "x env-secret-value x").as_deref(), Some("git"));
    assert_eq!(found(&s, "file-secret-one"), None);
    s.prime().await;
    assert_eq!(
        found(&s, "Bearer file-secret-one").as_deref(),
        Some("github")
    );
    assert!(!format!("{:?}", s.matcher()).contains("secret-one"));

    // A rotation is matched as soon as the new value is used; the previous values stay
    // matched (they may still be valid at their issuer).
    write(dir.path(), "token", "file-secret-two\n");
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(
        value(&s, "github", "api.github.com").await.as_deref(),
        Some("Bearer file-secret-two")
    );
    assert_eq!(found(&s, "file-secret-two").as_deref(), Some("github"));
    assert_eq!(found(&s, "file-secret-one").as_deref(), Some("github"));
    write(dir.path(), "token", "file-secret-three\n");
    tokio::time::sleep(Duration::from_millis(120)).await;
    value(&s, "github", "api.github.com").await;
    assert_eq!(found(&s, "file-secret-three").as_deref(), Some("github"));
    assert_eq!(found(&s, "file-secret-one").as_deref(), Some("github"));
    assert_eq!(found(&s, "file-secret-two").as_deref(), Some("github"));
}

#[tokio::test]
async fn aws_credentials_pair_sts_with_sigv4_and_fail_closed() {
    let sts = |extra: &str, inject: &str| {
        store(&format!(
            "aws:\n  source: {{ sts_assume_role: {{ role_arn: \"arn:aws:iam::123456789012:role/agent\", endpoint: \"http://127.0.0.1:9\"{extra} }} }}\n  inject: {inject}\n  hosts: [acme-data.s3.amazonaws.com]\n"
        ))
    };
    let sigv4 = "{ aws_sigv4: { service: s3, region: us-east-1 } }";
    let s = sts("", sigv4).unwrap();
    assert_eq!(s.aws_signing("aws"), Some(("s3", "us-east-1")));
    assert_eq!(s.injected_header_names(), [AUTHORIZATION]);
    // Another host: no session, nothing fetched.
    assert!(s
        .aws_session("aws", "sb", "evil.example")
        .await
        .unwrap()
        .is_none());
    // No key in the environment, nothing listening: refused, the credential named.
    let err = s
        .aws_session("aws", "sb", "acme-data.s3.amazonaws.com")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("credential `aws`") && err.contains("AWS"),
        "{err}"
    );
    // Never as a header.
    assert!(s
        .header_for("aws", "acme-data.s3.amazonaws.com")
        .await
        .is_err());

    for (extra, inject, field) in [
        ("", "{ header: Authorization }", "inject"),
        (", duration: 60", sigv4, "duration"),
        (", session_name: fixed", sigv4, "session_name"),
        (", session_policy: 'not json'", sigv4, "session_policy"),
        (
            ", credentials_file: relative/path",
            sigv4,
            "credentials_file",
        ),
        (", endpoint2: x", sigv4, ""),
        (
            "",
            "{ aws_sigv4: { service: dynamodb, region: us-east-1 } }",
            "only `s3`",
        ),
        (
            "",
            "{ aws_sigv4: { service: s3, region: us-east-1 }, query: { param: k } }",
            "one injection form",
        ),
        (
            "",
            "{ aws_sigv4: { service: s3, region: us-east-1 }, placeholder: {} }",
            "one injection form",
        ),
        (
            "",
            "{ aws_sigv4: { service: s3, region: us-east-1 }, header: X-Key }",
            "one injection form",
        ),
    ] {
        let raw: Result<RawCredentials, _> = serde_yaml_ng::from_str(&format!(
            "aws:\n  source: {{ sts_assume_role: {{ role_arn: \"arn:aws:iam::1:role/a\"{extra} }} }}\n  inject: {inject}\n  hosts: [s3.amazonaws.com]\n"
        ));
        match raw {
            Err(_) => assert!(field.is_empty(), "{extra}: unexpected parse error"),
            Ok(raw) => {
                let err = CredentialStore::from_config(&raw).unwrap_err().to_string();
                assert!(err.contains(field), "{extra} {inject}: {err}");
            }
        }
    }
    // A `revoke` command on STS sessions would never run: not kept (a warning says so),
    // so quarantine cannot claim it ran.
    let raw: RawCredentials = serde_yaml_ng::from_str(
        "aws:\n  source: { sts_assume_role: { role_arn: \"arn:aws:iam::1:role/a\" } }\n  inject: { aws_sigv4: { service: s3, region: us-east-1 } }\n  hosts: [s3.amazonaws.com]\n  revoke: { argv: [/bin/true] }\n",
    )
    .unwrap();
    let sts = CredentialStore::from_config(&raw).unwrap();
    assert!(!sts.can_revoke("aws"));
    // aws_sigv4 needs an STS source.
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "t", "token-value-123\n");
    let err = store(&format!(
        "x:\n  source: {{ file: {path} }}\n  inject: {sigv4}\n  hosts: [s3.amazonaws.com]\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("sts_assume_role"), "{err}");
}

/// A sandbox's STS session values (a slot of the credential) go once none was used for
/// twelve hours (the longest a session lasts): a detached sandbox's do not stay matched
/// for ever. A credential's own values are kept as before.
#[test]
fn idle_session_slots_are_forgotten() {
    use std::time::{Duration, Instant};
    let start = Instant::now();
    let at = |secs: u64| start + Duration::from_secs(secs);
    let mut values: std::collections::BTreeMap<String, Vec<(u8, Instant)>> = [
        (
            "aws\0gone\0secret".to_owned(),
            vec![(1, at(0)), (2, at(60))],
        ),
        (
            "aws\0live\0secret".to_owned(),
            vec![(3, at(0)), (4, at(43_000))],
        ),
        ("plain".to_owned(), vec![(5, at(0))]),
    ]
    .into_iter()
    .collect();
    super::store::forget_idle_slots(&mut values, at(12 * 3600 + 61));
    let left: Vec<&str> = values.keys().map(String::as_str).collect();
    assert_eq!(left, ["aws\0live\0secret", "plain"]);
}

/// Replaced values are kept twelve hours after they were replaced (the last two always),
/// and four at most.
#[test]
fn replaced_values_are_kept_while_they_may_be_valid() {
    use std::time::{Duration, Instant};
    let start = Instant::now();
    let at = |secs: u64| start + Duration::from_secs(secs);
    let hour = 3600;
    // Values noted at 0 h, 1 h, 2 h and 14 h: looked at from 14 h, the first (replaced at
    // 1 h, 13 h ago) goes, the second (replaced at 2 h, 12 h ago exactly) stays.
    let mut list = vec![
        (1, at(0)),
        (2, at(hour)),
        (3, at(2 * hour)),
        (4, at(14 * hour)),
    ];
    super::store::forget_old(&mut list, at(14 * hour), 4);
    assert_eq!(list.iter().map(|(v, _)| *v).collect::<Vec<_>>(), [2, 3, 4]);
    // The last two stay whatever their age.
    let mut list = vec![(1, at(0)), (2, at(1))];
    super::store::forget_old(&mut list, at(100 * hour), 4);
    assert_eq!(list.len(), 2);
    // A value every second: the newest four.
    let mut list: Vec<(u64, Instant)> = (0..40).map(|i| (i, at(i))).collect();
    assert_eq!(super::store::forget_old(&mut list, at(40), 4), 36);
    assert_eq!(list.len(), 4);
    assert_eq!(list[0].0, 36);
    // A command refreshed every ten minutes keeps a value per refresh over twelve hours
    // (to 64): one noted every ten minutes for a day keeps the last 64.
    let mut list: Vec<(u64, Instant)> = (0..144).map(|i| (i, at(i * 600))).collect();
    let dropped_young = super::store::forget_old(&mut list, at(143 * 600), 64);
    assert_eq!(list.len(), 64);
    assert_eq!(list[0].0, 80);
    assert_eq!(
        dropped_young, 10,
        "values 70 to 79 were replaced 12 h ago or less"
    );
    // What a command source keeps, by its ttl: one value per ttl over 12 h, 4 to 64.
    let kept = |secs| super::store::known_at_most_for_ttl(Duration::from_secs(secs));
    assert_eq!(kept(600), 64);
    assert_eq!(kept(3600), 13);
    assert_eq!(kept(4 * 3600), 4);
    assert_eq!(kept(86_400), 4);
    assert_eq!(kept(0), 64);
}
