//! ISO base media file format (ISO/IEC 14496-12) boxes, as used by HEIF (AVIF, HEIC) and
//! the JPEG XL container.
//!
//! A box is `size u32 BE, type [u8; 4], body`. `size` counts the header too; 1 means a u64
//! `largesize` follows the type, 0 means "to the end of the enclosing data" (the file, at
//! the top level). A file starts with `ftyp`: major brand, minor version, then compatible
//! brands, 4 bytes each. Brands decide the format:
//!
//! * `avif`, `avis` → AVIF;
//! * `heic`, `heix`, `hevc`, `hevx`, `heim`, `heis`, `hevm`, `hevs` → HEIC;
//! * `mif1`, `msf1` (generic HEIF) → AVIF if an AV1 brand is among the compatible brands,
//!   else HEIC;
//! * `jxl ` → JPEG XL.
//!
//! Anything else (MP4, QuickTime, CR3...) is not an image we read.

use super::src::Src;
use super::{Format, MAX_ITEMS};
use crate::error::{Error, Result};
use std::io::{Read, Seek};

pub(super) const WHAT: &str = "ISO-BMFF header";

/// Bytes of `ftyp` we look at: the major brand, minor version and 1022 compatible brands.
const FTYP_CAP: usize = 4096;

/// A box header read from the file: where its body starts and where the box ends.
#[derive(Debug, Clone, Copy)]
pub(super) struct BoxHeader {
    pub(super) ty: [u8; 4],
    pub(super) body: u64,
    pub(super) end: u64,
}

impl BoxHeader {
    pub(super) fn body_len(&self) -> u64 {
        self.end.saturating_sub(self.body)
    }
}

/// Read the header of the box at the current position. `end` may lie past the end of
/// the file; callers check before relying on it.
pub(super) fn read_box_header<R: Read + Seek>(
    src: &mut Src<'_, R>,
    what: &str,
) -> Result<BoxHeader> {
    let start = src.pos();
    let h = src.array::<8>(what)?;
    let size = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    let ty = [h[4], h[5], h[6], h[7]];
    let (size, header_len) = match size {
        0 => (src.file_len().saturating_sub(start), 8),
        1 => (u64::from_be_bytes(src.array::<8>(what)?), 16),
        n => (u64::from(n), 8),
    };
    if size < header_len {
        return Err(Error::Corrupt(format!(
            "box size {size} is smaller than its header"
        )));
    }
    let end = start
        .checked_add(size)
        .ok_or_else(|| Error::Corrupt("box size overflows".into()))?;
    Ok(BoxHeader {
        ty,
        body: start.saturating_add(header_len),
        end,
    })
}

/// Visit top-level boxes from the current position, calling `visit` on each until it
/// returns `Some`. The reader is positioned at the box body when `visit` runs, and moved
/// to the box end afterwards. Running out of boxes gives `Ok(None)`; a box reaching past
/// the end of the file (before we found what we wanted) is `Truncated`.
pub(super) fn walk<R, T, F>(src: &mut Src<'_, R>, what: &str, mut visit: F) -> Result<Option<T>>
where
    R: Read + Seek,
    F: FnMut(&mut Src<'_, R>, &BoxHeader) -> Result<Option<T>>,
{
    for _ in 0..MAX_ITEMS {
        if src.remaining() == 0 {
            return Ok(None);
        }
        let b = read_box_header(src, what)?;
        if let Some(found) = visit(src, &b)? {
            return Ok(Some(found));
        }
        src.seek_to(b.end, what)?;
    }
    Ok(None)
}

/// A box inside an in-memory buffer.
#[derive(Debug, Clone, Copy)]
pub(super) struct SubBox<'a> {
    pub(super) ty: [u8; 4],
    pub(super) body: &'a [u8],
}

/// Split `data` into consecutive boxes (at most [`MAX_ITEMS`]). A box that does not fit
/// is `Corrupt`: the enclosing box was read whole, so this is not truncation.
pub(super) fn children(mut data: &[u8]) -> Result<Vec<SubBox<'_>>> {
    let mut out = Vec::new();
    while !data.is_empty() && out.len() < MAX_ITEMS as usize {
        let (b, rest) = split_box(data)?;
        out.push(b);
        data = rest;
    }
    Ok(out)
}

/// The first box of `data` and what follows it.
fn split_box(data: &[u8]) -> Result<(SubBox<'_>, &[u8])> {
    let bad = || Error::Corrupt("malformed box inside meta".into());
    let size = super::bytes::be32(data, 0).ok_or_else(bad)?;
    let ty = super::bytes::arr::<4>(data, 4).ok_or_else(bad)?;
    let (size, header_len) = match size {
        0 => (data.len() as u64, 8),
        1 => (super::bytes::be64(data, 8).ok_or_else(bad)?, 16),
        n => (u64::from(n), 8),
    };
    let size = usize::try_from(size).map_err(|_| bad())?;
    if size < header_len {
        return Err(bad());
    }
    let body = data.get(header_len..size).ok_or_else(bad)?;
    let rest = data.get(size..).ok_or_else(bad)?;
    Ok((SubBox { ty, body }, rest))
}

