//! WebP: a RIFF file, `RIFF size u32 LE "WEBP"`, then chunks `fourcc, size u32 LE, data`
//! padded to an even length. The first chunk decides the variant:
//!
//! * `VP8 ` (lossy): a 3-byte frame tag (bit 0 clear for a key frame), the start code
//!   `9D 01 2A`, then u16 LE width and height whose low 14 bits are the size (the top two
//!   are an upscaling hint).
//! * `VP8L` (lossless): the signature byte `2F`, then a u32 LE holding width-1 (14 bits),
//!   height-1 (14 bits), an alpha hint (1 bit) and a version (3 bits, must be 0).
//! * `VP8X` (extended): flags u8 (ICC `0x20`, alpha `0x10`, EXIF `0x08`, XMP `0x04`,
//!   animation `0x02`), 3 reserved bytes, canvas width-1 and height-1 as u24 LE. When the
//!   EXIF flag is set, an `EXIF` chunk (a TIFF structure, usually after the image data)
//!   carries the orientation; we seek chunk to chunk to find it and ignore it if broken.

use super::bytes::{le16, le24, le32};
use super::src::Src;
use super::tiff::exif_orientation;
use super::{finish, Format, EXIF_CAP, MAX_ITEMS};
use crate::error::{Error, Result};
use crate::header::HeaderInfo;
use std::io::{Read, Seek};

const WHAT: &str = "WebP header";
/// Offset of the first chunk's data (RIFF header 12 + chunk header 8).
const DATA: usize = 20;
const VP8X_EXIF_FLAG: u8 = 0x08;

pub(super) fn probe<R: Read + Seek>(src: &mut Src<'_, R>) -> Result<HeaderInfo> {
    let head = src.head();
    let fourcc = head.get(12..16).ok_or_else(|| Error::truncated(WHAT))?;
    let size = le32(head, 16).ok_or_else(|| Error::truncated(WHAT))?;
    let data = head.get(DATA..).unwrap_or_default();
    match fourcc {
        b"VP8 " => lossy(data, size),
        b"VP8L" => lossless(data, size),
        b"VP8X" => extended(src, size),
        _ => Err(Error::Corrupt(
            "WebP does not start with a VP8, VP8L or VP8X chunk".into(),
        )),
    }
}

/// `VP8 ` key-frame header.
fn lossy(d: &[u8], size: u32) -> Result<HeaderInfo> {
    if size < 10 {
        return Err(Error::Corrupt("WebP VP8 chunk is too short".into()));
    }
    let tag = le24(d, 0).ok_or_else(|| Error::truncated(WHAT))?;
    let start = d.get(3..6).ok_or_else(|| Error::truncated(WHAT))?;
    let w = le16(d, 6).ok_or_else(|| Error::truncated(WHAT))?;
    let h = le16(d, 8).ok_or_else(|| Error::truncated(WHAT))?;
    if tag & 1 != 0 || start != [0x9D, 0x01, 0x2A] {
        return Err(Error::Corrupt(
            "WebP VP8 data does not start with a key frame".into(),
        ));
    }
    finish(
        Format::Webp,
        u32::from(w & 0x3FFF),
        u32::from(h & 0x3FFF),
        None,
    )
}

/// `VP8L` header.
fn lossless(d: &[u8], size: u32) -> Result<HeaderInfo> {
    if size < 5 {
        return Err(Error::Corrupt("WebP VP8L chunk is too short".into()));
    }
    let sig = d.first().ok_or_else(|| Error::truncated(WHAT))?;
    let bits = le32(d, 1).ok_or_else(|| Error::truncated(WHAT))?;
    if *sig != 0x2F || bits >> 29 != 0 {
        return Err(Error::Corrupt("bad WebP VP8L signature or version".into()));
    }
    finish(
        Format::Webp,
        (bits & 0x3FFF) + 1,
        ((bits >> 14) & 0x3FFF) + 1,
        None,
    )
}

/// `VP8X` header, plus the EXIF chunk's orientation when the flag says there is one.
fn extended<R: Read + Seek>(src: &mut Src<'_, R>, size: u32) -> Result<HeaderInfo> {
    if size < 10 {
        return Err(Error::Corrupt("WebP VP8X chunk is too short".into()));
    }
    let d = src.head().get(DATA..).unwrap_or_default();
    let flags = *d.first().ok_or_else(|| Error::truncated(WHAT))?;
    let w = le24(d, 4).ok_or_else(|| Error::truncated(WHAT))?;
    let h = le24(d, 7).ok_or_else(|| Error::truncated(WHAT))?;
    let orientation = if flags & VP8X_EXIF_FLAG != 0 {
        let next = DATA as u64 + padded(size);
        find_exif(src, next).ok().flatten()
    } else {
        None
    };
    finish(Format::Webp, w + 1, h + 1, orientation)
}

/// Chunk data length including the pad byte of odd sizes.
fn padded(size: u32) -> u64 {
    u64::from(size) + u64::from(size & 1)
}

