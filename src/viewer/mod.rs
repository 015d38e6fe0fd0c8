//! What a person looks at: the viewer page (a token stream tinted by concepts, each token's
//! top concepts with their paths, sparklines, alerts), live on `serve`'s `GET /` or recorded
//! into one self-contained HTML file (`run --html`, Python `to_html`), and the JSON it reads.
//!
//! Why here, in the core crate: the server's live events, the CLI's report and the Python
//! package's report all show the same page over the same event shape, so both live in one
//! place. The page's files (assets/) are compiled in with `include_str!`: the binary and the
//! wheel carry them, and the page needs no network. The drawing is a few dozen lines of SVG
//! (sparklines) and DOM, so no charting library is vendored.

use serde::Serialize;

use crate::config::WatchProfile;
use crate::pack::{ConceptId, Hierarchy, Pack};
use crate::types::{Alert, ReportEntry, SimplexReading, TokenReport};

const HTML: &str = include_str!("assets/viewer.html");
const STYLE: &str = include_str!("assets/viewer.css");
const SCRIPT: &str = include_str!("assets/viewer.js");

/// One token as the viewer reads it: a live event's `data` (docs/serving.md, "Live events"),
/// and each token of a recorded report.
#[derive(Debug, Serialize)]
pub struct TokenEvent<'a> {
    pub token: u64,
    /// The token's text, where the caller gave it.
    pub text: Option<&'a str>,
    /// The token's time in the cascade, in milliseconds.
    pub ms: f64,
    pub top: Vec<EventEntry<'a>>,
    pub alerts: &'a [Alert],
    pub simplex: &'a [SimplexReading],
    pub scored: usize,
    pub active: usize,
}

/// A reported concept, with its path (names from a root down to it, first parents).
#[derive(Debug, Serialize)]
pub struct EventEntry<'a> {
    #[serde(flatten)]
    pub entry: &'a ReportEntry,
    pub path: Vec<&'a str>,
}

impl<'a> TokenEvent<'a> {
    pub fn new(report: &'a TokenReport, text: Option<&'a str>, hierarchy: &'a Hierarchy) -> Self {
        Self {
            token: report.index as u64,
            text,
            ms: report.elapsed.as_secs_f64() * 1e3,
            top: report
                .top
                .iter()
                .map(|entry| EventEntry { entry, path: hierarchy.path_from_root(entry.id) })
                .collect(),
            alerts: &report.alerts,
            simplex: &report.simplex,
            scored: report.scored,
            active: report.active,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ConceptView<'a> {
    pub id: u32,
    pub name: &'a str,
    pub layer: u16,
    pub parents: Vec<&'a str>,
    pub children: Vec<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct LayerView {
    pub layer: u16,
    pub concepts: usize,
}

/// A pack's metadata and hierarchy: `GET /v1/pack`, and the `pack` of a recorded report (the
/// viewer draws hierarchy paths from it).
#[derive(Debug, Serialize)]
pub struct PackView<'a> {
    pub dir: String,
    pub hidden_dim: usize,
    pub dtype: String,
    pub concepts: usize,
    pub layers: Vec<LayerView>,
    pub hierarchy: Vec<ConceptView<'a>>,
    /// The concepts the watch profiles name (`PackView::watching`): the viewer gives each a
    /// sparkline from the first token, before any alert.
    pub watched: Vec<String>,
}

impl<'a> PackView<'a> {
    pub fn new(pack: &'a Pack) -> Self {
        let hier = pack.hierarchy();
        let names = |ids: &[u32]| ids.iter().map(|&i| hier.name(ConceptId(i))).collect();
        PackView {
            dir: pack.dir().display().to_string(),
            hidden_dim: pack.hidden_dim(),
            dtype: format!("{:?}", pack.dtype()).to_lowercase(),
            concepts: pack.len(),
            layers: (0..hier.layer_count() as u16)
                .map(|layer| LayerView { layer, concepts: hier.layer_members(layer).len() })
                .collect(),
            hierarchy: hier
                .ids()
                .map(|id| ConceptView {
                    id: id.0,
                    name: hier.name(id),
                    layer: hier.layer(id),
                    parents: names(hier.parents(id)),
                    children: names(hier.children(id)),
                })
                .collect(),
            watched: Vec::new(),
        }
    }

    /// With the concepts `profiles` watch, in order, each once. A profile file that can no
    /// longer be read gives its inline concepts only (it was read when the config loaded).
    pub fn watching(mut self, profiles: &[WatchProfile]) -> Self {
        for p in profiles {
            for name in p.all_concepts().unwrap_or_else(|_| p.concepts.clone()) {
                if !self.watched.contains(&name) {
                    self.watched.push(name);
                }
            }
        }
        self
    }
}

/// One stream of a recorded report: its tokens' events, in order.
#[derive(Debug, Serialize)]
pub struct RecordedSession<'a> {
    pub id: u64,
    pub label: String,
    pub events: Vec<TokenEvent<'a>>,
}

#[derive(Serialize)]
struct Recorded<'a> {
    pack: PackView<'a>,
    sessions: &'a [RecordedSession<'a>],
}

