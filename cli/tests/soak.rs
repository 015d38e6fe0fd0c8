//! `probe-cascade soak`, short: 10⁴ tokens over 4 sessions on the tiny pack. Memory,
//! descriptors, threads and the cache stay flat after the warm-up, slots stay within bounds,
//! and nothing is held once every session has closed.

mod common;

use common::*;

#[test]
fn a_short_soak_stays_flat_and_leaves_nothing_held() {
    let f = fixture();
    let out = f.root.join("soak");
    let said = run_ok(
        bin()
            .args(["soak", "--tokens", "10000", "--sessions", "4", "--samples", "40", "--check", "--pack"])
            .arg(&f.pack)
            .arg("--trace")
            .arg(&f.trace)
            .arg("--out")
            .arg(&out),
    );
    assert!(said.contains("0 errors") && said.contains("every series flat"), "{said}");
    assert!(said.contains("0 sessions open, 0 holding slots, 0 probes held"), "{said}");
    let csv = std::fs::read_to_string(out.join("soak.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    for column in ["tokens", "rss_mb", "fds", "threads", "cache_mb", "held_probes", "tokens_per_s", "p50_ms"] {
        assert!(header.contains(&column), "soak.csv has {column}: {header:?}");
    }
    let rows: Vec<Vec<f64>> = lines.map(|l| l.split(',').map(|v| v.parse().unwrap()).collect()).collect();
    assert_eq!(rows.len(), 40);
    let col = |name: &str| header.iter().position(|c| *c == name).unwrap();
    assert_eq!(rows.last().unwrap()[col("tokens")], 10000.0);
    assert!(rows.windows(2).all(|w| w[0][col("tokens")] <= w[1][col("tokens")]), "tokens only grow");
    assert!(rows.iter().all(|r| r[col("rss_mb")] > 0.0 && r[col("fds")] > 0.0 && r[col("threads")] > 0.0));
    let md = std::fs::read_to_string(out.join("soak.md")).unwrap();
    assert!(md.contains("| rss_mb |") && md.contains("back to nothing"), "{md}");
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(out.join("soak.png")).unwrap()));
    let info = decoder.read_info().unwrap();
    assert_eq!((info.info().width, info.info().height), (1200, 800));
    roxmltree::Document::parse(&std::fs::read_to_string(out.join("soak.svg")).unwrap()).unwrap();

    // Bad hidden states (NaN in row 5 of 12) fail their own tokens, named, and the rest are
    // answered: every request gets a report or an error. Sessions start at rows 0 and 6, so
    // 83 of each session's 1,000 tokens read row 5.
    let mut m = probe_cascade::npy::read(&f.trace).unwrap();
    let cols = m.cols;
    m.data[5 * cols + 3] = f32::NAN;
    let bad = f.root.join("nan.npy");
    probe_cascade::npy::write(&bad, &m).unwrap();
    let out = bin()
        .args(["soak", "--tokens", "2000", "--sessions", "2", "--samples", "20", "--pack"])
        .arg(&f.pack)
        .arg("--trace")
        .arg(&bad)
        .arg("--out")
        .arg(f.root.join("soak-nan"))
        .output()
        .unwrap();
    let e = failed(&out);
    assert!(e.contains("2000 tokens") && e.contains("166 errors"), "{e}");
    assert!(e.contains("hidden state value [3] is NaN"), "{e}");
}