/// Visit chunks from offset `pos` until `EXIF`; returns its orientation.
fn find_exif<R: Read + Seek>(src: &mut Src<'_, R>, mut pos: u64) -> Result<Option<u16>> {
    for _ in 0..MAX_ITEMS {
        src.seek_to(pos, WHAT)?;
        let h = src.array::<8>(WHAT)?;
        let size = le32(&h, 4).unwrap_or(0);
        if h.get(..4) == Some(b"EXIF") {
            let data = src.read_vec(size.into(), EXIF_CAP, WHAT)?;
            return Ok(data.and_then(|d| exif_orientation(&d)));
        }
        pos = pos.saturating_add(8 + padded(size));
    }
    Ok(None)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::header::bytes::Endian;
    use crate::header::tests::probe_bytes;
    use crate::header::tiff::tests::exif;

    fn chunk(fourcc: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut c = fourcc.to_vec();
        c.extend_from_slice(&(data.len() as u32).to_le_bytes());
        c.extend_from_slice(data);
        if data.len() % 2 == 1 {
            c.push(0);
        }
        c
    }

    fn riff(chunks: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = chunks.concat();
        let mut r = b"RIFF".to_vec();
        r.extend_from_slice(&((body.len() + 4) as u32).to_le_bytes());
        r.extend_from_slice(b"WEBP");
        r.extend(body);
        r
    }

    pub(crate) fn vp8(w: u16, h: u16) -> Vec<u8> {
        let mut d = vec![0x30, 0x01, 0x00, 0x9D, 0x01, 0x2A];
        d.extend_from_slice(&(w | 0x4000).to_le_bytes()); // with an upscale hint
        d.extend_from_slice(&h.to_le_bytes());
        d.extend_from_slice(&[0; 8]);
        riff(&[chunk(b"VP8 ", &d)])
    }

    pub(crate) fn vp8l(w: u32, h: u32) -> Vec<u8> {
        let bits = (w - 1) | ((h - 1) << 14) | (1 << 28);
        let mut d = vec![0x2F];
        d.extend_from_slice(&bits.to_le_bytes());
        d.extend_from_slice(&[0; 3]);
        riff(&[chunk(b"VP8L", &d)])
    }

    pub(crate) fn vp8x(w: u32, h: u32, exif_payload: Option<Vec<u8>>) -> Vec<u8> {
        let flags = if exif_payload.is_some() {
            VP8X_EXIF_FLAG | 0x10
        } else {
            0x10
        };
        let mut d = vec![flags, 0, 0, 0];
        d.extend_from_slice(&(w - 1).to_le_bytes()[..3]);
        d.extend_from_slice(&(h - 1).to_le_bytes()[..3]);
        let mut chunks = vec![chunk(b"VP8X", &d), chunk(b"ALPH", &[0; 7])];
        chunks.push(vp8(w as u16, h as u16).split_off(12));
        if let Some(e) = exif_payload {
            chunks.push(chunk(b"EXIF", &e));
        }
        riff(&chunks)
    }

    #[test]
    fn three_variants() {
        let i = probe_bytes(&vp8(16383, 2)).unwrap();
        assert_eq!(
            (i.format, i.width, i.height, i.orientation),
            (Format::Webp, 16383, 2, None)
        );
        let i = probe_bytes(&vp8l(16384, 1)).unwrap();
        assert_eq!((i.width, i.height), (16384, 1));
        let i = probe_bytes(&vp8x(1 << 24, 300, None)).unwrap();
        assert_eq!((i.width, i.height, i.orientation), (1 << 24, 300, None));
    }

    #[test]
    fn vp8x_exif() {
        for order in [Endian::Little, Endian::Big] {
            let i = probe_bytes(&vp8x(100, 30, Some(exif(order, 6)))).unwrap();
            assert_eq!((i.width, i.height, i.orientation), (100, 30, Some(6)));
        }
        let mut with_prefix = b"Exif\0\0".to_vec();
        with_prefix.extend(exif(Endian::Big, 7));
        assert_eq!(
            probe_bytes(&vp8x(9, 9, Some(with_prefix)))
                .unwrap()
                .orientation,
            Some(7)
        );
        // Flag set but the chunk is missing or cut: orientation unknown, sizes still fine.
        let mut no_chunk = vp8x(9, 9, None);
        no_chunk[20] |= VP8X_EXIF_FLAG;
        assert_eq!(probe_bytes(&no_chunk).unwrap().orientation, None);
        let mut cut = vp8x(9, 9, Some(exif(Endian::Big, 7)));
        cut.truncate(cut.len() - 4);
        assert_eq!(probe_bytes(&cut).unwrap().orientation, None);
    }

    #[test]
    fn errors() {
        let mut not_key = vp8(5, 5);
        not_key[20] |= 1;
        assert!(matches!(probe_bytes(&not_key), Err(Error::Corrupt(_))));
        let mut bad_start = vp8(5, 5);
        bad_start[23] = 0;
        assert!(matches!(probe_bytes(&bad_start), Err(Error::Corrupt(_))));
        assert!(matches!(probe_bytes(&vp8(0, 5)), Err(Error::Corrupt(_))));
        let mut bad_sig = vp8l(5, 5);
        bad_sig[20] = 0x2E;
        assert!(matches!(probe_bytes(&bad_sig), Err(Error::Corrupt(_))));
        let unknown = riff(&[chunk(b"ICCP", &[0; 12])]);
        assert!(matches!(probe_bytes(&unknown), Err(Error::Corrupt(_))));
        assert!(matches!(
            probe_bytes(&vp8(5, 5)[..25]),
            Err(Error::Truncated(_))
        ));
        let wave = b"RIFF\x24\0\0\0WAVEfmt \x10\0\0\0\x01\0\x02\0";
        assert!(matches!(probe_bytes(wave), Err(Error::NotImage(_))));
    }
}
