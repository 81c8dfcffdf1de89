//! The import-circle check (`cargo xtask imports`, and a lint stage of `cargo xtask test`): no two modules of a
//! crate may use each other, directly or round a longer circle.
//!
//! Each crate root (`src/lib.rs`, `src/main.rs`, `src/bin/*.rs`) is followed through its `mod name;` declarations
//! to the module files. A `crate::` or `super::` path in a file (outside comments and a trailing `#[cfg(test)]`
//! module) is an edge from its module to the deepest module the path names. Edges count between siblings: an
//! edge from `a::x` to `b::y` is one from `a` to `b`; a module using its own ancestors or descendants is not a
//! circle (a parent declares its children, a child's tests use `super::*`). A circle is a strongly connected set
//! of sibling modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A module path inside one crate, `[]` for the root.
type Module = Vec<String>;

/// One crate's modules and the edges between sibling modules.
#[derive(Debug, Default)]
pub struct Graph {
    /// Every module, with the sibling modules it uses.
    edges: BTreeMap<Module, BTreeSet<Module>>,
}

impl Graph {
    /// Reads the crate whose root file is `root`.
    pub fn read(root: &Path) -> Result<Self> {
        let mut sources = BTreeMap::new();
        collect(root, root_dir(root), Vec::new(), &mut sources)?;
        Ok(Self::from_sources(&sources))
    }

    /// Builds the graph from module sources (module path -> text).
    pub fn from_sources(sources: &BTreeMap<Module, String>) -> Self {
        let mut edges: BTreeMap<Module, BTreeSet<Module>> = sources
            .keys()
            .map(|m| (m.clone(), BTreeSet::new()))
            .collect();
        for (module, text) in sources {
            for path in used_paths(module, &code_of(text)) {
                let target = deepest_module(&path, sources);
                if let Some((from, to)) = siblings(module, &target) {
                    edges.entry(from).or_default().insert(to);
                }
            }
        }
        Self { edges }
    }

    /// The circles: each set of two or more modules that reach each other, as `a::b`-style names.
    pub fn circles(&self) -> Vec<Vec<String>> {
        let modules: Vec<&Module> = self.edges.keys().collect();
        let reach = |start: &Module| -> BTreeSet<Module> {
            let mut seen = BTreeSet::new();
            let mut stack = vec![start.clone()];
            while let Some(next) = stack.pop() {
                for to in self.edges.get(&next).into_iter().flatten() {
                    if seen.insert(to.clone()) {
                        stack.push(to.clone());
                    }
                }
            }
            seen
        };
        let reached: BTreeMap<&Module, BTreeSet<Module>> =
            modules.iter().map(|m| (*m, reach(m))).collect();
        let mut placed = BTreeSet::new();
        let mut circles = Vec::new();
        for module in &modules {
            if placed.contains(*module) || !reached[module].contains(*module) {
                continue;
            }
            let circle: Vec<&Module> = modules
                .iter()
                .copied()
                .filter(|other| {
                    reached[module].contains(*other) && reached[other].contains(*module)
                })
                .collect();
            placed.extend(circle.iter().map(|m| (*m).clone()));
            circles.push(circle.iter().map(|m| m.join("::")).collect());
        }
        circles
    }
}

/// Checks every crate of the workspace at `root`; the error names each circle.
pub fn check_workspace(root: &Path) -> Result<()> {
    let mut found = Vec::new();
    for crate_root in crate_roots(root)? {
        for circle in Graph::read(&crate_root)?.circles() {
            let shown = crate_root
                .strip_prefix(root)
                .unwrap_or(&crate_root)
                .display()
                .to_string();
            found.push(format!("{shown}: {}", circle.join(" <-> ")));
        }
    }
    if found.is_empty() {
        println!("no import circle between the modules of any crate");
        return Ok(());
    }
    anyhow::bail!("import circles between modules:\n  {}", found.join("\n  "))
}

/// The crate roots of every workspace member (a directory with `Cargo.toml` and `src/`).
fn crate_roots(root: &Path) -> Result<Vec<PathBuf>> {
    let mut roots = Vec::new();
    let entries = std::fs::read_dir(root).with_context(|| format!("reading {}", root.display()))?;
    let mut members: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    members.sort();
    for member in members {
        let src = member.join("src");
        if !member.join("Cargo.toml").is_file() || !src.is_dir() {
            continue;
        }
        for name in ["lib.rs", "main.rs"] {
            if src.join(name).is_file() {
                roots.push(src.join(name));
            }
        }
        if let Ok(bins) = std::fs::read_dir(src.join("bin")) {
            let mut bins: Vec<PathBuf> = bins.filter_map(|e| e.ok().map(|e| e.path())).collect();
            bins.sort();
            roots.extend(
                bins.into_iter()
                    .filter(|p| p.extension().is_some_and(|e| e == "rs")),
            );
        }
    }
    Ok(roots)
}

/// The directory a root file's child modules live in.
fn root_dir(root: &Path) -> PathBuf {
    root.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Reads `file` as `module`, then the child modules it declares (`mod name;`), found in `dir`.
fn collect(
    file: &Path,
    dir: PathBuf,
    module: Module,
    sources: &mut BTreeMap<Module, String>,
) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    for child in declared_modules(&text) {
        let (flat, nested) = (
            dir.join(format!("{child}.rs")),
            dir.join(&child).join("mod.rs"),
        );
        let mut path = module.clone();
        path.push(child.clone());
        if flat.is_file() {
            collect(&flat, dir.join(&child), path, sources)?;
        } else if nested.is_file() {
            collect(&nested, dir.join(&child), path, sources)?;
        }
    }
    sources.insert(module, text);
    Ok(())
}

