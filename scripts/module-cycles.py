#!/usr/bin/env python3
"""Fails when modules of a crate import each other in a circle.

For each crate's `src/`, every file is a module (`a/b.rs` is `a::b`; the files under `a/` of a
module `a.rs` count as part of `a`, as its private parts), and an import is any `crate::` or
`super::` path in the file outside `#[cfg(test)]` code and test files. Prints each circle with the
names that tie it and exits 1 if there is one.

    python3 scripts/module-cycles.py [crate-dir ...]     # default: proxy proxy-config operator
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def modules(src: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    """Module name -> its files."""
    files = [p for p in src.rglob("*.rs") if p.name != "tests.rs" and "bin" not in p.relative_to(src).parts[:1]]
    file_modules = {p.relative_to(src).with_suffix("").as_posix() for p in files}
    out: dict[str, list[pathlib.Path]] = {}
    for p in files:
        rel = p.relative_to(src).with_suffix("").as_posix()
        if rel in ("lib", "main"):
            continue
        if rel.endswith("/mod"):
            continue  # declarations only
        parts = rel.split("/")
        # Files under `a/` belong to `a` when `a.rs` exists (a module with private parts).
        name = rel
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in file_modules:
                name = "/".join(parts[:i])
                break
        out.setdefault(name.replace("/", "::"), []).append(p)
    return out


def strip_tests(text: str) -> str:
    """The file without its test code and comments (a doc link is no import)."""
    i = text.find("#[cfg(test)]")
    text = text if i < 0 else text[:i]
    return re.sub(r"//[^\n]*", "", text)


def paths_after(text: str, start: int) -> list[str]:
    """The paths that begin at `start` (after `crate::` or `super::`), expanding one brace group."""
    m = re.match(r"[A-Za-z_][A-Za-z0-9_]*(::[A-Za-z_][A-Za-z0-9_]*)*(::\{)?", text[start:])
    if not m:
        if text[start:start + 1] == "{":
            m = re.match(r"", text[start:])
            head = ""
            brace = start
        else:
            return []
    else:
        head = m.group(0)
        if not head.endswith("{"):
            return [head]
        head = head[:-3]
        brace = start + len(m.group(0)) - 1
    depth, i, items, cur = 0, brace, [], ""
    while i < len(text):
        c = text[i]
        if c == "{":
            depth += 1
            if depth == 1:
                i += 1
                continue
        elif c == "}":
            depth -= 1
            if depth == 0:
                items.append(cur)
                break
        if c == "," and depth == 1:
            items.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    out = []
    for it in items:
        it = it.strip()
        if not it or it == "self":
            out.append(head)
            continue
        first = re.match(r"[A-Za-z_][A-Za-z0-9_]*(::[A-Za-z_][A-Za-z0-9_]*)*", it)
        if first:
            out.append(f"{head}::{first.group(0)}" if head else first.group(0))
    return out


def resolve(path: str, names: set[str]) -> str | None:
    parts = path.split("::")
    for n in range(len(parts), 0, -1):
        cand = "::".join(parts[:n])
        if cand in names:
            return cand
    return None


def graph(src: pathlib.Path):
    mods = modules(src)
    names = set(mods)
    edges: dict[str, dict[str, set[str]]] = {m: {} for m in names}
    for m, files in mods.items():
        for f in files:
            text = strip_tests(f.read_text())
            rel = f.relative_to(src).with_suffix("").as_posix().split("/")
            parent = "::".join(rel[:-1])
            for kw in ("crate::", "super::"):
                for hit in re.finditer(re.escape(kw), text):
                    if kw == "super::" and text[max(0, hit.start() - 7):hit.start()].endswith("crate::"):
                        continue
                    for p in paths_after(text, hit.end()):
                        full = p if kw == "crate::" else (f"{parent}::{p}" if parent else p)
                        target = resolve(full, names)
                        if target and target != m:
                            edges[m].setdefault(target, set()).add(full.split("::")[-1])
    return edges


def cycles(edges):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main():
    crates = sys.argv[1:] or ["proxy", "proxy-config", "operator"]
    found = False
    for c in crates:
        edges = graph(ROOT / c / "src")
        for comp in cycles(edges):
            found = True
            print(f"{c}: modules in a circle: {', '.join(comp)}")
            for a in comp:
                for b, names in sorted(edges[a].items()):
                    if b in comp:
                        print(f"  {a} -> {b}: {', '.join(sorted(names))}")
    if not found:
        print("no module imports another that imports it back, directly or through others")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
