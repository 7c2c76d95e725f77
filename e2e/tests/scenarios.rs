//! The end-to-end scenario list (e2e/scenarios.yaml) and the test files stay in step: every test
//! it names exists, and every end-to-end test is listed, so the local and kind runners cannot drift
//! apart unnoticed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub, reason = "test harness")]

use std::collections::BTreeSet;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The test functions of a Rust (`async fn name()` after a test attribute) or pytest file.
fn tests_in(file: &str) -> BTreeSet<String> {
    let path = if file.ends_with(".py") { root().join(file) } else { root().join("e2e/tests").join(file) };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = BTreeSet::new();
    let mut after_attribute = false;
    for line in text.lines() {
        let l = line.trim_start();
        if l.starts_with("#[tokio::test") || l.starts_with("#[test]") {
            after_attribute = true;
        } else if after_attribute && (l.starts_with("async fn ") || l.starts_with("fn ")) {
            let name = l.trim_start_matches("async ").trim_start_matches("fn ");
            out.insert(name.split('(').next().unwrap().to_owned());
            after_attribute = false;
        } else if file.ends_with(".py") && l.starts_with("def test_") {
            out.insert(l.trim_start_matches("def ").split('(').next().unwrap().to_owned());
        }
    }
    out
}

#[test]
fn every_end_to_end_test_is_a_listed_scenario_and_every_listed_test_exists() {
    let list: Vec<serde_yaml::Mapping> =
        serde_yaml::from_str(&std::fs::read_to_string(root().join("e2e/scenarios.yaml")).unwrap()).unwrap();
    assert!(list.len() >= 10);
    let mut named = BTreeSet::new();
    for s in &list {
        let scenario = s.get("scenario").and_then(|v| v.as_str()).unwrap();
        for runner in ["local", "kind"] {
            let v = s.get(runner).and_then(|v| v.as_str()).unwrap_or_else(|| panic!("{scenario}: no `{runner}`"));
            for item in v.split(", ").filter(|i| i.contains("::")) {
                let (file, test) = item.split_once("::").unwrap();
                assert!(tests_in(file).contains(test), "{scenario}: {runner} names {item}, which does not exist");
                named.insert(format!("{file}::{test}"));
            }
        }
    }
    // Every test module of the local suite (its harness and main hold no tests).
    let mut local: Vec<String> = std::fs::read_dir(root().join("e2e/tests/local"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.ends_with(".rs") && f != "main.rs" && f != "harness.rs")
        .map(|f| format!("local/{f}"))
        .collect();
    local.sort();
    assert!(local.len() >= 5, "{local:?}");
    let others =
        ["agreement.rs", "chart.rs", "kind.rs", "charts/tests/test_local_e2e.py", "charts/tests/test_rollout_e2e.py"];
    for file in local.iter().map(String::as_str).chain(others) {
        for test in tests_in(file) {
            assert!(
                named.contains(&format!("{file}::{test}")),
                "{file}::{test} is in no scenario of e2e/scenarios.yaml"
            );
        }
    }
}
