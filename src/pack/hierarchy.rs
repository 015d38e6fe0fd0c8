//! The concept DAG in compact arrays (CSR), built once at open and validated.

use std::path::Path;

use super::error::PackError;
use super::manifest::ConceptEntry;
use super::writer::ConceptDef;

/// Dense concept index: `ConceptId(i)` is the i-th concept of the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConceptId(pub u32);

impl ConceptId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Names, layers and links of every concept, without per-concept allocations.
#[derive(Debug, Clone, Default)]
pub struct Hierarchy {
    names: String,
    name_ends: Vec<u32>,
    layers: Vec<u16>,
    child_starts: Vec<u32>,
    children: Vec<u32>,
    parent_starts: Vec<u32>,
    parents: Vec<u32>,
    /// Concept ids grouped by layer; `layer_starts[l]..layer_starts[l+1]` are layer l's.
    layer_starts: Vec<u32>,
    by_layer: Vec<u32>,
    /// Concept ids sorted by (name, layer), for lookups by key.
    by_key: Vec<u32>,
}

impl Hierarchy {
    /// Builds and validates the index: dense ids, no dangling links, parent and child lists
    /// that agree, unique (name, layer) keys, and no cycles.
    pub fn build(concepts: &[ConceptEntry], manifest: &Path) -> Result<Self, PackError> {
        let n = concepts.len();
        if n > u32::MAX as usize / 2 {
            return Err(PackError::Unsupported { path: manifest.into(), reason: format!("{n} concepts is too many") });
        }
        let mut h = Hierarchy {
            names: String::with_capacity(concepts.iter().map(|c| c.name.len()).sum()),
            name_ends: Vec::with_capacity(n),
            layers: Vec::with_capacity(n),
            child_starts: Vec::with_capacity(n + 1),
            parent_starts: Vec::with_capacity(n + 1),
            ..Default::default()
        };
        h.child_starts.push(0);
        h.parent_starts.push(0);
        for (i, c) in concepts.iter().enumerate() {
            let label = || format!("{}@{} (entry {i})", c.name, c.layer);
            if c.id as usize != i {
                return Err(PackError::BadConcept {
                    path: manifest.into(),
                    concept: label(),
                    reason: format!("id is {} but ids must equal the entry's position {i}", c.id),
                });
            }
            if c.name.is_empty() || c.name.contains('\n') {
                return Err(PackError::BadConcept {
                    path: manifest.into(),
                    concept: label(),
                    reason: "name must be non-empty and on one line".into(),
                });
            }
            h.names.push_str(&c.name);
            h.name_ends.push(h.names.len() as u32);
            h.layers.push(c.layer);
            for (relation, list, out, starts) in [
                ("child", &c.children, &mut h.children, &mut h.child_starts),
                ("parent", &c.parents, &mut h.parents, &mut h.parent_starts),
            ] {
                for &t in list {
                    if t as usize >= n {
                        return Err(PackError::Dangling {
                            path: manifest.into(),
                            concept: label(),
                            relation,
                            target: t,
                        });
                    }
                    if t as usize == i {
                        return Err(PackError::Cycle {
                            path: manifest.into(),
                            concept: label(),
                            cycle: format!("{} is its own {relation}", label()),
                        });
                    }
                }
                let start = out.len();
                out.extend_from_slice(list);
                out[start..].sort_unstable();
                if let Some(w) = out[start..].windows(2).find(|w| w[0] == w[1]) {
                    return Err(PackError::BadConcept {
                        path: manifest.into(),
                        concept: label(),
                        reason: format!("lists {relation} id {} twice", w[0]),
                    });
                }
                starts.push(out.len() as u32);
            }
        }
        h.check_links_agree(manifest)?;
        h.index_by_layer();
        h.index_by_key(manifest)?;
        h.check_acyclic(manifest)?;
        Ok(h)
    }

