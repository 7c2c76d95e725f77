//! Every flag the operator's and the plugin's `--help` print is in the README's reference.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test")]

use testkit::help_flags as flags;

#[test]
fn every_flag_of_the_operator_and_the_plugin_is_documented() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let operator = flags(env!("CARGO_BIN_EXE_tunnelgate-operator"), &[]);
    assert!(operator.len() >= 20 && operator.contains(&"--debounce-max".to_owned()), "{operator:?}");
    let plugin = env!("CARGO_BIN_EXE_kubectl-tunnelgate");
    let mut all: Vec<(String, String)> = operator.into_iter().map(|f| ("tunnelgate-operator".into(), f)).collect();
    for sub in [&[][..], &["check"], &["explain"], &["status"]] {
        all.extend(flags(plugin, sub).into_iter().map(|f| (format!("kubectl tunnelgate {}", sub.join(" ")), f)));
    }
    assert!(all.iter().any(|(_, f)| f == "--resolve-here"), "subcommands' flags are read: {all:?}");
    let missing: Vec<_> = all.iter().filter(|(_, f)| !readme.contains(f.as_str())).collect();
    assert!(missing.is_empty(), "flags missing from the README: {missing:?}");
}
