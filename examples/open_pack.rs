//! Opens a pack repeatedly and reports the time: `cargo run --release --example open_pack DIR`.
fn main() {
    let dir = std::env::args().nth(1).expect("usage: open_pack DIR");
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let pack = probe_cascade::pack::Pack::open(&dir).expect("open");
        eprintln!("{} concepts in {:.0} ms", pack.len(), t.elapsed().as_secs_f64() * 1e3);
    }
}
