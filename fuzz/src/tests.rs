//! Replays every committed corpus file and crash regression through its target, so that a
//! plain `cargo test` (no libFuzzer, no sanitizer) keeps every input that ever mattered.
use std::{fs, path::Path};

use super::TARGETS;

/// Runs every file under `dir/<target>/` through the target; returns how many ran.
fn replay(dir: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut ran = 0;
    for (name, target) in TARGETS {
        let Ok(entries) = fs::read_dir(root.join(name)) else {
            continue;
        };
        let mut files: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for file in files.iter().filter(|f| f.is_file()) {
            let data = fs::read(file).unwrap();
            eprintln!("{name}: {}", file.display());
            target(&data);
            ran += 1;
        }
    }
    ran
}

#[test]
fn every_target_has_a_seed_corpus_and_it_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (name, _) in TARGETS {
        let seeds = fs::read_dir(root.join(name)).map_or(0, |d| d.count());
        assert!(seeds >= 3, "{name} has {seeds} seed files");
    }
    assert!(replay("corpus") >= 3 * TARGETS.len());
}

#[test]
fn crash_regressions_pass() {
    // Directories exist only for targets that ever crashed; an empty set is fine.
    replay("regressions");
}
