//! HatCat's hierarchy JSON: a `layer0.json` (either schema), and a `hierarchy.json` after
//! the first NUL byte of the input if there is one, through `read_hierarchy`, then the
//! resolution of their links.
use probe_cascade_fuzz::scratch;

fn main() {
    let dir = scratch("hatcat_json");
    afl::fuzz!(|data: &[u8]| {
        let (layer, hierarchy) = match data.iter().position(|&b| b == 0) {
            Some(i) => (&data[..i], Some(&data[i + 1..])),
            None => (data, None),
        };
        std::fs::write(dir.join("layer0.json"), layer).expect("writing the input");
        match hierarchy {
            Some(h) => std::fs::write(dir.join("hierarchy.json"), h).expect("writing the input"),
            None => {
                let _ = std::fs::remove_file(dir.join("hierarchy.json"));
            }
        }
        if let Ok(files) = probe_cascade::import::hatcat::read_hierarchy(dir) {
            let _ = probe_cascade::import::hatcat::resolve_links(&files);
        }
    });
}
