//! What the plots share: each is drawn twice, as PNG and SVG, and text in the PNGs needs a
//! font, so one is embedded (DejaVu Sans, through the dejavu crate) and nothing depends on the
//! machine's fonts.

/// Draws `$body` (with `$root` bound to the drawing area) into `$stem.png` and `$stem.svg`, at
/// `$size` pixels; the font is registered first. A macro because the body is generic over the
/// backend, which a closure cannot be. Evaluates to `anyhow::Result<()>`.
macro_rules! png_and_svg {
    ($stem:expr, $size:expr, |$root:ident| $body:expr) => {{
        (|| -> anyhow::Result<()> {
            use plotters::prelude::{BitMapBackend, IntoDrawingArea, SVGBackend};
            $crate::cli::plot::register_font()?;
            let png = $stem.with_extension("png");
            let $root = BitMapBackend::new(&png, $size).into_drawing_area();
            $body.map_err(|e| anyhow::anyhow!("drawing {}: {e}", png.display()))?;
            $root.present().map_err(|e| anyhow::anyhow!("writing {}: {e}", png.display()))?;
            let svg = $stem.with_extension("svg");
            let $root = SVGBackend::new(&svg, $size).into_drawing_area();
            $body.map_err(|e| anyhow::anyhow!("drawing {}: {e}", svg.display()))?;
            $root.present().map_err(|e| anyhow::anyhow!("writing {}: {e}", svg.display()))?;
            Ok(())
        })()
    }};
}
pub(crate) use png_and_svg;

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
