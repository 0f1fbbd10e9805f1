//! The architecture invariants of `src/lib.rs`, checked over the sources.

use std::{
    fs,
    path::{Path, PathBuf},
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n == "target") {
                    continue;
                }
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// A source file's production code: the text before its `#[cfg(test)]`
/// module (by convention the last item of a file), and nothing of files
/// under a `tests/` directory or of the test-only crates.
fn production_sources() -> Vec<(String, String)> {
    let services = root().join("services");
    rust_files(&services)
        .into_iter()
        .filter_map(|path| {
            let rel = path
                .strip_prefix(root())
                .expect("under the root")
                .to_string_lossy()
                .replace('\\', "/");
            let test_only = rel.contains("/tests/")
                || rel.starts_with("services/test-kit/")
                || rel.starts_with("services/sim/")
                // Clients of the API under test (`betting chaos` and the
                // books it shares with the simulation), not the services.
                || rel.starts_with("services/chaos/")
                || rel.starts_with("services/books/")
                || rel.starts_with("services/tidy/")
                || rel.ends_with("/build.rs");
            if test_only {
                return None;
            }
            let text = fs::read_to_string(&path).expect("read source");
            let text = match text.find("#[cfg(test)]") {
                Some(i) => &text[..i],
                None => &text[..],
            };
            // Code only: comments may name anything.
            let code: Vec<&str> = text
                .lines()
                .filter(|line| !line.trim_start().starts_with("//"))
                .collect();
            Some((rel, code.join("\n")))
        })
        .collect()
}

/// Every crate's directory under `services/`, in order.
fn crate_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<_> = fs::read_dir(root().join("services"))
        .expect("services/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    dirs.sort();
    dirs
}

fn crate_of(rel: &str) -> &str {
    rel.trim_start_matches("services/")
        .split('/')
        .next()
        .unwrap_or_default()
}

