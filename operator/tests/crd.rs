//! The CRD: golden test (the checked-in file equals what the Rust types generate) and the bounds
//! and CEL cost checks a real API server applies at install.
//! `UPDATE_GOLDEN=1 cargo test -p tunnelgate-operator --test crd` rewrites it.

#![allow(clippy::unwrap_used, reason = "test helpers")]

use kube::CustomResourceExt;
use tunnelgate_operator::crd::{ClusterTunnelPolicy, TunnelPolicy};

/// Every CRD with the file it is checked in as.
fn crds(
) -> [(&'static str, k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition); 2] {
    [("tunnelpolicies.yaml", TunnelPolicy::crd()), ("clustertunnelpolicies.yaml", ClusterTunnelPolicy::crd())]
}

#[test]
fn checked_in_crd_matches_the_types() {
    for (file, crd) in crds() {
        let path = format!("{}/../crds/{file}", env!("CARGO_MANIFEST_DIR"));
        // The chart installs the same file (charts/tests checks the copy is equal).
        let chart_copy = format!("{}/../charts/tunnelgate/files/crds/{file}", env!("CARGO_MANIFEST_DIR"));
        let generated = serde_yaml::to_string(&crd).unwrap();
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &generated).unwrap();
            std::fs::write(&chart_copy, &generated).unwrap();
        }
        assert_eq!(
            std::fs::read_to_string(&chart_copy).unwrap(),
            std::fs::read_to_string(&path).unwrap(),
            "chart copy of {file} differs"
        );
        let on_disk = std::fs::read_to_string(&path).unwrap();
        let a: serde_json::Value = serde_yaml::from_str(&on_disk).unwrap();
        let b: serde_json::Value = serde_json::to_value(&crd).unwrap();
        assert!(a == b, "crds/{file} is stale: run UPDATE_GOLDEN=1 cargo test -p tunnelgate-operator --test crd");
    }
}

#[test]
fn cluster_crd_names_scope_and_columns() {
    let crd = serde_json::to_value(ClusterTunnelPolicy::crd()).unwrap();
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "ctp");
    assert_eq!(crd["spec"]["scope"], "Cluster");
    let v = &crd["spec"]["versions"][0];
    assert!(v["subresources"]["status"].is_object());
    let cols: Vec<&str> =
        v["additionalPrinterColumns"].as_array().unwrap().iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(cols, ["Action", "Priority", "Delegate", "Destinations", "Pods", "Loaded", "Accepted", "Ready", "Age"]);
}

#[test]
fn crd_names_and_subresources() {
    let crd = serde_json::to_value(TunnelPolicy::crd()).unwrap();
    assert_eq!(crd["spec"]["group"], "tunnelgate.io");
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "tp");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["name"], "v1alpha1");
    assert!(v["subresources"]["status"].is_object());
    let cols: Vec<&str> =
        v["additionalPrinterColumns"].as_array().unwrap().iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(cols, ["Action", "Destinations", "Pods", "Loaded", "Accepted", "Ready", "Age"]);
}

// ---- CEL cost: the API server refuses a CRD whose rules may cost too much in the worst case ----
//
// The API server's estimator (k8s.io/apiextensions-apiserver, `cel.Compile` + `MaxCardinality`) multiplies
// a rule's own worst-case cost by the largest number of times it can run: the product of `maxItems`
// (`maxProperties` for maps) of every list around it. A list without `maxItems` counts as large as a
// 3 MiB request allows, and a string without `maxLength` as 3 MiB long, which is what made the first
// version of this CRD unusable. Its limits: 10,000,000 per rule (`StaticEstimatedCostLimit`), 100,000,000
// per CRD (`StaticEstimatedCRDCostLimit`).
//
// This is an upper-bound approximation, not the real estimator: a rule's own work is 10 (calls and
// operators) plus 1 per character or element it may scan (the API server charges 0.1 per character),
// times the regex's length for `matches`. The test demands a tenfold margin under both limits.

const PER_RULE_LIMIT: u64 = 10_000_000;
const PER_CRD_LIMIT: u64 = 100_000_000;
const MARGIN: u64 = 10;

struct RuleCost {
    path: String,
    rule: String,
    cost: u64,
}