/// The live page `serve` gives at `GET /`: it reads the server's routes.
pub fn live_page() -> String {
    fill("probe-cascade · live", "null")
}

/// A self-contained HTML report of recorded streams over `pack` (its view, with the run's
/// watched concepts): the viewer with the data in the file, for any browser, offline.
pub fn report_page(title: &str, pack: PackView<'_>, sessions: &[RecordedSession<'_>]) -> String {
    let data = serde_json::to_string(&Recorded { pack, sessions }).expect("a report serializes");
    fill(title, &data)
}

/// The page with `data`, a JSON document of the recorded shape (`{pack, sessions}`), in it
/// as given: it is checked to be JSON, not parsed into values and written again.
pub fn page_with_data(title: &str, data: &str) -> Result<String, serde_json::Error> {
    serde_json::from_str::<serde::de::IgnoredAny>(data)?;
    Ok(fill(title, data))
}

fn fill(title: &str, data: &str) -> String {
    // `</` cannot end the script element early once written `<\/` (the same string in JSON).
    let data = data.replace("</", "<\\/");
    let title = escape(title);
    let mut out = String::with_capacity(HTML.len() + STYLE.len() + SCRIPT.len() + data.len());
    let mut rest = HTML;
    while let Some(at) = rest.find("{{") {
        out.push_str(&rest[..at]);
        let end = at + rest[at..].find("}}").expect("a closed placeholder") + 2;
        out.push_str(match &rest[at..end] {
            "{{TITLE}}" => &title,
            "{{STYLE}}" => STYLE,
            "{{SCRIPT}}" => SCRIPT,
            "{{DATA}}" => &data,
            other => panic!("unknown placeholder {other} in viewer.html"),
        });
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_carries_its_style_script_and_data_and_no_placeholder_is_left() {
        let page = page_with_data("a <b> & c", r#"{"x":"</script><b>"}"#).unwrap();
        assert!(!page.contains("{{"), "every placeholder is filled");
        assert!(page.contains("<title>a &lt;b&gt; &amp; c</title>"));
        assert!(page.contains(SCRIPT) && page.contains(STYLE));
        assert!(page.contains(r#"{"x":"<\/script><b>"}"#), "data cannot close the script element");
        assert_eq!(page.matches("</script>").count(), 2, "only the page's own script elements close");
        assert!(page_with_data("t", "{not json").is_err());
    }

    #[test]
    fn the_live_page_has_no_data_and_reads_the_server() {
        let page = live_page();
        assert!(page.contains(r#"<script type="application/json" id="pc-data">null</script>"#));
        assert!(page.contains("/v1/sessions"));
    }

    #[test]
    fn the_page_loads_nothing_from_the_network() {
        let page = live_page();
        for needle in ["http://", "https://", "src=", "href="] {
            let hits: Vec<_> = page.match_indices(needle).map(|(i, _)| &page[i..(i + 60).min(page.len())]).collect();
            // The only URL is SVG's namespace name, which is never fetched.
            assert!(hits.iter().all(|h| h.starts_with("http://www.w3.org/2000/svg")), "{needle}: {hits:?}");
        }
    }
}
