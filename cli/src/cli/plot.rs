//! What the plots share: text in the PNGs needs a font, and one is embedded (DejaVu Sans,
//! through the dejavu crate) so that nothing depends on the machine's fonts.

/// Registers the embedded font as plotters' "sans-serif", once.
pub fn register_font() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, dejavu::sans::regular())
            .is_ok()
    });
    anyhow::ensure!(ok, "the embedded DejaVu Sans font did not load");
    Ok(())
}
