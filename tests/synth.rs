//! Synthetic packs and traces are deterministic, and behave like trained probes.

mod common;

use probe_cascade::npy;
use probe_cascade::pack::{ConceptId, Pack, ProbeId};
use probe_cascade::synth::{concept_geometry, synth_trace, write_synth_pack, SynthParams, TraceParams};

fn files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().into_string().unwrap(), std::fs::read(e.path()).unwrap())
        })
        .collect();
    out.sort();
    out
}

#[test]
fn same_seed_gives_byte_identical_packs_and_traces() {
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let p = SynthParams::tiny();
    write_synth_pack(a.path(), &p, |_| {}).unwrap();
    write_synth_pack(b.path(), &p, |_| {}).unwrap();
    write_synth_pack(c.path(), &SynthParams { seed: 1, ..p.clone() }, |_| {}).unwrap();
    assert_eq!(files(a.path()), files(b.path()));
    assert_ne!(files(a.path()), files(c.path()));

    let pack = Pack::open(a.path()).unwrap();
    let geometry = concept_geometry(&pack, |_| {}).unwrap();
    let t = TraceParams { tokens: 30, seed: 7, ..Default::default() };
    let (x, y) = (synth_trace(&pack, &geometry, &t), synth_trace(&pack, &geometry, &t));
    assert_eq!(x, y);
    assert_ne!(x, synth_trace(&pack, &geometry, &TraceParams { seed: 8, ..t }));
    let path = a.path().join("t.npy");
    npy::write(&path, &x).unwrap();
    assert_eq!(npy::read(&path).unwrap(), x);
}

#[test]
fn demo_preset_has_the_promised_shape() {
    let p = SynthParams::demo();
    let sizes = p.layer_sizes();
    assert_eq!(sizes.len(), 5);
    assert_eq!(sizes[0], 14);
    assert_eq!(sizes.iter().sum::<usize>(), 1000);
    assert!(sizes.windows(2).all(|w| w[0] < w[1]), "{sizes:?}");
}

/// A child's probe should mostly fire only where its parent's does: on hidden states built
/// from the child's own direction the parent fires too, and on the parent's own direction
/// most children stay quiet.
#[test]
fn children_fire_with_their_parents() {
    let dir = tempfile::tempdir().unwrap();
    write_synth_pack(dir.path(), &SynthParams { concepts: 120, hidden_dim: 64, ..SynthParams::tiny() }, |_| {})
        .unwrap();
    let pack = Pack::open(dir.path()).unwrap();
    let geometry = concept_geometry(&pack, |_| {}).unwrap();
    let h = pack.hierarchy();
    let weights: Vec<_> = h
        .ids()
        .map(|id| pack.decode_probe(ProbeId::sole(id), &pack.read_probe(ProbeId::sole(id)).unwrap()).unwrap())
        .collect();
    let (mut parent_fires, mut pairs, mut child_quiet, mut quiet_pairs) = (0, 0, 0, 0);
    for child in h.ids() {
        let g = &geometry[child.index()];
        let Some(s) = g.firing_strength else { continue };
        let state: Vec<f32> = g.direction.iter().map(|u| u * s * 1.4).collect();
        assert!(weights[child.index()].logit(&state) > 0.0, "a concept fires on its own direction");
        for &p in h.parents(child) {
            pairs += 1;
            let pg = &geometry[p as usize];
            // The parent fires when its direction is present as well (as traces put whole paths).
            let with_parent: Vec<f32> =
                state.iter().zip(&pg.direction).map(|(x, u)| x + u * pg.firing_strength.unwrap_or(0.0) * 1.4).collect();
            if weights[p as usize].logit(&with_parent) > 0.0 {
                parent_fires += 1;
            }
            let parent_state: Vec<f32> =
                pg.direction.iter().map(|u| u * pg.firing_strength.unwrap_or(0.0) * 1.4).collect();
            quiet_pairs += 1;
            if weights[child.index()].logit(&parent_state) < 0.0 {
                child_quiet += 1;
            }
        }
    }
    assert!(pairs > 50);
    assert_eq!(parent_fires, pairs);
    assert!(
        child_quiet as f64 > 0.9 * quiet_pairs as f64,
        "{child_quiet}/{quiet_pairs} children quiet on the parent alone"
    );
    assert!(h.ids().all(|id: ConceptId| geometry[id.index()].firing_strength.is_some()));
}
