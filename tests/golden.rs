//! Golden test: a 7-concept pack (D=4) whose probes are picked by hand so that each logit is
//! exactly `h[coord] + bias`, and three tokens whose every active set, count and report was
//! worked out on paper (the working is in the comments), for every pruning policy and both
//! expansion policies, on both engines.
//!
//! ```text
//! id name layer parents  logit          layer 0:  A(0)          B(1)
//! 0  A    0    -        h0 - 1          layer 1:  A1(2) A2(3)   B1(4)
//! 1  B    0    -        h1 - 1          layer 2:  A1x(5)  X(6) [A1, B1]
//! 2  A1   1    A        h2 - 1
//! 3  A2   1    A        h3 - 1          p > 0.3  ⇔  logit > −0.847
//! 4  B1   1    B        h2 - 2
//! 5  A1x  2    A1       h3 - 2          tokens: t0 = [2,0,1,0], t1 = [3,0,3,4], t2 = [0,3,0,0]
//! 6  X    2    A1, B1   h0 - 3
//! ```

use std::sync::Arc;

use probe_cascade::config::{CascadeConfig, Config, Expansion, Pruning};
use probe_cascade::engine::{build_engine, EngineKind, TokenReport};
use probe_cascade::pack::{write_pack, ConceptDef, DType, Pack, PackSpec, ProbeWeights};
use probe_cascade::policy::sigmoid;

const TOKENS: [[f32; 4]; 3] = [[2.0, 0.0, 1.0, 0.0], [3.0, 0.0, 3.0, 4.0], [0.0, 3.0, 0.0, 0.0]];

fn golden_pack(dir: &std::path::Path) -> Arc<Pack> {
    // (name, layer, parents, coord, bias)
    let concepts: [(&str, u16, &[u32], usize, f32); 7] = [
        ("A", 0, &[], 0, -1.0),
        ("B", 0, &[], 1, -1.0),
        ("A1", 1, &[0], 2, -1.0),
        ("A2", 1, &[0], 3, -1.0),
        ("B1", 1, &[1], 2, -2.0),
        ("A1x", 2, &[2], 3, -2.0),
        ("X", 2, &[2, 4], 0, -3.0),
    ];
    let spec = PackSpec {
        hidden_dim: 4,
        dtype: DType::F32,
        input_normalization: Default::default(),
        probes_per_shard: 3,
        concepts: concepts
            .iter()
            .map(|&(name, layer, parents, _, _)| ConceptDef { name: name.into(), layer, parents: parents.to_vec() })
            .collect(),
        lenses: None,
    };
    // Unit 0 of each layer passes relu(h[coord]) straight through; everything else is zero.
    let probe = |coord: usize, bias: f32| {
        let mut w = ProbeWeights {
            w1: vec![0.0; 128 * 4],
            b1: vec![0.0; 128],
            w2: vec![0.0; 64 * 128],
            b2: vec![0.0; 64],
            w3: vec![0.0; 64],
            b3: vec![bias],
        };
        w.w1[coord] = 1.0;
        w.w2[0] = 1.0;
        w.w3[0] = 1.0;
        w
    };
    write_pack(dir, &spec, |id| probe(concepts[id as usize].3, concepts[id as usize].4), |_| {}).unwrap();
    Arc::new(Pack::open(dir).unwrap())
}

struct Expect {
    children: usize,
    loaded: usize,
    unloaded: usize,
    skipped: usize,
    active: &'static [u32],
    /// (name, logit)
    top: &'static [(&'static str, f32)],
}

fn check(cascade: CascadeConfig, expected: [Expect; 3]) {
    let dir = tempfile::tempdir().unwrap();
    let pack = golden_pack(dir.path());
    let config = Config { cascade, ..Config::default() };
    for kind in [EngineKind::Reference, EngineKind::Naive] {
        let mut engine = build_engine(kind, pack.clone(), &config).unwrap();
        for (t, (h, want)) in TOKENS.iter().zip(&expected).enumerate() {
            let r: TokenReport = engine.observe(t, h).unwrap();
            let ctx = format!("{kind:?} engine, token {t}");
            let got: Vec<(&str, f32)> = r.top.iter().map(|e| (e.name.as_str(), e.logit)).collect();
            assert_eq!(got, want.top, "{ctx}: report");
            for e in &r.top {
                assert_eq!(e.prob, sigmoid(e.logit), "{ctx}: prob of {}", e.name);
            }
            let active: Vec<u32> = engine.active().iter().map(|c| c.0).collect();
            assert_eq!(active, want.active, "{ctx}: active set");
            assert_eq!(
                (r.children, r.loaded, r.unloaded, r.skipped_by_cap, r.active),
                (want.children, want.loaded, want.unloaded, want.skipped, want.active.len()),
                "{ctx}: (children, loaded, unloaded, skipped, active)"
            );
        }
    }
}

fn cascade(expansion: Expansion, pruning: Pruning, max_loaded: usize) -> CascadeConfig {
    CascadeConfig { expansion, pruning, max_loaded, report_top_k: 3, ..CascadeConfig::default() }
}

const THRESHOLD: Expansion = Expansion::Threshold { load_threshold: 0.3 };

