//! Writes a sparse pack of N concepts (headers real, data holes): for profiling `Pack::open`.
use probe_cascade::pack::{write_sparse_pack, ConceptDef, DType, InputNormalization, PackSpec};
fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: sparse_pack DIR N");
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let concepts = (0..n)
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
    };
    write_sparse_pack(std::path::Path::new(&dir), &spec).expect("write");
}
