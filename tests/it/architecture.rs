//! The house rules about module imports that clippy cannot check
//! (see the architecture notes: "lines that should never be crossed").
//!
//! The test reads every file under `src/`, lexes it (comments, string and char literals dropped),
//! drops `#[cfg(test)]` items (test code may reach across), and collects every path that names a
//! module of this crate: `crate::…`, `super::…`, `self::…` and paths that start with a child module
//! declared in the same file, with `use` groups (`use crate::{a, b::{c, d}}`) expanded. Each path
//! is resolved against the module it appears in and mapped to a room: a top-level module from
//! `src/lib.rs`, with `mesh/wireguard` and `mesh/tailscale` rooms of their own. Module
//! declarations (`mod x;`) are containment, not imports, and are not counted.
//!
//! The rules, one test each:
//! - no import cycle between rooms (`cli`, `main.rs` and `lib.rs` are the top of the house and
//!   left out), and nothing but `main.rs`/`lib.rs` imports `cli`;
//! - `core` imports nothing outside `core` and `config`;
//! - `mesh/wireguard` and `mesh/tailscale` import neither each other nor `services`;
//! - `api` names no provider (no path into, or through, `wireguard::`/`tailscale::`);
//! - `gpu` imports nothing of `mesh` (providers included), and `mesh` nothing of `gpu`;
//! - only `cli/` and `main.rs` print (`println!`, `print!`, `eprintln!`, `eprint!`, `dbg!`).
//!
//! Each failure lists every violation as `path:line: what`. The last tests run the checker on
//! small inline sources, so it can be seen to catch what it claims to.
//!
//! Run with `cargo test --test it architecture::`; the room graph itself with
//! `cargo test --test it architecture:: -- --ignored --nocapture`.

// Test code: the token matches below only care about one or two kinds each.
#![allow(clippy::print_stdout, clippy::wildcard_enum_match_arm)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::path::Path;
use std::sync::OnceLock;

/// Sub-modules of `mesh` that count as rooms of their own.
const PROVIDERS: [&str; 2] = ["wireguard", "tailscale"];

/// Macros that print to stdout or stderr.
const PRINT_MACROS: [&str; 5] = ["println", "print", "eprintln", "eprint", "dbg"];

// ---------------------------------------------------------------------------------------------
// Lexer
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
    /// A string, char or number literal; its text does not matter here.
    Lit,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: usize,
}

impl Token {
    fn is_ident(&self, name: &str) -> bool {
        matches!(&self.tok, Tok::Ident(s) if s == name)
    }
    fn is_punct(&self, c: char) -> bool {
        self.tok == Tok::Punct(c)
    }
    fn ident(&self) -> Option<&str> {
        match &self.tok {
            Tok::Ident(s) => Some(s),
            _ => None,
        }
    }
}

fn is_ident_start(c: char) -> bool {
    c == '_' || c.is_alphabetic()
}

fn is_ident_continue(c: char) -> bool {
    c == '_' || c.is_alphanumeric()
}

