//! docs/pack-format.md promises that numpy and safetensors alone can write a pack. This runs
//! docs/examples/write_pack.py (in the `.venv` that `make test` provisions) and opens the result.

use std::path::Path;
use std::process::Command;

use probe_cascade::pack::{ConceptId, Pack, ProbeId};

#[test]
fn a_pack_written_by_python_opens_and_scores() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python3");
    if !python.exists() {
        eprintln!("SKIPPED: {} is missing; `make test` provisions it (scripts/python-env.sh)", python.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(&python)
        .arg(root.join("docs/examples/write_pack.py"))
        .arg(dir.path())
        .args(["--dim", "24"])
        .status()
        .unwrap();
    assert!(status.success());
    let pack = Pack::open(dir.path()).expect("the Python-written pack opens");
    assert_eq!(pack.len(), 4);
    assert_eq!(pack.hidden_dim(), 24);
    let h = pack.hierarchy();
    let dog = h.lookup("Dog", 2).unwrap();
    assert_eq!(h.parents(dog), &[1, 2]);
    assert_eq!(h.children(ConceptId(0)), &[1, 2]);
    assert!(pack.verify(|_| {}).is_empty());
    let w = pack.decode_probe(ProbeId::sole(dog), &pack.read_probe(ProbeId::sole(dog)).unwrap()).unwrap();
    assert!(w.logit(&[0.5; 24]).is_finite());
}
