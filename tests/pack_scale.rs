//! Opening reads metadata only and stays small: a 100,000-concept pack (sparse shard files with
//! real headers) must open within a 100 MB memory budget. Its time is measured by the
//! `pack_open` criterion bench, not here.

use probe_cascade::pack::{write_sparse_pack, ConceptDef, DType, InputNormalization, Pack, PackSpec};

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_100k_concept_pack_opens_within_100_mb() {
    let dir = tempfile::tempdir().unwrap();
    let concepts = (0..100_000usize)
        .map(|i| ConceptDef {
            name: format!("Concept{i}"),
            layer: (i as f64).log(4.0).floor() as u16,
            parents: if i < 20 { vec![] } else { vec![(i / 4) as u32] },
        })
        .collect();
    let spec = PackSpec {
        hidden_dim: 2560,
        dtype: DType::Bf16,
        input_normalization: InputNormalization::None,
        probes_per_shard: 256,
        concepts,
        lenses: None,
    };
    write_sparse_pack(dir.path(), &spec).unwrap();
    drop(spec);
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status_kb("VmRSS:");
    let pack = Pack::open(dir.path()).unwrap();
    let peak_growth_mb = (status_kb("VmHWM:") - before) as f64 / 1024.0;
    assert_eq!(pack.len(), 100_000);
    assert!(pack.heap_bytes() < 20 << 20, "the open pack holds {} bytes", pack.heap_bytes());
    assert!(peak_growth_mb < 100.0, "opening peaked {peak_growth_mb:.1} MB above the baseline");
    let h = pack.hierarchy();
    assert_eq!(h.lookup("Concept99999", h.layer(probe_cascade::pack::ConceptId(99_999))).map(|c| c.0), Some(99_999));
}