/// Splits Rust source into identifiers, `::` and punctuation, dropping comments (line, doc and
/// nested block comments) and the contents of string, byte-string, raw-string and char literals.
fn lex(src: &str) -> Vec<Token> {
    let c: Vec<char> = src.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if c[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if ch == '"' {
            let start = line;
            i = skip_string(&c, i + 1, &mut line);
            out.push(Token {
                tok: Tok::Lit,
                line: start,
            });
        } else if ch == '\'' {
            if at(i + 1) == '\\' {
                // An escaped char literal: '\n', '\'', '\u{..}'.
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
                out.push(Token {
                    tok: Tok::Lit,
                    line,
                });
            } else if at(i + 2) == '\'' {
                i += 3;
                out.push(Token {
                    tok: Tok::Lit,
                    line,
                });
            } else {
                // A lifetime or label: the name follows as an identifier.
                out.push(Token {
                    tok: Tok::Punct('\''),
                    line,
                });
                i += 1;
            }
        } else if ch.is_ascii_digit() {
            while i < c.len() && is_ident_continue(c[i]) {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Lit,
                line,
            });
        } else if is_ident_start(ch) {
            let s = i;
            while i < c.len() && is_ident_continue(c[i]) {
                i += 1;
            }
            let word: String = c[s..i].iter().collect();
            let prefix = matches!(word.as_str(), "r" | "br" | "cr");
            if prefix && (at(i) == '"' || (at(i) == '#' && (at(i + 1) == '"' || at(i + 1) == '#')))
            {
                // Raw string: r"…", r#"…"#, br##"…"##.
                let mut hashes = 0;
                while at(i) == '#' {
                    hashes += 1;
                    i += 1;
                }
                let start = line;
                i += 1; // the opening quote
                loop {
                    if i >= c.len() {
                        break;
                    }
                    if c[i] == '\n' {
                        line += 1;
                    }
                    if c[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#') {
                        i += 1 + hashes;
                        break;
                    }
                    i += 1;
                }
                out.push(Token {
                    tok: Tok::Lit,
                    line: start,
                });
            } else if word == "r" && at(i) == '#' && is_ident_start(at(i + 1)) {
                // Raw identifier r#name.
                let s = i + 1;
                i += 1;
                while i < c.len() && is_ident_continue(c[i]) {
                    i += 1;
                }
                out.push(Token {
                    tok: Tok::Ident(c[s..i].iter().collect()),
                    line,
                });
            } else if matches!(word.as_str(), "b" | "c") && at(i) == '"' {
                let start = line;
                i = skip_string(&c, i + 1, &mut line);
                out.push(Token {
                    tok: Tok::Lit,
                    line: start,
                });
            } else if word == "b" && at(i) == '\'' {
                i += 1;
                while i < c.len() && c[i] != '\'' {
                    if c[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                out.push(Token {
                    tok: Tok::Lit,
                    line,
                });
            } else {
                out.push(Token {
                    tok: Tok::Ident(word),
                    line,
                });
            }
        } else if ch == ':' && at(i + 1) == ':' {
            out.push(Token {
                tok: Tok::PathSep,
                line,
            });
            i += 2;
        } else {
            out.push(Token {
                tok: Tok::Punct(ch),
                line,
            });
            i += 1;
        }
    }
    out
}

/// Skips a (non-raw) string body starting after its opening quote; returns the index after the
/// closing quote.
fn skip_string(c: &[char], mut i: usize, line: &mut usize) -> usize {
    while i < c.len() {
        match c[i] {
            '\\' => {
                if c.get(i + 1) == Some(&'\n') {
                    *line += 1;
                }
                i += 2;
            }
            '"' => return i + 1,
            '\n' => {
                *line += 1;
                i += 1;
            }
            _ => i += 1,
        }
    }
    i
}

// ---------------------------------------------------------------------------------------------
// Dropping #[cfg(test)] items
// ---------------------------------------------------------------------------------------------

/// Index just past the bracket group that opens at `open` (`(`, `[` or `{`).
fn skip_group(t: &[Token], open: usize) -> usize {
    let mut depth = 0usize;
    let mut i = open;
    while i < t.len() {
        match t[i].tok {
            Tok::Punct('(' | '[' | '{') => depth += 1,
            Tok::Punct(')' | ']' | '}') => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    t.len()
}

/// If an attribute `#[…]` or `#![…]` starts at `i`: the index just past it, whether it is
/// `#[cfg(test)]` (or `#[cfg(all(test, …))]`), and whether it is an inner attribute.
fn attribute_at(t: &[Token], i: usize) -> Option<(usize, bool, bool)> {
    if !t.get(i)?.is_punct('#') {
        return None;
    }
    let inner = t.get(i + 1)?.is_punct('!');
    let open = if inner { i + 2 } else { i + 1 };
    if !t.get(open)?.is_punct('[') {
        return None;
    }
    let end = skip_group(t, open);
    let body = &t[open + 1..end.saturating_sub(1).max(open + 1)];
    let test_only = body.len() >= 3
        && body[0].is_ident("cfg")
        && body[1].is_punct('(')
        && ((body.len() == 4 && body[2].is_ident("test"))
            || (body[2].is_ident("all")
                && body[3..].iter().any(|tok| tok.is_ident("test"))
                && !body[3..].iter().any(|tok| tok.is_ident("not"))));
    Some((end, test_only, inner))
}

/// The end of what an attribute at `i` applies to: an item ends after its `;` or after its
/// outermost `{…}` body (a `use` item always at its `;`: its braces are a group); a field, match
/// arm or expression also ends at a `,` at its own depth. An unmatched closing bracket (the end
/// of the enclosing block) ends it too.
fn item_end(t: &[Token], i: usize) -> usize {
    const ITEM_WORDS: [&str; 12] = [
        "fn",
        "impl",
        "struct",
        "enum",
        "union",
        "trait",
        "mod",
        "use",
        "const",
        "static",
        "type",
        "macro_rules",
    ];
    let head: Vec<&Token> = t[i..]
        .iter()
        .take(8)
        .take_while(|tok| !tok.is_punct(';') && !tok.is_punct('{'))
        .collect();
    let is_use = head.iter().any(|tok| tok.is_ident("use"));
    let is_item = head
        .iter()
        .any(|tok| ITEM_WORDS.iter().any(|w| tok.is_ident(w)));
    let mut j = i;
    while j < t.len() {
        match t[j].tok {
            Tok::Punct(';') => return j + 1,
            Tok::Punct(',') if !is_item => return j + 1,
            Tok::Punct('{') if !is_use => return skip_group(t, j),
            Tok::Punct('(' | '[' | '{') => j = skip_group(t, j),
            Tok::Punct(')' | ']' | '}') => return j,
            _ => j += 1,
        }
    }
    t.len()
}

/// Removes every item under `#[cfg(test)]`. Returns the remaining tokens and the names of
/// out-of-line test modules (`#[cfg(test)] mod tests;`) together with the token index where
/// they were declared (so the caller can tell which module scope they belong to).
fn strip_test_items(t: &[Token]) -> (Vec<Token>, Vec<(usize, String)>) {
    let mut out = Vec::with_capacity(t.len());
    let mut test_mods = Vec::new();
    let mut i = 0;
    while i < t.len() {
        match attribute_at(t, i) {
            // An inner `#![cfg(test)]` makes the whole file test code.
            Some((_, true, true)) => return (Vec::new(), test_mods),
            Some((after, true, false)) => {
                let mut j = after;
                while let Some((next, _, _)) = attribute_at(t, j) {
                    j = next;
                }
                let end = item_end(t, j);
                // `mod name;`, after any visibility (`pub`, `pub(crate)`).
                let item = &t[j..end];
                if let Some(k) = item.iter().position(|x| x.is_ident("mod"))
                    && k <= 4
                    && item.len() == k + 3
                    && item[k + 2].is_punct(';')
                    && let Some(name) = item[k + 1].ident()
                {
                    test_mods.push((out.len(), name.to_owned()));
                }
                i = end;
            }
            _ => {
                out.push(t[i].clone());
                i += 1;
            }
        }
    }
    (out, test_mods)
}

// ---------------------------------------------------------------------------------------------
// Module paths and references
// ---------------------------------------------------------------------------------------------

/// One path in the source that names a module of this crate.
#[derive(Debug, Clone)]
struct Ref {
    line: usize,
    /// The path as written (a `use` group expanded), e.g. `super::super::Foo`.
    text: String,
    /// The path resolved from the crate root, e.g. `["mesh", "Foo"]`.
    target: Vec<String>,
}

/// What one source file says about its neighbours.
#[derive(Debug, Default)]
struct Analysis {
    refs: Vec<Ref>,
    /// `(line, macro)` for every print macro call.
    prints: Vec<(usize, String)>,
    /// `(line, text)` for every `wireguard::`/`tailscale::` path segment, however it is reached.
    provider_mentions: Vec<(usize, String)>,
    /// Modules declared under `#[cfg(test)]` with their own file (absolute module paths).
    test_modules: Vec<Vec<String>>,
}

/// A `use`-tree: a path with an optional `{…}` group or `*` at its end, expanded into the list
/// of full paths it names, each with the line of its last segment.
fn parse_tree(t: &[Token], mut i: usize) -> (Vec<(Vec<String>, usize)>, usize) {
    let mut prefix: Vec<String> = Vec::new();
    let mut line = t.get(i).map_or(0, |x| x.line);
    loop {
        match t.get(i) {
            Some(tok) if tok.is_punct('{') => {
                let mut paths = Vec::new();
                i += 1;
                while i < t.len() && !t[i].is_punct('}') {
                    if t[i].is_punct(',') {
                        i += 1;
                        continue;
                    }
                    let (sub, next) = parse_tree(t, i);
                    for (mut segs, l) in sub {
                        let mut full = prefix.clone();
                        full.append(&mut segs);
                        paths.push((full, l));
                    }
                    if next == i {
                        i += 1; // not a path: skip it rather than loop
                    } else {
                        i = next;
                    }
                }
                return (paths, (i + 1).min(t.len()));
            }
            Some(tok) if tok.is_punct('*') => {
                return (vec![(prefix, tok.line)], i + 1);
            }
            Some(Token {
                tok: Tok::Ident(name),
                line: l,
            }) => {
                prefix.push(name.clone());
                line = *l;
                i += 1;
                if t.get(i).is_some_and(|x| x.tok == Tok::PathSep) {
                    i += 1;
                    continue;
                }
                // `as alias`: the alias is a local name, not part of the path.
                if t.get(i).is_some_and(|x| x.is_ident("as")) {
                    i += 2;
                }
                return (vec![(prefix, line)], i);
            }
            _ => {
                let paths = if prefix.is_empty() {
                    Vec::new()
                } else {
                    vec![(prefix, line)]
                };
                return (paths, i);
            }
        }
    }
}

/// Resolves a path written in `module` to a path from the crate root; `None` when it does not
/// name this crate (or climbs above the root).
fn resolve(module: &[String], children: &BTreeSet<String>, segs: &[String]) -> Option<Vec<String>> {
    let first = segs.first()?;
    let mut base: Vec<String> = match first.as_str() {
        "crate" => Vec::new(),
        "self" => module.to_vec(),
        "super" => {
            let mut m = module.to_vec();
            m.pop()?;
            m
        }
        name if children.contains(name) => {
            let mut m = module.to_vec();
            m.push(name.to_owned());
            m
        }
        _ => return None,
    };
    let mut rest = segs[1..].iter().peekable();
    while let Some(seg) = rest.peek() {
        match seg.as_str() {
            "super" => {
                base.pop()?;
            }
            "self" => {}
            _ => break,
        }
        rest.next();
    }
    for seg in rest {
        if seg != "self" {
            base.push(seg.clone());
        }
    }
    Some(base)
}

/// Analyses one file whose module path is `module` (e.g. `["mesh", "wireguard", "link"]`).
fn analyze(src: &str, module: &[String]) -> Analysis {
    let (t, test_mods) = strip_test_items(&lex(src));
    let mut a = Analysis::default();

    // Module scopes: inline `mod name { … }` blocks nest the module path. First pass: the
    // modules declared in each scope (a path may name a child declared further down).
    let (scope_at, scope_paths) = module_scopes(&t, module);
    let scope = |i: usize| -> &Vec<String> {
        scope_at
            .get(i)
            .map_or(&scope_paths[0], |&k| &scope_paths[k])
    };
    let mut children: BTreeMap<Vec<String>, BTreeSet<String>> = BTreeMap::new();
    for i in 0..t.len() {
        if t[i].is_ident("mod")
            && (i == 0 || t[i - 1].tok != Tok::PathSep)
            && let (Some(name), Some(next)) = (t.get(i + 1).and_then(Token::ident), t.get(i + 2))
            && (next.is_punct(';') || next.is_punct('{'))
        {
            children
                .entry(scope(i).clone())
                .or_default()
                .insert(name.to_owned());
        }
    }
    for (idx, name) in test_mods {
        let mut m = scope(idx).clone();
        m.push(name);
        a.test_modules.push(m);
    }

    for (i, tok) in t.iter().enumerate() {
        if let Some(name) = tok.ident()
            && PROVIDERS.contains(&name)
            && (t.get(i + 1).is_some_and(|x| x.tok == Tok::PathSep)
                || (i > 0 && t[i - 1].tok == Tok::PathSep))
        {
            a.provider_mentions
                .push((tok.line, format!("{name}:: path")));
        }
    }

    let empty = BTreeSet::new();
    let mut i = 0;
    while i < t.len() {
        let prev_joins = i > 0 && (t[i - 1].tok == Tok::PathSep || t[i - 1].is_punct('.'));
        let here = scope(i);
        let kids = children.get(here).unwrap_or(&empty);
        if let Some(name) = t[i].ident() {
            if PRINT_MACROS.contains(&name)
                && t.get(i + 1).is_some_and(|x| x.is_punct('!'))
                && !(i > 0 && t[i - 1].is_ident("macro_rules"))
            {
                a.prints.push((t[i].line, format!("{name}!")));
            }
            let starts_path = !prev_joins
                && t.get(i + 1).is_some_and(|x| x.tok == Tok::PathSep)
                && (matches!(name, "crate" | "super" | "self") || kids.contains(name));
            if starts_path {
                let (paths, next) = parse_tree(&t, i);
                for (segs, line) in paths {
                    if let Some(target) = resolve(here, kids, &segs) {
                        a.refs.push(Ref {
                            line,
                            text: segs.join("::"),
                            target,
                        });
                    }
                }
                i = next.max(i + 1);
                continue;
            }
        }
        i += 1;
    }
    a
}

/// The module path in effect at each token, following inline `mod name { … }` blocks: one
/// index per token into the returned list of module paths.
fn module_scopes(t: &[Token], module: &[String]) -> (Vec<usize>, Vec<Vec<String>>) {
    let mut paths = vec![module.to_vec()];
    let mut at = Vec::with_capacity(t.len());
    // (index of the enclosing scope, brace depth at which this module's block closes)
    let mut open: Vec<(usize, usize)> = Vec::new();
    let mut current = 0;
    let mut depth = 0usize;
    let mut pending: Option<String> = None;
    for (i, tok) in t.iter().enumerate() {
        at.push(current);
        match tok.tok {
            Tok::Punct('{') => {
                depth += 1;
                if let Some(name) = pending.take() {
                    let mut path = paths[current].clone();
                    path.push(name);
                    open.push((current, depth));
                    paths.push(path);
                    current = paths.len() - 1;
                }
            }
            Tok::Punct('}') => {
                if let Some(&(outer, d)) = open.last()
                    && d == depth
                {
                    open.pop();
                    current = outer;
                }
                depth = depth.saturating_sub(1);
            }
            _ => {
                if tok.is_ident("mod")
                    && let (Some(name), Some(next)) =
                        (t.get(i + 1).and_then(Token::ident), t.get(i + 2))
                    && next.is_punct('{')
                {
                    pending = Some(name.to_owned());
                }
            }
        }
    }
    (at, paths)
}

// ---------------------------------------------------------------------------------------------
// The house
// ---------------------------------------------------------------------------------------------

struct SourceFile {
    /// Path from the crate root, e.g. `src/mesh/wireguard/link.rs`.
    path: String,
    /// `main`, `lib`, or the room the file belongs to.
    room: String,
    analysis: Analysis,
}

struct House {
    rooms: BTreeSet<String>,
    files: Vec<SourceFile>,
}

/// The room a module path belongs to; `None` for the crate root.
fn room_of(rooms: &BTreeSet<String>, module: &[String]) -> Option<String> {
    let first = module.first()?;
    if first == "mesh"
        && let Some(sub) = module.get(1)
        && PROVIDERS.contains(&sub.as_str())
    {
        return Some(format!("mesh/{sub}"));
    }
    rooms.contains(first).then(|| first.clone())
}

/// The top-level modules declared in `lib.rs` (test-only ones left out), plus the provider rooms.
fn rooms_from_lib(lib_src: &str) -> BTreeSet<String> {
    let (t, _) = strip_test_items(&lex(lib_src));
    let mut rooms = BTreeSet::new();
    let mut depth = 0usize;
    for (i, tok) in t.iter().enumerate() {
        match tok.tok {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth == 0
            && tok.is_ident("mod")
            && let Some(name) = t.get(i + 1).and_then(Token::ident)
        {
            rooms.insert(name.to_owned());
        }
    }
    if rooms.contains("mesh") {
        for p in PROVIDERS {
            rooms.insert(format!("mesh/{p}"));
        }
    }
    rooms
}

/// The module path of a file under `src/`, e.g. `mesh/wireguard/mod.rs` → `[mesh, wireguard]`.
fn module_of(rel: &str) -> Vec<String> {
    let rel = rel.strip_suffix(".rs").unwrap_or(rel);
    let mut parts: Vec<String> = rel.split('/').map(str::to_owned).collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

fn collect_rs(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// Builds the house from `(path under src/, source)` pairs.
fn house_from(sources: &[(String, String)]) -> House {
    let lib = sources
        .iter()
        .find(|(p, _)| p == "lib.rs")
        .map_or("", |(_, s)| s.as_str());
    let fields = "struct S {\n    #[cfg(test)]\n    hidden: crate::gpu::X,\n    seen: crate::a::Y,\n}\n\
                  fn f() { match 1 { #[cfg(test)] 0 => crate::gpu::z(), _ => crate::b::w() } }";
    let targets: Vec<String> = analyze(fields, &[])
        .refs
        .iter()
        .map(|r| r.target.join("::"))
        .collect();
    assert_eq!(targets, ["a::Y", "b::w"]);

    let rooms = rooms_from_lib(lib);
    let mut analysed: Vec<(String, Vec<String>, Analysis)> = sources
        .iter()
        .map(|(rel, src)| {
            let module = if rel == "main.rs" || rel == "lib.rs" {
                Vec::new()
            } else {
                module_of(rel)
            };
            let analysis = analyze(src, &module);
            (rel.clone(), module, analysis)
        })
        .collect();
    // Files of test-only modules (`#[cfg(test)] mod tests;`) are test code: leave them out.
    let test_modules: Vec<Vec<String>> = analysed
        .iter()
        .flat_map(|(_, _, a)| a.test_modules.clone())
        .collect();
    analysed.retain(|(rel, module, _)| {
        !(rel != "main.rs" && rel != "lib.rs" && test_modules.iter().any(|t| module.starts_with(t)))
    });
    let files = analysed
        .into_iter()
        .map(|(rel, module, analysis)| {
            let room = match rel.as_str() {
                "main.rs" => "main".to_owned(),
                "lib.rs" => "lib".to_owned(),
                _ => room_of(&rooms, &module).unwrap_or_else(|| "lib".to_owned()),
            };
            SourceFile {
                path: format!("src/{rel}"),
                room,
                analysis,
            }
        })
        .collect();
    House { rooms, files }
}

/// The house as `src/` has it, read once for all tests.
fn house() -> &'static House {
    static HOUSE: OnceLock<House> = OnceLock::new();
    HOUSE.get_or_init(load_house)
}

fn load_house() -> House {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    collect_rs(&src, &mut paths);
    paths.sort();
    let sources: Vec<(String, String)> = paths
        .iter()
        .map(|p| {
            let rel = p
                .strip_prefix(&src)
                .unwrap_or(p)
                .to_string_lossy()
                .replace('\\', "/");
            let text =
                fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            (rel, text)
        })
        .collect();
    house_from(&sources)
}

/// One import from one room into another.
struct Edge<'a> {
    file: &'a SourceFile,
    to: String,
    r: &'a Ref,
}

impl House {
    /// Every reference from a file into a room other than its own.
    fn edges(&self) -> Vec<Edge<'_>> {
        let mut edges = Vec::new();
        for file in &self.files {
            for r in &file.analysis.refs {
                if let Some(to) = room_of(&self.rooms, &r.target)
                    && to != file.room
                {
                    edges.push(Edge { file, to, r });
                }
            }
        }
        edges
    }

    fn files_in<'a>(&'a self, room: &'a str) -> impl Iterator<Item = &'a SourceFile> {
        self.files.iter().filter(move |f| f.room == room)
    }
}

fn describe(e: &Edge<'_>) -> String {
    format!(
        "{}:{}: {} imports {} ({})",
        e.file.path, e.r.line, e.file.room, e.to, e.r.text
    )
}

// ---------------------------------------------------------------------------------------------
// The rules, each returning its violations as `path:line: what`
// ---------------------------------------------------------------------------------------------

/// Rooms that may import anything (the top of the house).
fn is_top(room: &str) -> bool {
    matches!(room, "cli" | "main" | "lib")
}

fn cycle_violations(house: &House) -> Vec<String> {
    // room -> room -> the references that make the edge
    let mut graph: BTreeMap<&str, BTreeMap<&str, Vec<&Edge<'_>>>> = BTreeMap::new();
    let edges = house.edges();
    for e in &edges {
        if is_top(&e.file.room) || is_top(&e.to) {
            continue;
        }
        graph
            .entry(e.file.room.as_str())
            .or_default()
            .entry(e.to.as_str())
            .or_default()
            .push(e);
    }
    let nodes: BTreeSet<&str> = graph
        .iter()
        .flat_map(|(from, tos)| std::iter::once(*from).chain(tos.keys().copied()))
        .collect();
    let succ = |n: &str| -> Vec<&str> {
        graph
            .get(n)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    };
    // The shortest path from `from` to `to` (breadth first, in name order for stable output).
    let shortest = |from: &str, to: &str| -> Option<Vec<String>> {
        let mut prev: BTreeMap<String, String> = BTreeMap::new();
        let mut queue = VecDeque::from([from.to_owned()]);
        let mut seen = BTreeSet::from([from.to_owned()]);
        while let Some(n) = queue.pop_front() {
            if n == to {
                let mut path = vec![n.clone()];
                let mut cur = n;
                while let Some(p) = prev.get(&cur) {
                    path.push(p.clone());
                    cur = p.clone();
                }
                path.reverse();
                return Some(path);
            }
            for s in succ(&n) {
                if seen.insert(s.to_owned()) {
                    prev.insert(s.to_owned(), n.clone());
                    queue.push_back(s.to_owned());
                }
            }
        }
        None
    };
    // One shortest cycle through every edge that lies on a cycle, rotations folded together.
    let mut cycles: BTreeSet<Vec<String>> = BTreeSet::new();
    for from in &nodes {
        for to in succ(from) {
            if let Some(back) = shortest(to, from) {
                let mut cycle = vec![(*from).to_owned()];
                cycle.extend(back.into_iter().take_while(|n| n != from));
                let min = (0..cycle.len())
                    .min_by_key(|&k| &cycle[k])
                    .unwrap_or_default();
                cycle.rotate_left(min);
                cycles.insert(cycle);
            }
        }
    }
    let mut out = Vec::new();
    for cycle in &cycles {
        let mut names = cycle.clone();
        names.push(cycle[0].clone());
        out.push(format!("import cycle: {}", names.join(" -> ")));
        for pair in names.windows(2) {
            let refs = &graph[pair[0].as_str()][pair[1].as_str()];
            let more = match refs.len() - 1 {
                0 => String::new(),
                n => format!(" [and {n} more]"),
            };
            out.push(format!("    {}{more}", describe(refs[0])));
        }
    }
    if !cycles.is_empty() {
        out.push("every import on a cycle:".to_owned());
        let on_cycle: BTreeSet<(&str, &str)> = cycles
            .iter()
            .flat_map(|c| (0..c.len()).map(move |k| (c[k].as_str(), c[(k + 1) % c.len()].as_str())))
            .collect();
        for (from, to) in on_cycle {
            for e in &graph[from][to] {
                out.push(format!("    {}", describe(e)));
            }
        }
    }
    out
}

fn cli_import_violations(house: &House) -> Vec<String> {
    house
        .edges()
        .iter()
        .filter(|e| e.to == "cli" && !is_top(&e.file.room))
        .map(describe)
        .collect()
}

fn core_violations(house: &House) -> Vec<String> {
    house
        .edges()
        .iter()
        .filter(|e| e.file.room == "core" && e.to != "config")
        .map(describe)
        .collect()
}

fn provider_violations(house: &House) -> Vec<String> {
    house
        .edges()
        .iter()
        .filter(|e| {
            let from = e.file.room.as_str();
            let to = e.to.as_str();
            matches!(from, "mesh/wireguard" | "mesh/tailscale")
                && (to == "services" || matches!(to, "mesh/wireguard" | "mesh/tailscale"))
        })
        .map(describe)
        .collect()
}

fn api_provider_violations(house: &House) -> Vec<String> {
    let mut found: BTreeSet<(String, usize, String)> = BTreeSet::new();
    for e in house.edges() {
        if e.file.room == "api" && e.to.starts_with("mesh/") {
            found.insert((
                e.file.path.clone(),
                e.r.line,
                format!("api names provider {} ({})", e.to, e.r.text),
            ));
        }
    }
    for file in house.files_in("api") {
        for (line, what) in &file.analysis.provider_mentions {
            if !found.iter().any(|(p, l, _)| *p == file.path && l == line) {
                found.insert((
                    file.path.clone(),
                    *line,
                    format!("api names a provider ({what})"),
                ));
            }
        }
    }
    found
        .into_iter()
        .map(|(path, line, what)| format!("{path}:{line}: {what}"))
        .collect()
}

fn gpu_mesh_violations(house: &House) -> Vec<String> {
    house
        .edges()
        .iter()
        .filter(|e| {
            let from_mesh = e.file.room == "mesh" || e.file.room.starts_with("mesh/");
            let to_mesh = e.to == "mesh" || e.to.starts_with("mesh/");
            (e.file.room == "gpu" && to_mesh) || (from_mesh && e.to == "gpu")
        })
        .map(describe)
        .collect()
}

fn print_violations(house: &House) -> Vec<String> {
    house
        .files
        .iter()
        .filter(|f| f.room != "cli" && f.room != "main")
        .flat_map(|f| {
            f.analysis
                .prints
                .iter()
                .map(move |(line, mac)| format!("{}:{line}: {} prints ({mac})", f.path, f.room))
        })
        .collect()
}

#[track_caller]
fn assert_clean(rule: &str, violations: &[String]) {
    assert!(
        violations.is_empty(),
        "{rule}:\n{}\n",
        violations.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Tests: one per rule
// ---------------------------------------------------------------------------------------------

#[test]
fn there_is_no_import_cycle_between_rooms() {
    let house = house();
    assert_clean(
        "no import cycle between rooms (cli and main.rs left out)",
        &cycle_violations(house),
    );
}

#[test]
fn nothing_but_main_imports_cli() {
    let house = house();
    assert_clean(
        "nothing imports cli except main.rs and lib.rs",
        &cli_import_violations(house),
    );
}

#[test]
fn core_imports_nothing_but_core_and_config() {
    let house = house();
    assert_clean(
        "core imports nothing outside core and config",
        &core_violations(house),
    );
}

#[test]
fn wireguard_and_tailscale_import_neither_each_other_nor_services() {
    let house = house();
    assert_clean(
        "mesh/wireguard and mesh/tailscale import neither each other nor services",
        &provider_violations(house),
    );
}

#[test]
fn api_names_no_provider() {
    let house = house();
    assert_clean(
        "api names no provider (mesh::wireguard, mesh::tailscale)",
        &api_provider_violations(house),
    );
}

#[test]
fn gpu_knows_nothing_of_the_mesh_and_mesh_nothing_of_gpus() {
    let house = house();
    assert_clean(
        "gpu imports no mesh, mesh imports no gpu",
        &gpu_mesh_violations(house),
    );
}

#[test]
fn only_cli_and_main_print() {
    let house = house();
    assert_clean(
        "only cli/ and main.rs print (println!, print!, eprintln!, eprint!, dbg!)",
        &print_violations(house),
    );
}

/// The walk itself finds the house: every room from lib.rs has files, and the provider rooms
/// are told apart from `mesh`.
#[test]
fn the_checker_sees_every_room() {
    let house = house();
    let with_files: BTreeSet<&str> = house.files.iter().map(|f| f.room.as_str()).collect();
    let missing: Vec<&String> = house
        .rooms
        .iter()
        .filter(|r| !with_files.contains(r.as_str()))
        .collect();
    assert!(missing.is_empty(), "rooms without files: {missing:?}");
    for room in ["core", "mesh", "mesh/wireguard", "mesh/tailscale", "cli"] {
        assert!(
            house.rooms.contains(room),
            "no room {room}: {:?}",
            house.rooms
        );
    }
    assert!(
        house.files.iter().all(|f| f.path != "src/config/tests.rs"),
        "a #[cfg(test)] mod's own file must be left out"
    );
}

// ---------------------------------------------------------------------------------------------
// Self-test of the checker on small inline sources
// ---------------------------------------------------------------------------------------------

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn the_parser_reads_groups_and_super_paths_and_skips_tests_comments_and_strings() {
    let src = r##"
//! Docs name [`Hidden`](crate::gpu::Hidden).
// use crate::gpu::Commented;
/* use crate::gpu::Block; /* nested */ use crate::gpu::StillBlock; */
use crate::{a, b::{c, d as e}};
use super::super::Up;
use super::{self, Sibling};
/// use crate::gpu::DocComment;
fn f<'a>(x: &'a str) -> char {
    let _ = "crate::gpu::InString";
    let _ = r#"crate::gpu::InRawString"#;
    crate::mesh::tailscale::Client::new();
    status::Thing::default();
    '"'
}
mod status;
#[cfg(test)]
mod tests {
    use crate::gpu::InTests;
    fn g() { println!("{}", '}'); }
}
#[cfg(test)]
mod more_tests;
#[cfg(test)]
use crate::gpu::TestOnlyUse;
"##;
    let module = strings(&["mesh", "wireguard", "link"]);
    let a = analyze(src, &module);
    let targets: Vec<String> = a.refs.iter().map(|r| r.target.join("::")).collect();
    assert_eq!(
        targets,
        [
            "a",
            "b::c",
            "b::d",
            "mesh::Up",
            "mesh::wireguard",
            "mesh::wireguard::Sibling",
            "mesh::tailscale::Client::new",
            "mesh::wireguard::link::status::Thing::default",
        ],
        "refs: {:#?}",
        a.refs
    );
    let lines: Vec<usize> = a.refs.iter().map(|r| r.line).collect();
    assert_eq!(lines, [5, 5, 5, 6, 7, 7, 12, 13]);
    assert!(
        a.prints.is_empty(),
        "println! in a test block: {:?}",
        a.prints
    );
    assert_eq!(
        a.test_modules,
        [strings(&["mesh", "wireguard", "link", "more_tests"])]
    );
    assert_eq!(a.provider_mentions.len(), 1);

    let rooms = rooms_from_lib("pub mod a;\nmod mesh;\n#[cfg(test)]\nmod t;\n");
    assert_eq!(
        rooms.iter().map(String::as_str).collect::<Vec<_>>(),
        ["a", "mesh", "mesh/tailscale", "mesh/wireguard"]
    );
    assert_eq!(
        room_of(&rooms, &strings(&["mesh", "wireguard", "x"])).as_deref(),
        Some("mesh/wireguard")
    );
    assert_eq!(
        room_of(&rooms, &strings(&["mesh", "Hooks"])).as_deref(),
        Some("mesh")
    );
    assert_eq!(
        module_of("mesh/wireguard/mod.rs"),
        strings(&["mesh", "wireguard"])
    );
}

#[test]
fn the_checker_fails_on_violations() {
    let file = |p: &str, s: &str| (p.to_owned(), s.to_owned());
    let bad = house_from(&[
        file(
            "lib.rs",
            "pub mod api; pub mod cli; pub mod config; pub mod core; pub mod gpu; pub mod mesh;\n\
             pub mod services;",
        ),
        file(
            "main.rs",
            "fn main() { println!(\"fine\"); clawnode::cli::run(); }",
        ),
        file(
            "cli/mod.rs",
            "pub fn run() { println!(\"fine\"); crate::api::x(); }",
        ),
        file("config/mod.rs", "use crate::api::Doc;\n"),
        file(
            "core/mod.rs",
            "use crate::config::Config;\nuse crate::{gpu::Probe};\n",
        ),
        file(
            "gpu/mod.rs",
            "use crate::core::Model;\n\nuse crate::mesh::Live;\n",
        ),
        file(
            "mesh/mod.rs",
            "pub mod wireguard;\npub mod tailscale;\nfn f() { wireguard::X::new(); }\n",
        ),
        file(
            "mesh/wireguard/mod.rs",
            "use super::{Live, tailscale::Ts};\nuse crate::services::S;\nuse crate::gpu;\n",
        ),
        file("mesh/tailscale/mod.rs", "// use crate::services::S;\n"),
        file(
            "api/mod.rs",
            "use crate::config;\nuse crate::mesh;\nfn f() { mesh::tailscale::x(); eprintln!(); }\n\
             fn g() { crate::cli::run(); }\n",
        ),
        file(
            "services/mod.rs",
            "#[cfg(test)]\nmod tests { fn t() { dbg!(1); } }\n",
        ),
    ]);
    assert_eq!(
        cycle_violations(&bad)[..3],
        [
            "import cycle: api -> config -> api",
            "    src/api/mod.rs:1: api imports config (crate::config)",
            "    src/config/mod.rs:1: config imports api (crate::api::Doc)",
        ]
    );
    assert!(
        cycle_violations(&bad)
            .iter()
            .any(|v| v == "import cycle: mesh -> mesh/wireguard -> mesh"),
        "{:#?}",
        cycle_violations(&bad)
    );
    assert_eq!(
        cli_import_violations(&bad),
        ["src/api/mod.rs:4: api imports cli (crate::cli::run)"]
    );
    assert_eq!(
        core_violations(&bad),
        ["src/core/mod.rs:2: core imports gpu (crate::gpu::Probe)"]
    );
    assert_eq!(
        provider_violations(&bad),
        [
            "src/mesh/wireguard/mod.rs:1: mesh/wireguard imports mesh/tailscale (super::tailscale::Ts)",
            "src/mesh/wireguard/mod.rs:2: mesh/wireguard imports services (crate::services::S)",
        ]
    );
    assert_eq!(
        api_provider_violations(&bad),
        ["src/api/mod.rs:3: api names a provider (tailscale:: path)"]
    );
    assert_eq!(
        gpu_mesh_violations(&bad),
        [
            "src/gpu/mod.rs:3: gpu imports mesh (crate::mesh::Live)",
            "src/mesh/wireguard/mod.rs:3: mesh/wireguard imports gpu (crate::gpu)",
        ]
    );
    assert_eq!(
        print_violations(&bad),
        ["src/api/mod.rs:3: api prints (eprintln!)"]
    );
}

/// Not a rule: prints the room graph with a count of references per edge
/// (`cargo test --test it architecture:: -- --ignored --nocapture`).
#[test]
#[ignore = "prints the room graph; run by hand"]
fn print_the_room_graph() {
    let house = house();
    let mut graph: BTreeMap<(&str, String), (usize, String)> = BTreeMap::new();
    for e in house.edges() {
        let entry = graph
            .entry((e.file.room.as_str(), e.to.clone()))
            .or_insert_with(|| (0, format!("{}:{}", e.file.path, e.r.line)));
        entry.0 += 1;
    }
    for ((from, to), (n, example)) in graph {
        println!("{from:>16} -> {to:<16} {n:>3}  e.g. {example}");
    }
}