/// Worst-case number of characters or elements a rule scans when it reads a value of this schema.
fn scan_size(s: &serde_json::Value, path: &str) -> Result<u64, String> {
    let bound = |key: &str| s.get(key).and_then(serde_json::Value::as_u64);
    if s.get("x-kubernetes-int-or-string").is_some() {
        return bound("maxLength").ok_or_else(|| format!("{path}: int-or-string without maxLength"));
    }
    match s.get("type").and_then(serde_json::Value::as_str) {
        Some("string") => bound("maxLength").ok_or_else(|| format!("{path}: string without maxLength")),
        Some("array") => {
            let n = bound("maxItems").ok_or_else(|| format!("{path}: list without maxItems"))?;
            Ok(n * (1 + scan_size(&s["items"], &format!("{path}[]"))?))
        }
        Some("object") => {
            let mut total = 0;
            if let Some(props) = s.get("properties").and_then(serde_json::Value::as_object) {
                for (k, v) in props {
                    total += scan_size(v, &format!("{path}.{k}"))?;
                }
            }
            if let Some(extra) = s.get("additionalProperties").filter(|v| v.is_object()) {
                let n = bound("maxProperties").ok_or_else(|| format!("{path}: map without maxProperties"))?;
                total += n * (1 + scan_size(extra, &format!("{path}.*"))?);
            }
            Ok(total)
        }
        _ => Ok(1),
    }
}

/// The part of a value a rule reads: `has(...)` is a presence test (constant cost); `self.field` reads
/// that field; a bare `self`, or a macro on it, reads the whole value.
fn rule_scan(rule: &str, s: &serde_json::Value, path: &str) -> Result<u64, String> {
    let without_has = regex::Regex::new(r"has\([^)]*\)").map_err(|e| e.to_string())?.replace_all(rule, "");
    let field = regex::Regex::new(r"\bself(\.([A-Za-z_][A-Za-z0-9_]*)(\()?)?").map_err(|e| e.to_string())?;
    let mut scanned = 0;
    for c in field.captures_iter(&without_has) {
        // `self.all(...)`, `self.exists(...)`: a macro over the whole value, not a field.
        scanned += match c.get(2).filter(|_| c.get(3).is_none()) {
            Some(name) => scan_size(&s["properties"][name.as_str()], &format!("{path}.{}", name.as_str()))?,
            None => scan_size(s, path)?,
        };
    }
    let regex_len = regex::Regex::new(r"matches\('([^']*)'\)")
        .map_err(|e| e.to_string())?
        .captures(rule)
        .map_or(1, |c| c[1].len() as u64);
    Ok(10 + scanned * regex_len)
}

/// Every rule in the schema with its worst-case cost; an error names a rule under an unbounded list.
fn rule_costs(s: &serde_json::Value, path: &str, cardinality: u64, out: &mut Vec<RuleCost>) -> Result<(), String> {
    if let Some(rules) = s.get("x-kubernetes-validations").and_then(serde_json::Value::as_array) {
        for r in rules {
            let rule = r["rule"].as_str().unwrap_or_default().to_string();
            let own = rule_scan(&rule, s, path).map_err(|e| format!("rule {rule:?} at {path}: {e}"))?;
            out.push(RuleCost { path: path.to_string(), cost: cardinality * own, rule });
        }
    }
    if let Some(props) = s.get("properties").and_then(serde_json::Value::as_object) {
        for (k, v) in props {
            rule_costs(v, &format!("{path}.{k}"), cardinality, out)?;
        }
    }
    if let Some(items) = s.get("items") {
        let n = s.get("maxItems").and_then(serde_json::Value::as_u64);
        if let Some(n) = n {
            rule_costs(items, &format!("{path}[]"), cardinality * n, out)?;
        } else if has_rules(items) {
            return Err(format!("{path}: a CEL rule sits under this list, which has no maxItems"));
        }
    }
    if let Some(extra) = s.get("additionalProperties").filter(|v| v.is_object()) {
        match s.get("maxProperties").and_then(serde_json::Value::as_u64) {
            Some(n) => rule_costs(extra, &format!("{path}.*"), cardinality * n, out)?,
            None if has_rules(extra) => {
                return Err(format!("{path}: a CEL rule sits under this map, which has no maxProperties"))
            }
            None => {}
        }
    }
    Ok(())
}

fn has_rules(s: &serde_json::Value) -> bool {
    match s {
        serde_json::Value::Object(m) => m.contains_key("x-kubernetes-validations") || m.values().any(has_rules),
        serde_json::Value::Array(a) => a.iter().any(has_rules),
        _ => false,
    }
}

