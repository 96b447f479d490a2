//! Limits named once; `pycore._rust` exports them and `pycore.limits` reads them from there.

/// Pillow's DecompressionBombError threshold, `2 * Image.MAX_IMAGE_PIXELS`
/// (`MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3 = 89_478_485`). A header declaring more
/// pixels gets status `too_large` by default (`--max-pixels` raises it for the scan) and the
/// decoder never allocates for it.
pub const MAX_PIXELS: u64 = 178_956_970;