    /// Builds a hierarchy with no weights behind it (for policies and their tests); children
    /// are derived from the parents lists.
    pub fn from_defs(defs: &[ConceptDef]) -> Result<Self, PackError> {
        let mut children: Vec<Vec<u32>> = vec![Vec::new(); defs.len()];
        for (i, d) in defs.iter().enumerate() {
            for &p in &d.parents {
                if let Some(list) = children.get_mut(p as usize) {
                    list.push(i as u32);
                }
            }
        }
        let entries: Vec<ConceptEntry> = defs
            .iter()
            .zip(children)
            .enumerate()
            .map(|(i, (d, children))| ConceptEntry {
                id: i as u32,
                name: d.name.clone(),
                layer: d.layer,
                parents: d.parents.clone(),
                children,
                weights: None,
                crc32: None,
                probes: None,
                calibration: None,
            })
            .collect();
        Self::build(&entries, Path::new("<in memory>"))
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    pub fn ids(&self) -> impl Iterator<Item = ConceptId> + '_ {
        (0..self.len() as u32).map(ConceptId)
    }

    pub fn name(&self, id: ConceptId) -> &str {
        let i = id.index();
        let start = if i == 0 { 0 } else { self.name_ends[i - 1] as usize };
        &self.names[start..self.name_ends[i] as usize]
    }

    pub fn layer(&self, id: ConceptId) -> u16 {
        self.layers[id.index()]
    }

    /// `name@layer`, the way errors and reports name a concept.
    pub fn label(&self, id: ConceptId) -> String {
        format!("{}@{}", self.name(id), self.layer(id))
    }

    pub fn children(&self, id: ConceptId) -> &[u32] {
        let i = id.index();
        &self.children[self.child_starts[i] as usize..self.child_starts[i + 1] as usize]
    }

    /// The names from a root down to `id`, following first parents (what reports show as a
    /// concept's path). A layer bound keeps a cycle in a bad hierarchy finite.
    pub fn path_from_root(&self, id: ConceptId) -> Vec<&str> {
        let mut path = vec![self.name(id)];
        let mut at = id;
        for _ in 0..=self.layer_count() {
            match self.parents(at).first() {
                Some(&p) => {
                    at = ConceptId(p);
                    path.push(self.name(at));
                }
                None => break,
            }
        }
        path.reverse();
        path
    }

    pub fn parents(&self, id: ConceptId) -> &[u32] {
        let i = id.index();
        &self.parents[self.parent_starts[i] as usize..self.parent_starts[i + 1] as usize]
    }

    /// Number of layers (one past the highest layer number).
    pub fn layer_count(&self) -> usize {
        self.layer_starts.len().saturating_sub(1)
    }

    pub fn layer_members(&self, layer: u16) -> &[u32] {
        let l = layer as usize;
        if l + 1 >= self.layer_starts.len() {
            return &[];
        }
        &self.by_layer[self.layer_starts[l] as usize..self.layer_starts[l + 1] as usize]
    }

    pub fn lookup(&self, name: &str, layer: u16) -> Option<ConceptId> {
        self.by_key
            .binary_search_by(|&id| {
                let id = ConceptId(id);
                (self.name(id), self.layer(id)).cmp(&(name, layer))
            })
            .ok()
            .map(|i| ConceptId(self.by_key[i]))
    }