/// The names of `mod name;` declarations (file modules, not inline ones).
fn declared_modules(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line.strip_prefix("pub ").unwrap_or(line);
            let rest = match rest.strip_prefix("pub(") {
                Some(after) => after.split_once(") ").map_or(rest, |(_, r)| r),
                None => rest,
            };
            let name = rest.strip_prefix("mod ")?.strip_suffix(';')?;
            is_identifier(name).then(|| name.to_owned())
        })
        .collect()
}

/// The code of a file: without `//` comment lines and without a `#[cfg(test)]` module from its start to the end.
fn code_of(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim();
        if trimmed == "#[cfg(test)]"
            && lines.peek().is_some_and(|next| {
                next.trim_start().starts_with("mod ") && next.trim_end().ends_with('{')
            })
        {
            break;
        }
        if !trimmed.starts_with("//") {
            code.push_str(line);
            code.push('\n');
        }
    }
    code
}

/// Every `crate::` and `super::` path in `code`, made absolute from `module`; brace groups give one path each.
fn used_paths(module: &Module, code: &str) -> Vec<Module> {
    let mut paths = Vec::new();
    let bytes = code.as_bytes();
    for start in 0..bytes.len() {
        if !code.is_char_boundary(start) {
            continue;
        }
        if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            continue;
        }
        let rest = &code[start..];
        let (base, after) = if let Some(after) = rest.strip_prefix("crate::") {
            (Vec::new(), after)
        } else if rest.starts_with("super::") && (start < 2 || &bytes[start - 2..start] != b"::") {
            let mut base = module.clone();
            let mut after = rest;
            while let Some(next) = after.strip_prefix("super::") {
                base.pop();
                after = next;
            }
            (base, after)
        } else {
            continue;
        };
        path_tails(after, &mut |tail| {
            let mut path = base.clone();
            path.extend(tail);
            paths.push(path);
        });
    }
    paths
}

/// Calls `found` with the segments of the path at the start of `text`, once per member of a brace group.
fn path_tails(text: &str, found: &mut dyn FnMut(Vec<String>)) {
    let mut segments = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item_start = 0;
            for (index, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' | ',' if depth == 1 => {
                        let item = &group[item_start..index];
                        path_tails(item, &mut |tail| {
                            let mut path = segments.clone();
                            path.extend(tail);
                            found(path);
                        });
                        item_start = index + 1;
                        if c == '}' {
                            return;
                        }
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            return;
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        segments.push(rest[..end].to_owned());
        match rest[end..].strip_prefix("::") {
            Some(next) => rest = next,
            None => break,
        }
    }
    found(segments);
}

/// The deepest known module that `path` starts with.
fn deepest_module(path: &[String], sources: &BTreeMap<Module, String>) -> Module {
    (0..=path.len())
        .rev()
        .map(|len| path[..len].to_vec())
        .find(|prefix| sources.contains_key(prefix))
        .unwrap_or_default()
}

/// The sibling modules an edge from `from` to `to` joins (their ancestors just below the common one), or `None`
/// when one is the other's ancestor.
fn siblings(from: &Module, to: &Module) -> Option<(Module, Module)> {
    let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
    if common == from.len() || common == to.len() {
        return None;
    }
    Some((from[..=common].to_vec(), to[..=common].to_vec()))
}

fn is_identifier(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(files: &[(&str, &str)]) -> Graph {
        let sources = files
            .iter()
            .map(|(module, text)| {
                let path: Module = module
                    .split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                (path, (*text).to_owned())
            })
            .collect();
        Graph::from_sources(&sources)
    }

    #[test]
    fn a_circle_of_three_modules_is_found() {
        let circles = graph(&[
            ("", "mod a;\nmod b;\nmod c;\n"),
            ("a", "use crate::b::Thing;\n"),
            ("b", "use crate::{c::Other, a};\n"),
            ("c", "fn f() { crate::a::go(); }\n"),
        ])
        .circles();
        assert_eq!(circles, vec![vec!["a".to_owned(), "b".into(), "c".into()]]);
    }

    #[test]
    fn a_circle_through_super_between_nested_modules_is_found() {
        let circles = graph(&[
            ("", "mod node;\n"),
            ("node", "mod attach;\nmod recover;\n"),
            ("node::attach", "use super::recover::again;\n"),
            ("node::recover", "use super::super::node::attach::Step;\n"),
        ])
        .circles();
        assert_eq!(
            circles,
            vec![vec!["node::attach".to_owned(), "node::recover".into()]]
        );
    }

    #[test]
    fn one_way_uses_parents_children_tests_and_comments_are_no_circle() {
        let circles = graph(&[
            ("", "mod a;\nmod b;\nuse a::X;\n"),
            ("a", "mod tests;\nuse crate::b::Y;\nuse super::b;\n"),
            ("a::tests", "use super::*;\nuse crate::a::X;\n"),
            ("b", "//! see [`crate::a`]\nuse crate::X;\n#[cfg(test)]\nmod tests {\n    use crate::a::X;\n}\n"),
        ])
        .circles();
        assert!(circles.is_empty(), "{circles:?}");
    }

    #[test]
    fn no_crate_of_the_workspace_has_an_import_circle() {
        let root = crate::suite::workspace_root().unwrap();
        check_workspace(&root).unwrap();
    }
}
