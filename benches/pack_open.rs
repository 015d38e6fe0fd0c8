//! Opening a pack reads metadata only; the target is a 100,000-concept pack in under 1 s and
//! under 100 MB. The shards are sparse files (real headers, holes for data), so the pack is
//! full-size as far as opening is concerned without taking 67 GB of disk.

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use probe_cascade::pack::{write_sparse_pack, ConceptDef, DType, InputNormalization, Pack, PackSpec};

fn spec(concepts: usize) -> PackSpec {
    // 20 roots, then each concept's parent is an earlier concept; every 20th has two parents.
    let concepts = (0..concepts)
        .map(|i| {
            let parents = if i < 20 {
                vec![]
            } else if i % 20 == 0 {
                vec![(i / 4) as u32, (i / 4 + 1) as u32]
            } else {
                vec![(i / 4) as u32]
            };
            let layer = (i as f64).log(4.0).floor() as u16;
            ConceptDef { name: format!("Concept{i}"), layer, parents }
        })
        .collect();
    PackSpec {
        hidden_dim: 2560,
        dtype: DType::Bf16,
        input_normalization: InputNormalization::None,
        probes_per_shard: 256,
        concepts,
        lenses: None,
    }
}

fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn bench_open(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let t = Instant::now();
    write_sparse_pack(dir.path(), &spec(100_000)).expect("sparse pack writes");
    eprintln!("wrote a sparse 100,000-concept pack in {:.1} s", t.elapsed().as_secs_f64());
    // Writing 5 to clear_refs resets the peak-RSS mark, so VmHWM below is the open's own peak.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = peak_rss_kb();
    let t = Instant::now();
    let pack = Pack::open(dir.path()).expect("pack opens");
    let first = t.elapsed();
    eprintln!(
        "first open: {:.0} ms; index holds {:.1} MB; peak RSS grew {:.1} MB during open",
        first.as_secs_f64() * 1e3,
        pack.heap_bytes() as f64 / 1e6,
        (peak_rss_kb() - before) as f64 / 1e3
    );
    drop(pack);
    let mut group = c.benchmark_group("pack_open");
    group.sample_size(10);
    group.bench_function("100k_concepts", |b| b.iter(|| Pack::open(dir.path()).expect("pack opens")));
    group.finish();
}

criterion_group!(benches, bench_open);
criterion_main!(benches);
