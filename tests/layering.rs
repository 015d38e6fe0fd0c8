//! The core crate's top-level modules form layers: none may depend, directly or through
//! others, on one that depends on it. This test reads every source file of `src/`, collects the
//! top-level modules each names (`crate::x`, or `super::x` from a top-level file), and fails
//! on a cycle, printing it. Test modules (`#[cfg(test)]`) are left out: a test may reach across
//! layers to build its fixtures.
//!
//! Why a test and not `cargo modules dependencies --acyclic`: that tool builds rust-analyzer
//! (several minutes on CI's two cores, for every fresh clone) and judges every submodule, where
//! the layering we keep is between the top-level modules; the `use` lines answer it directly.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module and the top-level modules its non-test code names.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<String> = std::fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap() != "lib.rs")
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = modules.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    let mut files = Vec::new();
    collect_rs(src, &mut files);
    for path in files {
        let rel: Vec<String> = path
            .strip_prefix(src)
            .unwrap()
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if rel == ["lib.rs"] {
            continue;
        }
        let top = rel[0].trim_end_matches(".rs").to_string();
        // In `src/x.rs` and `src/x/mod.rs`, `super::` is the crate root.
        let top_level_file = rel.len() == 1 || (rel.len() == 2 && rel[1] == "mod.rs");
        let text = std::fs::read_to_string(&path).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap();
        let mut prefixes = vec!["crate::"];
        if top_level_file {
            prefixes.push("super::");
        }
        for prefix in prefixes {
            for (i, _) in code.match_indices(prefix) {
                let name: String =
                    code[i + prefix.len()..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                if name != top && modules.contains(&name) {
                    graph.get_mut(&top).unwrap().insert(name);
                }
            }
        }
    }
    graph
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A cycle of the graph, if it has one (depth-first search, colouring nodes).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(node) {
            Some(2) => return None,
            Some(1) => {
                let start = path.iter().position(|n| n == node).unwrap();
                let mut cycle = path[start..].to_vec();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            _ => {}
        }
        state.insert(node.to_string(), 1);
        path.push(node.to_string());
        for next in &graph[node] {
            if let Some(c) = visit(next, graph, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    graph.keys().find_map(|n| visit(n, graph, &mut state, &mut Vec::new()))
}

#[test]
fn the_core_modules_form_layers_without_a_cycle() {
    let graph = module_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let shown: Vec<String> = graph.iter().map(|(m, d)| format!("{m} -> {d:?}")).collect();
    if let Some(cycle) = find_cycle(&graph) {
        panic!("module cycle: {}\n{}", cycle.join(" -> "), shown.join("\n"));
    }
    // The rules the layering exists for.
    assert!(!graph["engine"].contains("runtime"), "the engines do not name the runtime\n{}", shown.join("\n"));
    assert!(!graph["config"].contains("runtime"), "the config does not name the runtime");
    let types: Vec<&String> = graph["types"].iter().filter(|m| *m != "pack").collect();
    assert!(types.is_empty(), "types/ is a leaf over `pack` only, but names {types:?}");
}

#[test]
fn the_cycle_check_finds_a_cycle_when_there_is_one() {
    let edges = |pairs: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in pairs {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    assert_eq!(find_cycle(&edges(&[("a", "b"), ("b", "c"), ("a", "c")])), None);
    let cycle = find_cycle(&edges(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")])).unwrap();
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4, "{cycle:?}");
}
