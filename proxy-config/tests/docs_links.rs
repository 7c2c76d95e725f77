//! The documentation holds together: every relative link in the README and `docs/` names a file
//! that exists and, with `#anchor`, a heading of that file (as GitHub renders anchors); every page
//! of `docs/` is reachable from its index; the README stays a landing page.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test")]

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The pages checked: the README and every Markdown file of docs/.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The text outside fenced code blocks and inline code.
fn prose(text: &str) -> String {
    let mut out = String::new();
    let mut fence = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fence = !fence;
            continue;
        }
        if !fence {
            // Inline code spans: drop what is between backticks.
            let mut inside = false;
            for c in line.chars() {
                if c == '`' {
                    inside = !inside;
                } else if !inside {
                    out.push(c);
                }
            }
            out.push('\n');
        }
    }
    out
}

/// Link targets written `[text](target)`.
fn links(text: &str) -> Vec<String> {
    let p = prose(text);
    p.match_indices("](")
        .filter_map(|(i, _)| {
            let rest = &p[i + 2..];
            rest.find(')').map(|end| rest[..end].to_owned())
        })
        .collect()
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> Vec<String> {
    let mut fence = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fence = !fence;
        } else if !fence && line.starts_with('#') {
            out.push(slug(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn every_relative_link_and_anchor_of_the_docs_resolves() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let dir = page.parent().unwrap();
        for target in links(&text) {
            if target.starts_with("http://") || target.starts_with("https://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, anchor) = target.split_once('#').map_or((target.as_str(), None), |(p, a)| (p, Some(a)));
            let file = if path.is_empty() { page.clone() } else { dir.join(path) };
            if !file.exists() {
                broken.push(format!("{}: {target}: no such file", page.display()));
                continue;
            }
            if let Some(a) = anchor {
                let t = std::fs::read_to_string(&file).unwrap_or_default();
                if !anchors(&t).iter().any(|h| h == a) {
                    broken.push(format!("{}: {target}: no heading with that anchor", page.display()));
                }
            }
        }
    }
    assert!(checked > 100, "links are read: {checked}");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn every_docs_page_is_in_the_index_and_the_readme_is_a_landing_page() {
    let index = std::fs::read_to_string(root().join("docs/README.md")).unwrap();
    let listed = links(&index);
    for page in pages().iter().skip(1) {
        let name = page.file_name().unwrap().to_str().unwrap();
        if name != "README.md" {
            assert!(listed.iter().any(|l| l.split('#').next() == Some(name)), "docs/{name} is not in docs/README.md");
        }
    }
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(readme.lines().count() <= 150, "the README is a landing page: move detail into docs/");
    // Its two commands come first: run the proxy, run the tests.
    let first_block = readme.split("```sh").nth(1).unwrap();
    assert!(first_block.contains("cargo run --release -p tunnelgate-proxy") && first_block.contains("./scripts/test"));
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        assert!(
            !text.contains("../shared/") && !text.contains("SECURITY-CASES"),
            "{}: user docs stand alone",
            page.display()
        );
    }
}