    /// Every concept named `name`, whatever its layer, by ascending layer.
    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = ConceptId> + 'a {
        let start = self.by_key.partition_point(|&id| self.name(ConceptId(id)) < name);
        self.by_key[start..].iter().map(|&id| ConceptId(id)).take_while(move |&id| self.name(id) == name)
    }

    /// Approximate heap bytes held by the index.
    pub fn heap_bytes(&self) -> usize {
        self.names.capacity()
            + 4 * (self.name_ends.capacity()
                + self.child_starts.capacity()
                + self.children.capacity()
                + self.parent_starts.capacity()
                + self.parents.capacity()
                + self.layer_starts.capacity()
                + self.by_layer.capacity()
                + self.by_key.capacity())
            + 2 * self.layers.capacity()
    }

    /// Every (parent, child) edge must appear in both the parent's `children` and the child's
    /// `parents`: a mismatch means the writer lost an edge, and guessing which list is right
    /// would hide that.
    fn check_links_agree(&self, manifest: &Path) -> Result<(), PackError> {
        let mut down: Vec<(u32, u32)> = Vec::with_capacity(self.children.len());
        let mut up: Vec<(u32, u32)> = Vec::with_capacity(self.parents.len());
        for id in self.ids() {
            down.extend(self.children(id).iter().map(|&c| (id.0, c)));
            up.extend(self.parents(id).iter().map(|&p| (p, id.0)));
        }
        down.sort_unstable();
        up.sort_unstable();
        let mismatch = down
            .iter()
            .zip(&up)
            .find(|(a, b)| a != b)
            .map(|(a, b)| if a < b { (*a, "children", "parents") } else { (*b, "parents", "children") })
            .or_else(|| match down.len().cmp(&up.len()) {
                std::cmp::Ordering::Greater => Some((down[up.len()], "children", "parents")),
                std::cmp::Ordering::Less => Some((up[down.len()], "parents", "children")),
                std::cmp::Ordering::Equal => None,
            });
        match mismatch {
            None => Ok(()),
            Some(((p, c), listed_in, missing_from)) => Err(PackError::BadConcept {
                path: manifest.into(),
                concept: self.label(ConceptId(c)),
                reason: format!(
                    "link with parent {} is listed in {listed_in} but missing from {missing_from}",
                    self.label(ConceptId(p))
                ),
            }),
        }
    }

    fn index_by_layer(&mut self) {
        let layers = self.layers.iter().map(|&l| l as usize + 1).max().unwrap_or(0);
        let mut counts = vec![0u32; layers + 1];
        for &l in &self.layers {
            counts[l as usize + 1] += 1;
        }
        for l in 1..counts.len() {
            counts[l] += counts[l - 1];
        }
        self.layer_starts = counts.clone();
        self.by_layer = vec![0; self.layers.len()];
        for (i, &l) in self.layers.iter().enumerate() {
            let slot = &mut counts[l as usize];
            self.by_layer[*slot as usize] = i as u32;
            *slot += 1;
        }
    }

    fn index_by_key(&mut self, manifest: &Path) -> Result<(), PackError> {
        let mut by_key: Vec<u32> = (0..self.len() as u32).collect();
        by_key.sort_by(|&a, &b| {
            let (a, b) = (ConceptId(a), ConceptId(b));
            (self.name(a), self.layer(a), a).cmp(&(self.name(b), self.layer(b), b))
        });
        if let Some(w) = by_key.windows(2).find(|w| {
            let (a, b) = (ConceptId(w[0]), ConceptId(w[1]));
            self.name(a) == self.name(b) && self.layer(a) == self.layer(b)
        }) {
            return Err(PackError::DuplicateKey {
                path: manifest.into(),
                key: self.label(ConceptId(w[0])),
                first: w[0],
                second: w[1],
            });
        }
        self.by_key = by_key;
        Ok(())
    }

    /// Kahn's algorithm; whatever it cannot order lies on or below a cycle, and walking
    /// parents from there inside the leftover set must close a loop, which the error spells out.
    fn check_acyclic(&self, manifest: &Path) -> Result<(), PackError> {
        let n = self.len();
        let mut indegree: Vec<u32> = (0..n).map(|i| self.parents(ConceptId(i as u32)).len() as u32).collect();
        let mut queue: Vec<u32> = (0..n as u32).filter(|&i| indegree[i as usize] == 0).collect();
        let mut ordered = 0;
        while let Some(p) = queue.pop() {
            ordered += 1;
            for &c in self.children(ConceptId(p)) {
                indegree[c as usize] -= 1;
                if indegree[c as usize] == 0 {
                    queue.push(c);
                }
            }
        }
        if ordered == n {
            return Ok(());
        }
        let start = (0..n).find(|&i| indegree[i] > 0).expect("some concept is left unordered");
        let mut seen_at = vec![usize::MAX; n];
        let mut path = vec![start as u32];
        let mut cur = start as u32;
        loop {
            seen_at[cur as usize] = path.len() - 1;
            // A leftover concept always has a leftover parent (that is why it was left over).
            let next = *self
                .parents(ConceptId(cur))
                .iter()
                .find(|&&p| indegree[p as usize] > 0)
                .expect("leftover concept has a leftover parent");
            if seen_at[next as usize] != usize::MAX {
                let cycle = &path[seen_at[next as usize]..];
                let mut names: Vec<String> = cycle.iter().rev().map(|&c| self.label(ConceptId(c))).collect();
                names.push(self.label(ConceptId(cycle[cycle.len() - 1])));
                return Err(PackError::Cycle {
                    path: manifest.into(),
                    concept: self.label(ConceptId(next)),
                    cycle: names.join(" -> "),
                });
            }
            path.push(next);
            cur = next;
        }
    }
}
