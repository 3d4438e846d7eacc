//! Architecture rules checked from the sources: the dependency direction between crates,
//! module docs on every file, no reachable `todo!()`, no glob re-exports, and the codemap.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deps(krate: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join(krate).join("Cargo.toml")).unwrap();
    let doc: toml::Table = toml::from_str(&text).unwrap();
    let mut out = vec![];
    for section in ["dependencies", "build-dependencies"] {
        if let Some(t) = doc.get(section).and_then(|v| v.as_table()) {
            out.extend(t.keys().cloned());
        }
    }
    out
}

#[test]
fn dependency_direction() {
    // (crate, may not depend on)
    let rules: &[(&str, &[&str])] = &[
        (
            "ops",
            &[
                "model",
                "data",
                "eval_probes",
                "checkpoints",
                "actors",
                "tokio",
                "ractor",
                "sled",
            ],
        ),
        (
            "model",
            &[
                "eval_probes",
                "checkpoints",
                "actors",
                "data",
                "tokio",
                "ractor",
                "sled",
            ],
        ),
        (
            "data",
            &[
                "candle-core",
                "model",
                "ops",
                "eval_probes",
                "checkpoints",
                "actors",
                "tokio",
                "ractor",
                "sled",
            ],
        ),
        (
            "eval_probes",
            &["checkpoints", "actors", "tokio", "ractor", "sled"],
        ),
        (
            "checkpoints",
            &[
                "candle-core",
                "ops",
                "model",
                "data",
                "eval_probes",
                "actors",
                "tokio",
                "ractor",
            ],
        ),
    ];
    let mut bad = vec![];
    for (krate, forbidden) in rules {
        for d in deps(krate) {
            if forbidden.contains(&d.as_str()) {
                bad.push(format!("{krate} depends on {d}"));
            }
        }
    }
    // model builds on ops; eval_probes on model and ops
    assert!(
        deps("model").contains(&"ops".to_string()),
        "model must build on ops"
    );
    assert!(
        deps("eval_probes").contains(&"model".to_string()),
        "eval_probes must build on model"
    );
    // only checkpoints names sled; only actors (and the binary) name tokio / ractor
    for krate in [
        "ops",
        "model",
        "data",
        "eval_probes",
        "checkpoints",
        "actors",
    ] {
        let d = deps(krate);
        if krate != "checkpoints" && d.iter().any(|x| x == "sled") {
            bad.push(format!("{krate} names sled"));
        }
        if krate != "actors" && d.iter().any(|x| x == "tokio" || x == "ractor") {
            bad.push(format!("{krate} names tokio/ractor"));
        }
    }
    assert!(
        bad.is_empty(),
        "dependency rules broken:\n{}",
        bad.join("\n")
    );
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn all_sources() -> Vec<PathBuf> {
    let mut files = vec![];
    for d in [
        "ops/src",
        "model/src",
        "data/src",
        "eval_probes/src",
        "checkpoints/src",
        "actors/src",
        "src",
        "tests",
    ] {
        let p = root().join(d);
        if p.exists() {
            rust_files(&p, &mut files);
        }
    }
    files
}

#[test]
fn every_file_starts_with_a_module_doc() {
    let missing: Vec<String> = all_sources()
        .into_iter()
        .filter(|p| {
            let t = std::fs::read_to_string(p).unwrap();
            !t.trim_start().starts_with("//!")
        })
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "files without a `//!` module doc:\n{}",
        missing.join("\n")
    );
}

#[test]
fn no_todo_or_glob_reexports() {
    let mut bad = vec![];
    let todo = ["todo", "!("].concat();
    let unimpl = ["unimplemented", "!("].concat();
    let glob = ["pub use ", "::*;"];
    for p in all_sources() {
        let t = std::fs::read_to_string(&p).unwrap();
        let is_test = p.components().any(|c| c.as_os_str() == "tests")
            || p.file_name().is_some_and(|n| n == "tests.rs");
        for (i, line) in t.lines().enumerate() {
            if !is_test && (line.contains(&todo) || line.contains(&unimpl)) {
                bad.push(format!("{}:{}: {}", p.display(), i + 1, line.trim()));
            }
            if line.trim_start().starts_with(glob[0]) && line.trim_end().ends_with(glob[1]) {
                bad.push(format!("{}:{}: glob re-export", p.display(), i + 1));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn architecture_md_names_every_crate() {
    let arch = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    for krate in [
        "ops/",
        "model/",
        "data/",
        "eval_probes/",
        "checkpoints/",
        "actors/",
        "tests/",
    ] {
        assert!(
            arch.contains(krate),
            "ARCHITECTURE.md does not mention {krate}"
        );
    }
}

#[test]
fn readme_gives_the_two_commands_and_ci_runs_the_test_command() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    assert!(
        readme.contains("cargo run --release -- run"),
        "README lacks the main-job command"
    );
    let test_cmd = "cargo test --release --locked --workspace";
    assert!(readme.contains(test_cmd), "README lacks the test command");
    assert!(
        ci.contains(test_cmd),
        ".ci/run does not run the README's test command"
    );
}
