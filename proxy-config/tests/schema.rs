//! The JSON Schema of the configuration, generated from the types that parse it, is committed
//! (`proxy-config/config.schema.json`, for editors: `# yaml-language-server: $schema=…`) and kept
//! current: regenerate with `UPDATE_SCHEMA=1 cargo test -p proxy-config --test schema`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test")]

#[test]
fn the_committed_json_schema_is_current() {
    let schema = schemars::schema_for!(proxy_config::raw::RawConfig);
    let text = serde_json::to_string_pretty(&schema).unwrap() + "\n";
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.schema.json");
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(path, &text).unwrap();
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(committed == text, "{path} is out of date: UPDATE_SCHEMA=1 cargo test -p proxy-config --test schema");
    // What editors rely on: unknown fields refused, the listener modes and rule fields present.
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["additionalProperties"], serde_json::json!(false));
    for field in ["listeners", "policy", "relay", "limits", "redirect"] {
        assert!(v["properties"].get(field).is_some(), "{field}");
    }
}
