//! Every flag the operator's and the plugin's `--help` print is in the command-line reference
//! (`docs/cli.md`), with the default `--help` prints.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test")]

use testkit::help_flags as flags;

#[test]
fn every_flag_of_the_operator_and_the_plugin_is_documented() {
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/cli.md")).unwrap();
    let operator = flags(env!("CARGO_BIN_EXE_tunnelgate-operator"), &[]);
    assert!(operator.len() >= 20 && operator.iter().any(|f| f.flag == "--debounce-max"), "{operator:?}");
    assert!(
        operator.iter().any(|f| f.flag == "--debounce" && f.default.as_deref() == Some("50ms")),
        "defaults are read: {operator:?}"
    );
    let plugin = env!("CARGO_BIN_EXE_kubectl-tunnelgate");
    let mut problems = testkit::undocumented_flags(&section(&page, "## tunnelgate-operator"), &operator);
    let mut seen = Vec::new();
    for sub in [&[][..], &["check"], &["explain"], &["status"]] {
        seen.extend(flags(plugin, sub));
    }
    assert!(seen.iter().any(|f| f.flag == "--resolve-here"), "subcommands' flags are read: {seen:?}");
    problems.extend(testkit::undocumented_flags(&section(&page, "## kubectl tunnelgate"), &seen));
    assert!(problems.is_empty(), "docs/cli.md disagrees with --help: {problems:?}");
}

/// One `## ` section of a page.
fn section(page: &str, heading: &str) -> String {
    let start = page.find(heading).unwrap_or_else(|| panic!("no {heading}"));
    let rest = &page[start + heading.len()..];
    rest[..rest.find("\n## ").unwrap_or(rest.len())].to_owned()
}