/// The format named by an `ftyp` body, if it is one we read.
pub(super) fn classify_ftyp(body: &[u8]) -> Option<Format> {
    let major: [u8; 4] = super::bytes::arr(body, 0)?;
    let compatible = || body.get(8..).unwrap_or_default().chunks_exact(4);
    let has = |brands: &[&[u8; 4]]| compatible().any(|c| brands.iter().any(|b| c == b.as_slice()));
    const AVIF: [&[u8; 4]; 2] = [b"avif", b"avis"];
    const HEIC: [&[u8; 4]; 8] = [
        b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs",
    ];
    const HEIF: [&[u8; 4]; 2] = [b"mif1", b"msf1"];
    if AVIF.contains(&&major) {
        Some(Format::Avif)
    } else if HEIC.contains(&&major) {
        Some(Format::Heic)
    } else if &major == b"jxl " {
        Some(Format::Jxl)
    } else if has(&AVIF) {
        Some(Format::Avif)
    } else if has(&HEIC) || HEIF.contains(&&major) || has(&HEIF) {
        Some(Format::Heic)
    } else {
        None
    }
}

/// Read the `ftyp` box that starts the file and classify its brands; the reader is left after
/// it, at the first box the format's parser walks.
pub(super) fn read_ftyp<R: Read + Seek>(src: &mut Src<'_, R>) -> Result<Format> {
    let ftyp = read_box_header(src, WHAT)?;
    if &ftyp.ty != b"ftyp" {
        return Err(Error::NotImage("unrecognised file signature".into()));
    }
    let take = ftyp.body_len().min(FTYP_CAP as u64);
    let body = src
        .read_vec(take.min(src.remaining()), FTYP_CAP, WHAT)?
        .unwrap_or_default();
    let format = classify_ftyp(&body)
        .ok_or_else(|| Error::NotImage("ISO-BMFF file of a non-image brand".into()))?;
    src.seek_to(ftyp.end, WHAT)?;
    Ok(format)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A box with a 32-bit size.
    pub(crate) fn bx(ty: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut b = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        b.extend_from_slice(ty);
        b.extend_from_slice(body);
        b
    }

    /// A full box (version and flags before the body).
    pub(crate) fn full(ty: &[u8; 4], version: u8, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut v = vec![version];
        v.extend_from_slice(&flags.to_be_bytes()[1..]);
        v.extend_from_slice(body);
        bx(ty, &v)
    }

    pub(crate) fn ftyp(major: &[u8; 4], compatible: &[&[u8; 4]]) -> Vec<u8> {
        let mut b = major.to_vec();
        b.extend_from_slice(&[0; 4]);
        for c in compatible {
            b.extend_from_slice(*c);
        }
        bx(b"ftyp", &b)
    }

    fn brands(major: &[u8; 4], compatible: &[&[u8; 4]]) -> Option<Format> {
        classify_ftyp(&ftyp(major, compatible)[8..])
    }

    #[test]
    fn brand_classification() {
        assert_eq!(brands(b"avif", &[b"mif1"]), Some(Format::Avif));
        assert_eq!(brands(b"avis", &[]), Some(Format::Avif));
        assert_eq!(
            brands(b"mif1", &[b"mif1", b"avif", b"miaf"]),
            Some(Format::Avif)
        );
        assert_eq!(brands(b"mif1", &[b"mif1", b"heic"]), Some(Format::Heic));
        assert_eq!(brands(b"mif1", &[]), Some(Format::Heic));
        assert_eq!(brands(b"msf1", &[b"hevc"]), Some(Format::Heic));
        assert_eq!(brands(b"heix", &[b"avif"]), Some(Format::Heic));
        assert_eq!(brands(b"jxl ", &[]), Some(Format::Jxl));
        assert_eq!(brands(b"isom", &[b"iso2", b"mp41"]), None);
        assert_eq!(brands(b"crx ", &[b"isom"]), None);
        assert_eq!(classify_ftyp(b"av"), None);
    }

    #[test]
    fn box_splitting() {
        let mut data = bx(b"abcd", b"12");
        data.extend(bx(b"efgh", b""));
        let kids = children(&data).unwrap();
        assert_eq!(kids.len(), 2);
        assert_eq!((&kids[0].ty, kids[0].body), (b"abcd", &b"12"[..]));
        let mut large = vec![0, 0, 0, 1];
        large.extend_from_slice(b"wide");
        large.extend_from_slice(&18u64.to_be_bytes());
        large.extend_from_slice(b"xy");
        assert_eq!(children(&large).unwrap()[0].body, b"xy");
        let to_end = [0, 0, 0, 0, b'z', b'z', b'z', b'z', 9];
        assert_eq!(children(&to_end).unwrap()[0].body, &[9]);
        assert!(children(&[0, 0, 0, 4, b'a', b'b', b'c', b'd']).is_err());
        assert!(children(&[0, 0, 0, 100, b'a', b'b', b'c', b'd']).is_err());
        assert!(children(&[0, 0, 1]).is_err());
    }

    #[test]
    fn non_image_ftyp() {
        let mut mp4 = ftyp(b"isom", &[b"isom", b"mp41"]);
        mp4.extend(bx(b"mdat", &[0; 32]));
        let r = crate::header::tests::probe_bytes(&mp4);
        assert!(matches!(r, Err(Error::NotImage(_))), "{r:?}");
    }
}