#[test]
fn threshold_with_top_k_pruning_and_a_cap() {
    check(
        cascade(THRESHOLD, Pruning::TopK { keep_top_k: 3 }, 5),
        [
            // t0: A=1 fires, B=−1 not. Children A1=0, A2=−1. 4 active > 3: keep base + A1.
            //     Report: A 1, A1 0, then B −1 before A2 −1 (ids 1 < 3).
            Expect {
                children: 2,
                loaded: 2,
                unloaded: 1,
                skipped: 0,
                active: &[0, 1, 2],
                top: &[("A", 1.0), ("A1", 0.0), ("B", -1.0)],
            },
            // t1: A=2, B=−1, A1=2. Parents A then A1 (tie → id). Wanted A2, A1x, X; room 5−3=2:
            //     A2=3, A1x=2, X skipped. Keep base + A2. Report A2 3, A 2, A1 2 (A1x 2 loses on id).
            Expect {
                children: 3,
                loaded: 2,
                unloaded: 2,
                skipped: 1,
                active: &[0, 1, 3],
                top: &[("A2", 3.0), ("A", 2.0), ("A1", 2.0)],
            },
            // t2: A=−1, B=2, A2=−1. B fires → B1=−2. Keep base + A2 (−1 beats −2).
            Expect {
                children: 1,
                loaded: 1,
                unloaded: 1,
                skipped: 0,
                active: &[0, 1, 3],
                top: &[("B", 2.0), ("A", -1.0), ("A2", -1.0)],
            },
        ],
    );
}

#[test]
fn decompose_with_global_top_k_hiding_decomposed_parents() {
    let mut c = cascade(Expansion::Decompose { top_k: 2, max_depth: 2 }, Pruning::GlobalTopK { keep: 2 }, 10);
    c.hide_decomposed_parents = true;
    check(
        c,
        [
            // t0: A=1, B=−1. Round 1: top 2 = A, B → A1=0, A2=−1, B1=−1. Round 2: top 2 undecomposed
            //     = A1 (0), A2 (−1, beats B1 on id); A1 → A1x=−2, X=−1. Depth 2 reached.
            //     Global top 2 = A, A1: keep base + A1. Report hides A, B, A1: A2, B1, X (all −1).
            Expect {
                children: 5,
                loaded: 5,
                unloaded: 4,
                skipped: 0,
                active: &[0, 1, 2],
                top: &[("A2", -1.0), ("B1", -1.0), ("X", -1.0)],
            },
            // t1: A=2, B=−1, A1=2. Round 1: A, A1 → A2=3, A1x=2, X=0. Round 2: top 2 = A2, A1x,
            //     both leaves: stop. Global top 2 = A2, A: drop A1, A1x, X. Hidden: A, A1.
            Expect {
                children: 3,
                loaded: 3,
                unloaded: 3,
                skipped: 0,
                active: &[0, 1, 3],
                top: &[("A2", 3.0), ("A1x", 2.0), ("X", 0.0)],
            },
            // t2: A=−1, B=2, A2=−1. Round 1: B, A → B1=−2, A1=−1. Round 2: A1, A2 (−1, ids 2 < 3);
            //     A1 → A1x=−2, X=−3. Global top 2 = B, A: every non-base goes. Hidden: B, A, A1.
            Expect {
                children: 4,
                loaded: 4,
                unloaded: 5,
                skipped: 0,
                active: &[0, 1],
                top: &[("A2", -1.0), ("B1", -2.0), ("A1x", -2.0)],
            },
        ],
    );
}

#[test]
fn threshold_with_cold_pruning_under_cap_pressure() {
    check(
        cascade(THRESHOLD, Pruning::Cold { unload_threshold: 0.4 }, 4),
        [
            // t0: A fires → A1=0, A2=−1; 4 active = cap, nothing turned away: no pruning.
            Expect {
                children: 2,
                loaded: 2,
                unloaded: 0,
                skipped: 0,
                active: &[0, 1, 2, 3],
                top: &[("A", 1.0), ("A1", 0.0), ("B", -1.0)],
            },
            // t1: A=2, B=−1, A1=2, A2=3. A1 wants A1x, X: no room, 2 skipped. Demand 6 > 4, but
            //     no non-base probe is below p 0.4: nothing to drop.
            Expect {
                children: 2,
                loaded: 0,
                unloaded: 0,
                skipped: 2,
                active: &[0, 1, 2, 3],
                top: &[("A2", 3.0), ("A", 2.0), ("A1", 2.0)],
            },
            // t2: B=2 wants B1: no room, 1 skipped. Demand 5 > 4: drop the coldest one of A1, A2
            //     (both −1, p .27): the lower-ranked is A2 (higher id).
            Expect {
                children: 1,
                loaded: 0,
                unloaded: 1,
                skipped: 1,
                active: &[0, 1, 2],
                top: &[("B", 2.0), ("A", -1.0), ("A1", -1.0)],
            },
        ],
    );
}

#[test]
fn threshold_without_pruning() {
    check(
        cascade(THRESHOLD, Pruning::None, 100),
        [
            Expect {
                children: 2,
                loaded: 2,
                unloaded: 0,
                skipped: 0,
                active: &[0, 1, 2, 3],
                top: &[("A", 1.0), ("A1", 0.0), ("B", -1.0)],
            },
            // t1: A1 (2) fires → A1x=2, X=0; A2=3 is a leaf.
            Expect {
                children: 2,
                loaded: 2,
                unloaded: 0,
                skipped: 0,
                active: &[0, 1, 2, 3, 5, 6],
                top: &[("A2", 3.0), ("A", 2.0), ("A1", 2.0)],
            },
            // t2: B → B1=−2. Report: B 2, then −1s by id: A, A1.
            Expect {
                children: 1,
                loaded: 1,
                unloaded: 0,
                skipped: 0,
                active: &[0, 1, 2, 3, 4, 5, 6],
                top: &[("B", 2.0), ("A", -1.0), ("A1", -1.0)],
            },
        ],
    );
}
