//! Image header probing: format, stored width/height and EXIF orientation, read from the
//! first bytes of a file without decoding pixels and without allocating from declared sizes.

use crate::error::Result;
use std::io::{Read, Seek};

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

/// Probe a reader positioned at the start of the file. `len` is the file size in bytes.
pub fn probe<R: Read + Seek>(r: &mut R, len: u64) -> Result<HeaderInfo> {
    imp::probe(r, len)
}

mod imp;
