//! PNG: the 8-byte signature, then chunks `length u32 BE, type [u8; 4], data, CRC u32`.
//!
//! * IHDR must be the first chunk (13 bytes: width u32 BE, height u32 BE, depth, colour
//!   type, compression, filter, interlace). Apple's "CgBI" PNGs put a `CgBI` chunk before
//!   it, which we step over.
//! * `eXIf` holds a TIFF structure (EXIF) whose orientation we report. It must come before
//!   IDAT, so chunks are walked (seeking over their data) until IDAT or IEND.
//! * Chunk lengths above 2^31 - 1 are invalid.
//!
//! Once IHDR has been read the size is known: the walk for `eXIf` is best effort, and a
//! file that ends (or goes wrong) before IDAT just has no orientation. Decoders, not this
//! header probe, judge whether the pixel data is complete.

use super::bytes::be32;
use super::src::Src;
use super::tiff::exif_orientation;
use super::{finish, Format, EXIF_CAP, MAX_ITEMS};
use crate::error::{Error, Result};
use crate::header::HeaderInfo;
use std::io::{Read, Seek};

const WHAT: &str = "PNG header";
const MAX_CHUNK_LEN: u32 = 0x7FFF_FFFF;
const CRC_LEN: u64 = 4;

pub(super) fn probe<R: Read + Seek>(src: &mut Src<'_, R>) -> Result<HeaderInfo> {
    src.seek_to(8, WHAT)?;
    let (mut len, mut ty) = chunk_header(src)?;
    if &ty == b"CgBI" {
        src.skip(u64::from(len) + CRC_LEN, WHAT)?;
        (len, ty) = chunk_header(src)?;
    }
    if &ty != b"IHDR" || len != 13 {
        return Err(Error::Corrupt(
            "PNG does not start with a 13-byte IHDR chunk".into(),
        ));
    }
    let ihdr = src.array::<13>(WHAT)?;
    src.skip(CRC_LEN, WHAT)?;
    let (w, h) = be32(&ihdr, 0)
        .zip(be32(&ihdr, 4))
        .ok_or_else(|| Error::truncated(WHAT))?;
    let orientation = find_exif(src).unwrap_or(None);
    finish(Format::Png, w, h, orientation)
}

/// Read a chunk's length and type.
fn chunk_header<R: Read + Seek>(src: &mut Src<'_, R>) -> Result<(u32, [u8; 4])> {
    let h = src.array::<8>(WHAT)?;
    let len = be32(&h, 0).unwrap_or(0);
    if len > MAX_CHUNK_LEN {
        return Err(Error::Corrupt(format!(
            "PNG chunk length {len} is out of range"
        )));
    }
    let ty = [h[4], h[5], h[6], h[7]];
    Ok((len, ty))
}

