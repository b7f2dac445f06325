//! The import graph between the top-level modules of a crate (`crate::services`, `crate::cli`,
//! ...), read from its sources, and the layering rules `cargo xtask lint` checks on it: no
//! cycle, and modules no other module may import (the agent's CLI).
//!
//! An edge `a -> b` is any path in a file of `a` that names `crate::b` (also inside a
//! `use crate::{...}` group) or reaches `b` through `super::` from a module directly under the
//! crate root. Comments, strings and character literals are skipped; inline `mod x { ... }`
//! blocks (tests) count for `super::`. Test code counts like any other: a cycle through a unit
//! test is still a cycle.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// One reference that makes an edge: where it is.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Site {
    pub file: PathBuf,
    pub line: usize,
}

/// Top-level module -> the top-level modules it names, each with the first place it does.
pub type Graph = BTreeMap<String, BTreeMap<String, Site>>;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Semi,
    Other,
}

/// Splits Rust source into the tokens the path scan needs, with their line numbers; comments,
/// string, byte-string, raw-string and character literals become nothing.
fn tokens(src: &str) -> Vec<(Tok, usize)> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    let at = |i: usize| b.get(i).copied().unwrap_or(0);
    while i < b.len() {
        let c = b[i];
        match c {
            b'\n' => {
                line += 1;
                i += 1;
            }
            b'/' if at(i + 1) == b'/' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if at(i + 1) == b'*' => {
                let mut depth = 0usize;
                while i < b.len() {
                    if b[i] == b'/' && at(i + 1) == b'*' {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && at(i + 1) == b'/' {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        line += usize::from(b[i] == b'\n');
                        i += 1;
                    }
                }
            }
            b'r' if at(i + 1) == b'#' || (at(i + 1) == b'"') => {
                // A raw string r"..", r#".."#: count the hashes, find the closing quote + hashes.
                let mut j = i + 1;
                let mut hashes = 0;
                while at(j) == b'#' {
                    hashes += 1;
                    j += 1;
                }
                if at(j) != b'"' {
                    // `r#ident` (a raw identifier).
                    let start = j;
                    while at(j).is_ascii_alphanumeric() || at(j) == b'_' {
                        j += 1;
                    }
                    out.push((Tok::Ident(src[start..j].to_owned()), line));
                    i = j;
                    continue;
                }
                j += 1;
                loop {
                    if j >= b.len() {
                        break;
                    }
                    if b[j] == b'"' && (1..=hashes).all(|k| at(j + k) == b'#') {
                        j += 1 + hashes;
                        break;
                    }
                    line += usize::from(b[j] == b'\n');
                    j += 1;
                }
                i = j;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    line += usize::from(at(i) == b'\n');
                    i += 1;
                }
                i += 1;
            }
            b'\'' => {
                // A character literal ('x', '\n', '\u{..}') or a lifetime ('a).
                if at(i + 1) == b'\\' {
                    i += 2;
                    while i < b.len() && b[i] != b'\'' {
                        i += 1;
                    }
                    i += 1;
                } else if at(i + 2) == b'\'' {
                    i += 3;
                } else {
                    // A lifetime, or a multi-byte character: skip the quote only.
                    let ch_len = src[i + 1..].chars().next().map_or(1, char::len_utf8);
                    if at(i + 1 + ch_len) == b'\'' {
                        i += 2 + ch_len;
                    } else {
                        i += 1;
                        while at(i).is_ascii_alphanumeric() || at(i) == b'_' {
                            i += 1;
                        }
                    }
                }
            }
            b':' if at(i + 1) == b':' => {
                out.push((Tok::PathSep, line));
                i += 2;
            }
            b'{' => {
                out.push((Tok::Open, line));
                i += 1;
            }
            b'}' => {
                out.push((Tok::Close, line));
                i += 1;
            }
            b',' => {
                out.push((Tok::Comma, line));
                i += 1;
            }
            b';' => {
                out.push((Tok::Semi, line));
                i += 1;
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while at(i).is_ascii_alphanumeric() || at(i) == b'_' {
                    i += 1;
                }
                out.push((Tok::Ident(src[start..i].to_owned()), line));
            }
            c if c.is_ascii_whitespace() => i += 1,
            _ => {
                out.push((Tok::Other, line));
                // Skip the rest of a multi-byte character.
                i += src[i..].chars().next().map_or(1, char::len_utf8);
            }
        }
    }
    out
}

