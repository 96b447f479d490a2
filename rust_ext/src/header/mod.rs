//! Image header probing: format, stored width/height and EXIF orientation, read from the
//! first bytes of a file without decoding pixels and without allocating from declared sizes.
//!
//! One file per format (`jpeg`, `png`, `gif`, `bmp`, `webp`, `tiff`, `heif`, `jxl`), the
//! ISO-BMFF box walker `bmff` that `heif` and `jxl` use (it knows neither of them: the
//! dispatch on the `ftyp` brand is here), and shared helpers: `src` (bounded reads from the
//! file) and `bytes` (checked integer access into buffers).
//!
//! Shared rules for every parser:
//! * Only headers are read, through [`src::Src`], which checks every read and seek against
//!   the file length and never allocates from a declared size beyond a fixed cap.
//! * Every loop over segments/chunks/boxes is capped at [`MAX_ITEMS`] iterations and always
//!   moves forward, so malformed length fields cannot make us spin.
//! * Byte access goes through `get`/checked helpers, and arithmetic on file-supplied numbers
//!   is checked or saturating: any input gives `Ok` or `Err`, never a panic.
//! * Sizes are reported as stored; orientation (when the format carries one) is the raw
//!   EXIF-style value 1..=8 (or whatever out-of-range value the file holds).

mod bmff;
mod bmp;
mod bytes;
mod gif;
mod heif;
mod jpeg;
mod jxl;
mod png;
mod src;
mod tiff;
mod webp;

/// Formats whose headers we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Jpeg,
    Png,
    Gif,
    Bmp,
    Webp,
    Tiff,
    Avif,
    Heic,
    Jxl,
}

impl Format {
    pub fn as_str(&self) -> &'static str {
        match self {
            Format::Jpeg => "jpeg",
            Format::Png => "png",
            Format::Gif => "gif",
            Format::Bmp => "bmp",
            Format::Webp => "webp",
            Format::Tiff => "tiff",
            Format::Avif => "avif",
            Format::Heic => "heic",
            Format::Jxl => "jxl",
        }
    }
}

/// What a header tells us. `width`/`height` are as stored (before EXIF orientation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderInfo {
    pub format: Format,
    pub width: u32,
    pub height: u32,
    /// The raw EXIF (or container) orientation value when one is present, valid or not.
    pub orientation: Option<u16>,
}

#[cfg(test)]
mod tests;

use crate::error::{Error, Result};
use src::Src;
use std::io::{Read, Seek};

/// Cap on segments, chunks, boxes or IFD entries visited in one file.
const MAX_ITEMS: u32 = 10_000;

/// Cap on an EXIF payload we are willing to buffer (a JPEG APP1 segment is at most 64 KiB).
const EXIF_CAP: usize = 64 * 1024;

/// The format families the sniffer can tell apart from the first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Jpeg,
    Png,
    Gif,
    Bmp,
    Webp,
    Tiff,
    /// An ISO-BMFF file starting with `ftyp`: AVIF, HEIC (or a JPEG XL container variant).
    Bmff,
    JxlCodestream,
    JxlContainer,
}

/// Fixed signatures at offset 0. WebP (`RIFF....WEBP`) and ISO-BMFF (`....ftyp`) are
/// matched separately since their magic is not contiguous from the first byte.
const SIGNATURES: [(&[u8], Kind); 11] = [
    (b"\xFF\xD8\xFF", Kind::Jpeg),
    (b"\x89PNG\r\n\x1A\n", Kind::Png),
    (b"GIF87a", Kind::Gif),
    (b"GIF89a", Kind::Gif),
    (b"BM", Kind::Bmp),
    (b"II*\0", Kind::Tiff),
    (b"MM\0*", Kind::Tiff),
    (b"II+\0", Kind::Tiff),
    (b"MM\0+", Kind::Tiff),
    (b"\xFF\x0A", Kind::JxlCodestream),
    (jxl::CONTAINER_SIGNATURE, Kind::JxlContainer),
];

/// Probe a reader positioned at the start of a file (`len`: its size in bytes).
pub fn probe<R: Read + Seek>(r: &mut R, len: u64) -> Result<HeaderInfo> {
    if len == 0 {
        return Err(Error::Truncated("the file is empty".into()));
    }
    let mut src = Src::open(r, len)?;
    if src.file_len() == 0 {
        return Err(Error::Truncated("the file is empty".into()));
    }
    let head = src.head();
    match sniff(head)? {
        Kind::Jpeg => jpeg::probe(&mut src),
        Kind::Png => png::probe(&mut src),
        Kind::Gif => gif::probe(head),
        Kind::Bmp => bmp::probe(head),
        Kind::Webp => webp::probe(&mut src),
        Kind::Tiff => tiff::probe(&mut src),
        Kind::Bmff => match bmff::read_ftyp(&mut src)? {
            Format::Jxl => jxl::probe_boxes(&mut src),
            f => heif::probe(&mut src, f),
        },
        Kind::JxlCodestream => jxl::probe_codestream(&mut src),
        Kind::JxlContainer => jxl::probe_container(&mut src),
    }
}

/// Recognise the format from the first bytes. A file that stops inside a signature (at
/// least two bytes of it) is `Truncated`; anything else unknown is `NotImage`.
fn sniff(head: &[u8]) -> Result<Kind> {
    for (sig, kind) in SIGNATURES {
        if head.starts_with(sig) && (kind != Kind::Bmp || bmp::looks_like_bmp(head)) {
            return Ok(kind);
        }
    }
    if head.get(..4) == Some(b"RIFF") && head.get(8..12) == Some(b"WEBP") {
        return Ok(Kind::Webp);
    }
    if head.get(4..8) == Some(b"ftyp") {
        return Ok(Kind::Bmff);
    }
    if let Some(what) = cut_signature(head) {
        return Err(Error::truncated(what));
    }
    Err(Error::NotImage("unrecognised file signature".into()))
}

/// If `head` is a proper prefix (of two bytes or more) of a signature, the header it names.
fn cut_signature(head: &[u8]) -> Option<&'static str> {
    let is_cut = |sig: &[u8]| head.len() >= 2 && head.len() < sig.len() && sig.starts_with(head);
    if SIGNATURES.iter().any(|(sig, _)| is_cut(sig)) {
        return Some("file signature");
    }
    let riff_cut = head.len() < 12
        && (is_cut(b"RIFF") || head.starts_with(b"RIFF"))
        && b"WEBP".starts_with(head.get(8..).unwrap_or_default());
    if riff_cut {
        return Some("WebP header");
    }
    let ftyp_cut =
        (5..8).contains(&head.len()) && b"ftyp".starts_with(head.get(4..).unwrap_or_default());
    ftyp_cut.then_some("ISO-BMFF header")
}

/// Build the result, rejecting a zero width or height as `Corrupt`.
fn finish(format: Format, width: u32, height: u32, orientation: Option<u16>) -> Result<HeaderInfo> {
    if width == 0 || height == 0 {
        return Err(Error::Corrupt(format!(
            "{} header declares a zero dimension ({width}x{height})",
            format.as_str()
        )));
    }
    Ok(HeaderInfo {
        format,
        width,
        height,
        orientation,
    })
}