/// Walk the chunks after IHDR up to IDAT; returns the first `eXIf` chunk's orientation.
fn find_exif<R: Read + Seek>(src: &mut Src<'_, R>) -> Result<Option<u16>> {
    for _ in 0..MAX_ITEMS {
        let (len, ty) = chunk_header(src)?;
        match &ty {
            b"IDAT" | b"IEND" => return Ok(None),
            b"eXIf" => {
                let data = src.read_vec(len.into(), EXIF_CAP, WHAT)?;
                return Ok(data.and_then(|d| exif_orientation(&d)));
            }
            _ => src.skip(u64::from(len) + CRC_LEN, WHAT)?,
        }
    }
    Ok(None)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::header::bytes::Endian;
    use crate::header::tests::{probe_bytes, CountingReader};
    use crate::header::tiff::tests::exif;

    /// A chunk with a dummy CRC (we never check CRCs).
    fn chunk(ty: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(ty);
        c.extend_from_slice(data);
        c.extend_from_slice(&[0xDE, 0xAD, 0xBE, 0xEF]);
        c
    }

    pub(crate) fn png(w: u32, h: u32, extra: &[Vec<u8>]) -> Vec<u8> {
        let mut p = b"\x89PNG\r\n\x1A\n".to_vec();
        let mut ihdr = w.to_be_bytes().to_vec();
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 6, 0, 0, 0]);
        p.extend(chunk(b"IHDR", &ihdr));
        for c in extra {
            p.extend_from_slice(c);
        }
        p.extend(chunk(b"IDAT", &[0x78, 0x9C, 0x03, 0x00]));
        p.extend(chunk(b"IEND", &[]));
        p
    }

    pub(crate) fn png_with_exif(w: u32, h: u32, order: Endian, o: u16) -> Vec<u8> {
        png(
            w,
            h,
            &[chunk(b"sRGB", &[0]), chunk(b"eXIf", &exif(order, o))],
        )
    }

    #[test]
    fn plain() {
        let i = probe_bytes(&png(100_000, 100_000, &[])).unwrap();
        assert_eq!(
            (i.format, i.width, i.height, i.orientation),
            (Format::Png, 100_000, 100_000, None)
        );
    }

    #[test]
    fn exif_chunk() {
        for order in [Endian::Little, Endian::Big] {
            let i = probe_bytes(&png_with_exif(3, 4, order, 8)).unwrap();
            assert_eq!((i.width, i.height, i.orientation), (3, 4, Some(8)));
        }
        // eXIf after IDAT is not looked at.
        let mut late = png(3, 4, &[]);
        let iend = late.split_off(late.len() - 12);
        late.extend(chunk(b"eXIf", &exif(Endian::Big, 6)));
        late.extend(iend);
        assert_eq!(probe_bytes(&late).unwrap().orientation, None);
        // A broken eXIf is ignored.
        let broken = png(3, 4, &[chunk(b"eXIf", b"garbage")]);
        assert_eq!(probe_bytes(&broken).unwrap().orientation, None);
    }

    #[test]
    fn cgbi() {
        let mut p = png(9, 10, &[]);
        p.splice(8..8, chunk(b"CgBI", &[0x50, 0, 0x20, 0x06]));
        assert_eq!(probe_bytes(&p).unwrap().width, 9);
    }

    #[test]
    fn errors() {
        assert!(matches!(
            probe_bytes(&png(0, 10, &[])),
            Err(Error::Corrupt(_))
        ));
        let mut not_first = png(1, 1, &[]);
        not_first.splice(8..8, chunk(b"tEXt", b"a\0b"));
        assert!(matches!(probe_bytes(&not_first), Err(Error::Corrupt(_))));
        let p = png(1, 1, &[]);
        assert!(matches!(probe_bytes(&p[..20]), Err(Error::Truncated(_))));
        assert!(matches!(probe_bytes(&p[..32]), Err(Error::Truncated(_))));
    }

    #[test]
    fn trouble_after_ihdr_only_loses_the_orientation() {
        let p = png(2, 3, &[]);
        // IHDR and its CRC only (a header-only file), or cut inside the next chunk.
        for cut in [&p[..33], &p[..37]] {
            let i = probe_bytes(cut).unwrap();
            assert_eq!((i.width, i.height, i.orientation), (2, 3, None));
        }
        let past_end = [&0x7000_0000u32.to_be_bytes()[..], b"eXIf"].concat();
        assert_eq!(
            probe_bytes(&png(1, 1, &[past_end])).unwrap().orientation,
            None
        );
        let huge = [&0xFFFF_FFF0u32.to_be_bytes()[..], b"tEXt"].concat();
        assert_eq!(probe_bytes(&png(1, 1, &[huge])).unwrap().orientation, None);
    }

    #[test]
    fn big_ancillary_chunks_are_seeked_over() {
        let big_text = chunk(b"zTXt", &vec![b'x'; 2 << 20]);
        let big_exif = chunk(b"eXIf", &vec![0u8; 200_000]);
        let p = png(5, 6, &[big_text, big_exif]);
        let (info, read) = CountingReader::probe(&p);
        assert_eq!(info.unwrap().orientation, None);
        assert!(read < 64 * 1024, "read {read} bytes");
    }
}
