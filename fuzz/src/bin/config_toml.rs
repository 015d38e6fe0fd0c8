//! Config files: TOML, every key's type and range (`Config::parse` validates), and the raw
//! table the server keeps for per-session overrides (`Live::parse`).
use std::path::Path;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else { return };
        if let Ok(live) = probe_cascade_server::state::Live::parse(text, Path::new("config.toml")) {
            let _ = probe_cascade::config::cascade_with(&live.raw, &Default::default());
        }
    });
}
