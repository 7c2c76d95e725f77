//! The configuration reference (`docs/configuration-reference.md`) is generated from the same
//! types that parse a document, through their JSON Schema: every field with its type, whether it is
//! required, its description and default (the types' doc comments). This test fails when a field
//! has no description, an optional field does not say its default, or the committed page drifts:
//! regenerate with `UPDATE_DOCS=1 cargo test -p proxy-config --test reference`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test")]

use serde_json::Value;

/// The definition a property points at, if it is an object of ours (directly, optional, or as
/// the items of a list), and whether it is a list.
fn target<'a>(prop: &'a Value, defs: &'a Value) -> Option<(&'a str, &'a Value, bool)> {
    let name_of = |v: &'a Value| -> Option<&'a str> { v.get("$ref")?.as_str()?.strip_prefix("#/$defs/") };
    let direct = name_of(prop).or_else(|| prop.get("anyOf")?.as_array()?.iter().find_map(name_of));
    if let Some(n) = direct {
        return defs.get(n).filter(|d| d.get("properties").is_some()).map(|d| (n, d, false));
    }
    let n = name_of(prop.get("items")?)?;
    defs.get(n).filter(|d| d.get("properties").is_some()).map(|d| (n, d, true))
}

/// A short type for the table: enum values, the item type of a list, a link to a nested section.
fn type_text(prop: &Value, defs: &Value, child_path: &str) -> String {
    if let Some(values) = prop.get("enum").and_then(Value::as_array) {
        let v: Vec<String> =
            values.iter().filter(|v| !v.is_null()).map(|v| format!("`{}`", v.as_str().unwrap_or("?"))).collect();
        return v.join(" \\| ");
    }
    if let Some((_, _, list)) = target(prop, defs) {
        let anchor = anchor(child_path);
        return if list { format!("list of [objects](#{anchor})") } else { format!("[object](#{anchor})") };
    }
    let ty = |v: &Value| -> String {
        if v.get("$ref").and_then(Value::as_str) == Some("#/$defs/RawPort") {
            return "port or `\"lo-hi\"`".into();
        }
        match v.get("type") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(a)) => {
                a.iter().filter_map(Value::as_str).filter(|s| *s != "null").collect::<Vec<_>>().join(" or ")
            }
            _ => "value".into(),
        }
    };
    let base = ty(prop);
    if base == "array" {
        return format!("list of {}", prop.get("items").map(&ty).unwrap_or_default());
    }
    if base == "object" {
        return "map of string to string".into();
    }
    base
}

fn anchor(path: &str) -> String {
    path.chars()
        .filter_map(|c| match c {
            'a'..='z' | '0'..='9' | '-' => Some(c),
            'A'..='Z' => Some(c.to_ascii_lowercase()),
            '.' | '[' | ']' => None,
            _ => Some('-'),
        })
        .collect()
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ").replace('|', "\\|")
}

struct Page {
    text: String,
    problems: Vec<String>,
}

fn section(page: &mut Page, path: &str, def: &Value, defs: &Value) {
    let required: Vec<&str> = def
        .get("required")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(props) = def.get("properties").and_then(Value::as_object) else { return };
    let title = if path.is_empty() { "The document".to_owned() } else { format!("`{path}`") };
    page.text += &format!("\n## {title}\n\n");
    if let Some(d) = def.get("description").and_then(Value::as_str) {
        page.text += &format!("{}\n\n", one_line(d));
    }
    page.text += "| Field | Type | Description |\n|---|---|---|\n";
    let mut nested = Vec::new();
    for (name, prop) in props {
        let full = if path.is_empty() { name.clone() } else { format!("{path}.{name}") };
        let child_path = match target(prop, defs) {
            Some((_, _, true)) => format!("{full}[]"),
            _ => full.clone(),
        };
        let description = prop.get("description").and_then(Value::as_str).unwrap_or("");
        if description.is_empty() {
            page.problems
                .push(format!("{full}: no description (a doc comment on its field in proxy-config/src/raw.rs)"));
        }
        let is_required = required.contains(&name.as_str());
        if !is_required && !description.contains("Default:") && !description.contains("Required") {
            page.problems
                .push(format!("{full}: optional, but its description does not say its default (\"Default: ...\")"));
        }
        let req = if is_required { " **required**" } else { "" };
        page.text +=
            &format!("| `{name}`{req} | {} | {} |\n", type_text(prop, defs, &child_path), one_line(description));
        if let Some((_, d, _)) = target(prop, defs) {
            nested.push((child_path, d));
        }
    }
    for (p, d) in nested {
        section(page, &p, d, defs);
    }
}

#[test]
fn the_configuration_reference_is_generated_from_the_types_and_current() {
    let schema = serde_json::to_value(schemars::schema_for!(proxy_config::raw::RawConfig)).unwrap();
    let defs = &schema["$defs"];
    let mut page = Page {
        text: "<!-- Generated from proxy-config/src/raw.rs by `UPDATE_DOCS=1 cargo test -p proxy-config --test reference`; \
               do not edit. -->\n# Configuration reference\n\n\
               Every field of a `tunnelgate-proxy` configuration file, generated from the types that parse it \
               (the same text editors show from [the JSON Schema](../proxy-config/config.schema.json)). \
               Durations are written like `500ms`, `10s`, `5m`, `24h`. Unknown fields are errors. For a \
               complete example and how rules combine, see [Configuration](configuration.md).\n"
            .to_owned(),
        problems: Vec::new(),
    };
    section(&mut page, "", &schema, defs);
    assert!(
        page.problems.is_empty(),
        "the configuration's types are not fully documented:\n{}",
        page.problems.join("\n")
    );
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration-reference.md");
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(path, &page.text).unwrap();
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(committed == page.text, "{path} is out of date: UPDATE_DOCS=1 cargo test -p proxy-config --test reference");
    // What a reader looks for is there, with its default.
    for needle in
        ["| `connectTimeout` | string | Budget for connecting upstream", "Default: `10s`", "## `listeners[].tls.acme`"]
    {
        assert!(page.text.contains(needle), "{needle}");
    }
}