#[test]
fn only_the_wallet_writes_money_tables() {
    let tables = [
        "wallets",
        "ledger_entries",
        "wallet_refusals",
        "payout_bets",
    ];
    let mut offenders = Vec::new();
    for (rel, text) in production_sources() {
        if crate_of(&rel) == "wallet" {
            continue;
        }
        let sql = text
            .to_ascii_lowercase()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        for table in tables {
            for verb in ["insert into", "update", "delete from", "truncate"] {
                let pattern = format!("{verb} {table}");
                // `update wallets` but not `update wallets_x`.
                let hit = sql.match_indices(&pattern).any(|(i, _)| {
                    !sql[i + pattern.len()..]
                        .starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
                });
                if hit {
                    offenders.push(format!("{rel}: {pattern}"));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "only services/wallet may write money tables:\n{}",
        offenders.join("\n")
    );
}

/// Where gRPC types may appear. Anything else naming `tonic` or `prost` is
/// transport leaking into the core.
fn grpc_allowed(rel: &str) -> bool {
    const CRATES: &[&str] = &["api", "server", "auth", "wallet-client", "streams", "cli"];
    CRATES.contains(&crate_of(rel))
}

#[test]
fn grpc_types_stay_at_the_edge() {
    let mut offenders = Vec::new();
    for (rel, text) in production_sources() {
        if grpc_allowed(&rel) {
            continue;
        }
        for word in ["tonic::", "prost::", "use tonic", "use prost", "pb::"] {
            if text.contains(word) {
                offenders.push(format!("{rel}: {word}"));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "gRPC types outside the edge (see grpc_allowed):\n{}",
        offenders.join("\n")
    );
}

#[test]
fn statuses_are_built_only_by_the_mapping() {
    let mut offenders = Vec::new();
    for (rel, text) in production_sources() {
        if rel == "services/api/src/status.rs" {
            continue;
        }
        for (i, _) in text.match_indices("Status::") {
            // `RoundStatus::`, `ServingStatus::`, `pb::BetStatus::` are other types.
            let before = text[..i].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let line = text[..i].lines().count();
            offenders.push(format!("{rel}:{line}"));
        }
    }
    assert!(
        offenders.is_empty(),
        "tonic::Status built outside services/api/src/status.rs (use to_status):\n{}",
        offenders.join("\n")
    );
}

/// Transactions begin through `betting_db::begin`, which bounds them by the
/// request's deadline (statement and lock timeouts); a bare `pool.begin()`
/// in a service would let a request outlive its client in PostgreSQL. The
/// CLI's one-off commands and the database crate itself are exempt.
#[test]
fn transactions_begin_within_the_deadline() {
    let mut offenders = Vec::new();
    for (rel, text) in production_sources() {
        if rel.starts_with("services/db/") || rel.starts_with("services/cli/") {
            continue;
        }
        for pattern in [".begin()", ".begin_with("] {
            for (i, _) in text.match_indices(pattern) {
                let line = text[..i].lines().count();
                offenders.push(format!("{rel}:{line}"));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "transactions begun outside betting_db::begin:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn manifests_tell_the_truth() {
    let mut problems = Vec::new();
    for dir in crate_dirs() {
        let manifest = fs::read_to_string(dir.join("Cargo.toml")).expect("manifest");
        let name = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if !manifest.lines().any(|l| l.starts_with("description = \"")) {
            problems.push(format!("{name}: no description"));
        }
        if !manifest.contains("publish.workspace = true") && !manifest.contains("publish = false") {
            problems.push(format!("{name}: publish is not false"));
        }
        if !manifest.contains("[lints]") {
            problems.push(format!("{name}: does not inherit the workspace lints"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn no_comment_points_outside_the_repository() {
    let mut offenders = Vec::new();
    for path in rust_files(&root().join("services")) {
        let text = fs::read_to_string(&path).expect("read");
        for (n, line) in text.lines().enumerate() {
            let comment = line.trim_start();
            if (comment.starts_with("//") || comment.starts_with('#'))
                && (comment.contains("../shared") || comment.contains("/work/"))
            {
                offenders.push(format!("{}:{}", path.display(), n + 1));
            }
        }
    }
    for manifest in ["Cargo.toml"] {
        let text = fs::read_to_string(root().join(manifest)).expect("read");
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with('#') && line.contains("../shared") {
                offenders.push(format!("{manifest}:{}", n + 1));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "comments pointing outside the repository:\n{}",
        offenders.join("\n")
    );
}

/// What cargo-machete checks, without the tool: every dependency a manifest
/// declares is named in the code that may use it (`src/` for dependencies,
/// `tests/` too for dev-dependencies, `build.rs` for build-dependencies).
#[test]
fn every_declared_dependency_is_used() {
    // Used only by generated code (`tonic::include_proto!`).
    const GENERATED: &[(&str, &str)] = &[("api", "tonic-prost")];
    let mut unused = Vec::new();
    for dir in crate_dirs() {
        let name = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let manifest = fs::read_to_string(dir.join("Cargo.toml")).expect("manifest");
        let code = |subdirs: &[&str]| -> String {
            let mut text = String::new();
            for sub in subdirs {
                let path = dir.join(sub);
                if path.is_file() {
                    text += &fs::read_to_string(&path).unwrap_or_default();
                } else {
                    for file in rust_files(&path) {
                        text += &fs::read_to_string(&file).unwrap_or_default();
                    }
                }
            }
            text
        };
        let mut section = String::new();
        for line in manifest.lines() {
            let line = line.trim();
            if line.starts_with('[') {
                section = line.trim_matches(|c| c == '[' || c == ']').to_owned();
                continue;
            }
            let searched: &[&str] = match section.as_str() {
                "dependencies" => &["src"],
                "dev-dependencies" => &["src", "tests", "benches"],
                "build-dependencies" => &["build.rs"],
                _ => continue,
            };
            let Some(dep) = line
                .split(['.', '=', ' '])
                .next()
                .filter(|d| !d.is_empty() && !d.starts_with('#'))
            else {
                continue;
            };
            if GENERATED.contains(&(name.as_str(), dep)) {
                continue;
            }
            let ident = dep.replace('-', "_");
            let text = code(searched);
            let used = text.match_indices(&ident).any(|(i, _)| {
                let before = text[..i].chars().next_back();
                let after = text[i + ident.len()..].chars().next();
                let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
                !word(before) && !word(after)
            });
            if !used {
                unused.push(format!("{name} [{section}] {dep}"));
            }
        }
    }
    assert!(
        unused.is_empty(),
        "declared but never named in the code (remove them):\n{}",
        unused.join("\n")
    );
}