/// The first identifiers of the items of a `{ ... }` use group starting at `toks[open]`.
fn group_heads(toks: &[(Tok, usize)], open: usize) -> Vec<(String, usize)> {
    let mut heads = Vec::new();
    let mut depth = 0usize;
    let mut expect_head = true;
    for (t, line) in &toks[open..] {
        match t {
            Tok::Open => {
                depth += 1;
                expect_head = depth == 1;
            }
            Tok::Close => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            Tok::Comma if depth == 1 => expect_head = true,
            Tok::Ident(name) if depth == 1 && expect_head => {
                heads.push((name.clone(), *line));
                expect_head = false;
            }
            _ if depth == 1 => expect_head = false,
            _ => {}
        }
    }
    heads
}

/// The top-level modules `src` (the file of module `path`, e.g. `["services", "sync"]`)
/// names, with the line of each reference.
pub fn references(path: &[String], src: &str) -> Vec<(String, usize)> {
    let toks = tokens(src);
    let mut out = Vec::new();
    // Inline modules open at these brace depths (their names extend `path` for `super::`).
    let mut inline: Vec<usize> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    let target_after = |j: usize, out: &mut Vec<(String, usize)>| match toks.get(j) {
        Some((Tok::Ident(name), line)) => out.push((name.clone(), *line)),
        Some((Tok::Open, _)) => out.extend(group_heads(&toks, j)),
        _ => {}
    };
    while i < toks.len() {
        match &toks[i].0 {
            Tok::Open => depth += 1,
            Tok::Close => {
                if inline.last() == Some(&depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Tok::Ident(k) if k == "mod" => {
                if let (Some((Tok::Ident(_), _)), Some((Tok::Open, _))) =
                    (toks.get(i + 1), toks.get(i + 2))
                {
                    inline.push(depth + 1);
                }
            }
            Tok::Ident(k)
                if k == "crate" && toks.get(i + 1).map(|t| &t.0) == Some(&Tok::PathSep) =>
            {
                // Not a segment of a longer path (`$crate`, `foo::crate` do not occur).
                target_after(i + 2, &mut out);
                i += 2;
                continue;
            }
            Tok::Ident(k)
                if k == "super"
                    && toks.get(i + 1).map(|t| &t.0) == Some(&Tok::PathSep)
                    && !matches!(i.checked_sub(1).map(|p| &toks[p].0), Some(Tok::PathSep)) =>
            {
                // Walk the `super::` chain up from this file's module plus its inline modules.
                let mut level = path.len() + inline.len();
                let mut j = i;
                while matches!(&toks.get(j).map(|t| &t.0), Some(Tok::Ident(s)) if s == "super")
                    && toks.get(j + 1).map(|t| &t.0) == Some(&Tok::PathSep)
                {
                    level = level.saturating_sub(1);
                    j += 2;
                }
                if level == 0 {
                    target_after(j, &mut out);
                }
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// The module path of a source file under `src_root` (`cli/mod.rs` -> `["cli"]`, `cli/svc.rs`
/// -> `["cli", "svc"]`); `None` for the crate root and binaries.
fn module_path(src_root: &Path, file: &Path) -> Option<Vec<String>> {
    let rel = file.strip_prefix(src_root).ok()?;
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    let stem = last.strip_suffix(".rs")?;
    if parts.is_empty() && (stem == "lib" || stem == "main") {
        return None;
    }
    if parts.first().is_some_and(|p| p == "bin") {
        return None;
    }
    if stem != "mod" {
        parts.push(stem.to_owned());
    }
    Some(parts)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            rust_files(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    Ok(())
}

/// The graph of the crate whose sources are under `src_root` (its `lib.rs` beside them).
pub fn graph(src_root: &Path) -> std::io::Result<Graph> {
    let mut files = Vec::new();
    rust_files(src_root, &mut files)?;
    files.sort();
    let mut modules = BTreeSet::new();
    let mut parsed = Vec::new();
    for f in files {
        if let Some(path) = module_path(src_root, &f) {
            modules.insert(path[0].clone());
            let src = std::fs::read_to_string(&f)?;
            parsed.push((f, path, src));
        }
    }
    let mut g = Graph::new();
    for m in &modules {
        g.entry(m.clone()).or_default();
    }
    for (file, path, src) in parsed {
        let from = &path[0];
        for (to, line) in references(&path, &src) {
            if &to != from && modules.contains(&to) {
                g.entry(from.clone())
                    .or_default()
                    .entry(to)
                    .or_insert(Site {
                        file: file.clone(),
                        line,
                    });
            }
        }
    }
    Ok(g)
}

/// A cycle of `g`, as the modules along it (the first repeated at the end), if there is one.
pub fn find_cycle(g: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        g: &Graph,
        n: &str,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(n.to_owned(), Mark::Active);
        stack.push(n.to_owned());
        for next in g.get(n).into_iter().flat_map(|e| e.keys()) {
            match marks.get(next).copied().unwrap_or(Mark::New) {
                Mark::Active => {
                    let start = stack.iter().position(|s| s == next).unwrap_or(0);
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(g, next, marks, stack) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(n.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for n in g.keys() {
        if marks.get(n).copied().unwrap_or(Mark::New) == Mark::New {
            let mut stack = Vec::new();
            if let Some(c) = visit(g, n, &mut marks, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

/// Every way `g` breaks the layering: a cycle (with where each of its edges is), and any
/// module that imports one of `leaves` (modules nothing else may import).
pub fn violations(g: &Graph, leaves: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(cycle) = find_cycle(g) {
        let edges: Vec<String> = cycle
            .windows(2)
            .map(|w| {
                let site = &g[&w[0]][&w[1]];
                format!(
                    "{} -> {} ({}:{})",
                    w[0],
                    w[1],
                    site.file.display(),
                    site.line
                )
            })
            .collect();
        out.push(format!(
            "import cycle {}: {}",
            cycle.join(" -> "),
            edges.join("; ")
        ));
    }
    for (from, to) in g
        .iter()
        .flat_map(|(f, e)| e.iter().map(move |(t, s)| (f, (t, s))))
    {
        let (to, site) = to;
        if leaves.contains(&to.as_str()) {
            out.push(format!(
                "{from} imports {to} ({}:{}), which only the binary may use",
                site.file.display(),
                site.line
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    fn p(s: &str) -> Vec<String> {
        s.split("::").map(str::to_owned).collect()
    }

    fn names(path: &str, src: &str) -> Vec<String> {
        references(&p(path), src)
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    #[test]
    fn paths_groups_and_super_chains_name_their_top_level_module() {
        let src = r#"
            //! Mentions crate::docs in a comment, and "crate::strings" too.
            use crate::{cli::Output, services::{model, reconcile}};
            use crate::observability::metrics::Metrics;
            /* crate::blocks */
            fn f<'a>(x: &'a str) -> char { let _ = crate::bgp::speaker::start; 'c' }
            use super::rib::Best;
            mod tests {
                use super::super::wire::Segment;
                use super::*;
            }
        "#;
        assert_eq!(
            names("bgp::speaker", src),
            ["cli", "services", "observability", "bgp"],
            "super chains inside bgp stay in bgp"
        );
        // From a module right under the root, super:: reaches the root's modules; inside its
        // inline test module it is the file's own module again.
        let src =
            "use super::metrics::Metrics;\nmod tests { use super::helper; use super::super::cli; }";
        assert_eq!(names("conntrack", src), ["metrics", "cli"]);
    }

    #[test]
    fn cycles_are_found_with_their_sites_and_leaves_are_enforced() {
        let site = |l| Site {
            file: "x.rs".into(),
            line: l,
        };
        let mut g = Graph::new();
        g.entry("cli".into())
            .or_default()
            .insert("services".into(), site(1));
        g.entry("services".into())
            .or_default()
            .insert("observability".into(), site(2));
        g.entry("observability".into()).or_default();
        assert_eq!(find_cycle(&g), None);
        assert!(violations(&g, &["cli"]).is_empty());
        g.get_mut("observability")
            .unwrap()
            .insert("services".into(), site(3));
        assert_eq!(
            find_cycle(&g).unwrap(),
            ["services", "observability", "services"]
        );
        let v = violations(&g, &["cli"]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("observability -> services (x.rs:3)"), "{v:?}");
        // No cycle, but a module imports the leaf.
        let obs = g.get_mut("observability").unwrap();
        obs.clear();
        obs.insert("cli".into(), site(4));
        g.get_mut("cli").unwrap().clear();
        assert_eq!(find_cycle(&g), None);
        let v = violations(&g, &["cli"]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("observability imports cli (x.rs:4)"), "{v:?}");
    }

    #[test]
    fn the_agent_has_no_cycle_and_nothing_imports_its_cli() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/src");
        let g = graph(&src).unwrap();
        assert!(g.contains_key("cli") && g.contains_key("services"), "{g:?}");
        assert_eq!(violations(&g, &["cli"]), Vec::<String>::new());
    }
}