fn spec_schemas() -> Vec<serde_json::Value> {
    crds()
        .into_iter()
        .map(|(_, crd)| {
            let crd = serde_json::to_value(crd).unwrap();
            crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
        })
        .collect()
}

#[test]
fn every_cel_rule_is_within_the_api_servers_cost_budget_with_a_wide_margin() {
    for schema in spec_schemas() {
        check_costs(&schema);
    }
}

fn check_costs(schema: &serde_json::Value) {
    let mut costs = Vec::new();
    rule_costs(schema, "spec", 1, &mut costs).unwrap();
    assert!(!costs.is_empty(), "the walk found no CEL rule at all: it is not reading the schema");
    let total: u64 = costs.iter().map(|c| c.cost).sum();
    for c in &costs {
        eprintln!("{:>10}  {}  {}", c.cost, c.path, c.rule);
        assert!(
            c.cost * MARGIN <= PER_RULE_LIMIT,
            "rule {:?} at {} may cost {} (limit {PER_RULE_LIMIT}, margin {MARGIN}x)",
            c.rule,
            c.path,
            c.cost
        );
    }
    assert!(total * MARGIN <= PER_CRD_LIMIT, "all rules together may cost {total} (limit {PER_CRD_LIMIT})");
}

#[test]
fn every_list_and_string_of_the_spec_is_bounded() {
    fn walk(s: &serde_json::Value, path: &str, errors: &mut Vec<String>) {
        let has = |k: &str| s.get(k).is_some();
        let ty = s.get("type").and_then(serde_json::Value::as_str);
        let extra = s.get("additionalProperties").filter(|v| v.is_object());
        if (ty == Some("string") || has("x-kubernetes-int-or-string")) && !has("maxLength") && !has("enum") {
            errors.push(format!("{path}: string without maxLength"));
        }
        if ty == Some("array") && !has("maxItems") {
            errors.push(format!("{path}: list without maxItems"));
        }
        if let Some(extra) = extra {
            if !has("maxProperties") {
                errors.push(format!("{path}: map without maxProperties"));
            }
            walk(extra, &format!("{path}.*"), errors);
        }
        if let Some(props) = s.get("properties").and_then(serde_json::Value::as_object) {
            for (k, v) in props {
                walk(v, &format!("{path}.{k}"), errors);
            }
        }
        if let Some(items) = s.get("items") {
            walk(items, &format!("{path}[]"), errors);
        }
    }
    let mut errors = Vec::new();
    for schema in spec_schemas() {
        walk(&schema, "spec", &mut errors);
    }
    assert!(errors.is_empty(), "unbounded: {errors:#?}");
}

#[test]
fn the_cost_check_catches_what_made_the_first_crd_unusable() {
    // The first CRD: destinations without maxItems around a per-list rule, ports matched by a regex with
    // no maxLength. Both must be caught, or the checks above prove nothing.
    let old: serde_json::Value = serde_json::json!({
        "type": "object",
        "properties": {"destinations": {"type": "array", "items": {"type": "object", "properties": {
            "cidrs": {"type": "array", "maxItems": 256, "items": {"type": "string", "maxLength": 43},
                      "x-kubernetes-validations": [{"rule": "self.all(c, isCIDR(c) || isIP(c))"}]}}}}}
    });
    let err = rule_costs(&old, "spec", 1, &mut Vec::new()).unwrap_err();
    assert!(err.contains("spec.destinations") && err.contains("no maxItems"), "{err}");
    let ports: serde_json::Value = serde_json::json!({
        "type": "array", "maxItems": 64, "items": {"x-kubernetes-int-or-string": true},
        "x-kubernetes-validations": [{"rule": "self.all(p, type(p) == int || p.matches('^[0-9]+$'))"}]
    });
    let err = rule_costs(&ports, "spec.ports", 64, &mut Vec::new()).unwrap_err();
    assert!(err.contains("without maxLength"), "{err}");
    // A bounded but too-large nesting is over budget.
    let big: serde_json::Value = serde_json::json!({
        "type": "array", "maxItems": 1000, "items": {"type": "array", "maxItems": 1000,
            "items": {"type": "string", "maxLength": 100, "x-kubernetes-validations": [{"rule": "isIP(self)"}]}}
    });
    let mut costs = Vec::new();
    rule_costs(&big, "x", 1, &mut costs).unwrap();
    assert!(costs[0].cost * MARGIN > PER_RULE_LIMIT);
}
