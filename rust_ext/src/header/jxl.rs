//! JPEG XL (ISO/IEC 18181): a bare codestream starting `FF 0A`, or an ISO-BMFF container
//! starting with the 12-byte signature box `JXL ` whose codestream sits in one `jxlc` box
//! or is split over `jxlp` boxes (each starting with a u32 sequence number).
//!
//! After `FF 0A` the codestream holds, bit-packed least-significant bit first:
//!
//! ```text
//! SizeHeader
//!   small: Bool
//!   small  → height = (u(5) + 1) * 8
//!   !small → height = U32(1 + u(9), 1 + u(13), 1 + u(18), 1 + u(30))   (2-bit selector)
//!   ratio: u(3)
//!   ratio != 0 → width = height * num / den   for (1,1) (12,10) (4,3) (3,2) (16,9) (5,4) (2,1)
//!   ratio == 0 → width like height (u(5) when small, else the U32 above)
//! ImageMetadata
//!   all_default: Bool          — if set, orientation is the default (not reported)
//!   extra_fields: Bool         — if clear, likewise
//!   orientation: u(3) + 1      — same meaning as EXIF orientation
//! ```

use super::bmff::{self, BoxHeader};
use super::src::Src;
use super::{finish, Format};
use crate::error::{Error, Result};
use crate::header::HeaderInfo;
use std::io::{Read, Seek};

const WHAT: &str = "JPEG XL header";

/// The signature box that starts the container format.
pub(super) const CONTAINER_SIGNATURE: &[u8] = b"\0\0\0\x0CJXL \r\n\x87\n";

/// Codestream bytes we gather: the headers we parse take at most 11.
const PREFIX: usize = 32;

/// Probe a bare codestream.
pub(super) fn probe_codestream<R: Read + Seek>(src: &mut Src<'_, R>) -> Result<HeaderInfo> {
    let n = src.remaining().min(PREFIX as u64) as usize;
    let mut buf = vec![0u8; n];
    src.read_exact(&mut buf, WHAT)?;
    parse_codestream(&buf)
}

/// Probe the container: skip the signature box, then walk boxes.
pub(super) fn probe_container<R: Read + Seek>(src: &mut Src<'_, R>) -> Result<HeaderInfo> {
    src.seek_to(CONTAINER_SIGNATURE.len() as u64, WHAT)?;
    probe_boxes(src)
}

/// Walk container boxes from the current position, gathering the start of the codestream
/// from `jxlc` or from the `jxlp` boxes in file order.
pub(super) fn probe_boxes<R: Read + Seek>(src: &mut Src<'_, R>) -> Result<HeaderInfo> {
    let mut prefix = Vec::with_capacity(PREFIX);
    let walked = bmff::walk(src, WHAT, |src, b| gather(src, b, &mut prefix));
    match walked {
        Ok(Some(())) => parse_codestream(&prefix),
        // Ran out of boxes (or file) after some jxlp data: parse what we have.
        Ok(None) | Err(Error::Truncated(_)) if !prefix.is_empty() => parse_codestream(&prefix),
        Ok(None) => Err(Error::Corrupt(
            "JPEG XL container has no codestream box".into(),
        )),
        Err(e) => Err(e),
    }
}

/// Add a codestream box's leading bytes to `prefix`; `Some(())` once we have enough.
fn gather<R: Read + Seek>(
    src: &mut Src<'_, R>,
    b: &BoxHeader,
    prefix: &mut Vec<u8>,
) -> Result<Option<()>> {
    let mut avail = b.body_len().min(src.remaining());
    match &b.ty {
        b"jxlc" => {}
        b"jxlp" => {
            if avail < 4 {
                return Ok(None);
            }
            src.skip(4, WHAT)?;
            avail -= 4;
        }
        _ => return Ok(None),
    }
    let want = (PREFIX - prefix.len()).min(usize::try_from(avail).unwrap_or(PREFIX));
    let start = prefix.len();
    prefix.resize(start + want, 0);
    src.read_exact(prefix.get_mut(start..).unwrap_or_default(), WHAT)?;
    let done = &b.ty == b"jxlc" || prefix.len() >= PREFIX;
    Ok(done.then_some(()))
}

/// Parse `FF 0A`, the SizeHeader and the start of ImageMetadata.
fn parse_codestream(cs: &[u8]) -> Result<HeaderInfo> {
    match cs.get(..2) {
        Some([0xFF, 0x0A]) => {}
        Some(_) => {
            return Err(Error::Corrupt(
                "JPEG XL codestream lacks its FF 0A signature".into(),
            ))
        }
        None => return Err(Error::truncated(WHAT)),
    }
    let mut bits = Bits::new(cs.get(2..).unwrap_or_default());
    let (w, h) = size_header(&mut bits)?;
    let orientation = orientation(&mut bits)?;
    finish(Format::Jxl, w, h, orientation)
}

/// SizeHeader → (width, height).
fn size_header(bits: &mut Bits<'_>) -> Result<(u32, u32)> {
    let small = bits.bool()?;
    let height = dimension(bits, small)?;
    let ratio = bits.read(3)?;
    let width = match ratio_of(ratio) {
        Some((num, den)) => height * num / den,
        None => dimension(bits, small)?,
    };
    let fit =
        |v: u64| u32::try_from(v).map_err(|_| Error::Corrupt("JPEG XL size out of range".into()));
    Ok((fit(width)?, fit(height)?))
}

/// One dimension: `(u(5) + 1) * 8` when small, else a U32 with offsets of 1.
fn dimension(bits: &mut Bits<'_>, small: bool) -> Result<u64> {
    if small {
        return Ok((bits.read(5)? + 1) * 8);
    }
    let n = match bits.read(2)? {
        0 => 9,
        1 => 13,
        2 => 18,
        _ => 30,
    };
    Ok(bits.read(n)? + 1)
}

/// The fixed aspect ratios (numerator, denominator) of SizeHeader's `ratio` field.
fn ratio_of(ratio: u64) -> Option<(u64, u64)> {
    match ratio {
        1 => Some((1, 1)),
        2 => Some((12, 10)),
        3 => Some((4, 3)),
        4 => Some((3, 2)),
        5 => Some((16, 9)),
        6 => Some((5, 4)),
        7 => Some((2, 1)),
        _ => None,
    }
}

/// ImageMetadata's orientation when it is explicitly coded.
fn orientation(bits: &mut Bits<'_>) -> Result<Option<u16>> {
    if bits.bool()? || !bits.bool()? {
        return Ok(None); // all_default, or no extra_fields
    }
    Ok(Some(bits.read(3)? as u16 + 1))
}

/// Least-significant-bit-first reader over a byte slice.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8]) -> Self {
        Bits { data, pos: 0 }
    }

    /// Read `n` ≤ 32 bits; the first bit read is the least significant.
    fn read(&mut self, n: u32) -> Result<u64> {
        let mut v = 0u64;
        for i in 0..n.min(32) {
            let byte = self
                .data
                .get(self.pos / 8)
                .ok_or_else(|| Error::truncated(WHAT))?;
            let bit = (byte >> (self.pos % 8)) & 1;
            v |= u64::from(bit) << i;
            self.pos += 1;
        }
        Ok(v)
    }

    fn bool(&mut self) -> Result<bool> {
        Ok(self.read(1)? == 1)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::header::bmff::tests::{bx, ftyp};
    use crate::header::tests::probe_bytes;

    /// LSB-first bit writer.
    #[derive(Default)]
    struct Writer {
        bytes: Vec<u8>,
        n: usize,
    }

    impl Writer {
        fn put(&mut self, v: u64, bits: u32) -> &mut Self {
            for i in 0..bits {
                if self.n & 7 == 0 {
                    self.bytes.push(0);
                }
                let bit = ((v >> i) & 1) as u8;
                *self.bytes.last_mut().unwrap() |= bit << (self.n % 8);
                self.n += 1;
            }
            self
        }

        fn dim(&mut self, v: u64) -> &mut Self {
            let (sel, bits) = match v - 1 {
                x if x < 1 << 9 => (0, 9),
                x if x < 1 << 13 => (1, 13),
                x if x < 1 << 18 => (2, 18),
                _ => (3, 30),
            };
            self.put(sel, 2).put(v - 1, bits)
        }
    }

    /// A codestream header with explicit sizes and, optionally, an orientation.
    pub(crate) fn codestream(w: u64, h: u64, orientation: Option<u64>) -> Vec<u8> {
        let mut wr = Writer::default();
        wr.put(0, 1).dim(h).put(0, 3).dim(w);
        match orientation {
            Some(o) => wr.put(0, 1).put(1, 1).put(o - 1, 3).put(0, 3),
            None => wr.put(1, 1),
        };
        wr.put(0, 40);
        [vec![0xFF, 0x0A], wr.bytes].concat()
    }

    pub(crate) fn container(cs: &[u8], split: bool) -> Vec<u8> {
        let mut f = CONTAINER_SIGNATURE.to_vec();
        f.extend(ftyp(b"jxl ", &[b"jxl "]));
        f.extend(bx(b"jxll", &[5]));
        f.extend(bx(b"Exif", &[0, 0, 0, 0, b'M', b'M', 0, 42]));
        if split {
            let (a, b) = cs.split_at(3);
            f.extend(bx(b"jxlp", &[&0u32.to_be_bytes()[..], a].concat()));
            f.extend(bx(b"brob", b"xml junk"));
            f.extend(bx(
                b"jxlp",
                &[&0x8000_0001u32.to_be_bytes()[..], b].concat(),
            ));
        } else {
            f.extend(bx(b"jxlc", cs));
        }
        f
    }

    #[test]
    fn explicit_sizes_and_orientation() {
        let i = probe_bytes(&codestream(100_000, 100_000, Some(6))).unwrap();
        assert_eq!(
            (i.format, i.width, i.height, i.orientation),
            (Format::Jxl, 100_000, 100_000, Some(6))
        );
        let i = probe_bytes(&codestream(1, 1 << 30, None)).unwrap();
        assert_eq!((i.width, i.height, i.orientation), (1, 1 << 30, None));
        let i = probe_bytes(&codestream(513, 8193, Some(1))).unwrap();
        assert_eq!((i.width, i.height, i.orientation), (513, 8193, Some(1)));
    }

    #[test]
    fn small_and_ratio_sizes() {
        // small, height (3+1)*8 = 32, ratio 0, width (9+1)*8 = 80, all_default.
        let mut wr = Writer::default();
        wr.put(1, 1).put(3, 5).put(0, 3).put(9, 5).put(1, 1);
        let i = probe_bytes(&[vec![0xFF, 0x0A], wr.bytes].concat()).unwrap();
        assert_eq!((i.width, i.height, i.orientation), (80, 32, None));
        // not small, height 1080, ratio 5 (16:9) → width 1920; orientation 8.
        let mut wr = Writer::default();
        wr.put(0, 1)
            .dim(1080)
            .put(5, 3)
            .put(0, 1)
            .put(1, 1)
            .put(7, 3);
        let i = probe_bytes(&[vec![0xFF, 0x0A], wr.bytes].concat()).unwrap();
        assert_eq!((i.width, i.height, i.orientation), (1920, 1080, Some(8)));
        // ratio 2 (12:10) floors: 7 * 12 / 10 = 8.
        let mut wr = Writer::default();
        wr.put(0, 1).dim(7).put(2, 3).put(1, 1);
        let i = probe_bytes(&[vec![0xFF, 0x0A], wr.bytes].concat()).unwrap();
        assert_eq!((i.width, i.height), (8, 7));
        // Largest: height 2^30 with ratio 2:1.
        let mut wr = Writer::default();
        wr.put(0, 1).dim(1 << 30).put(7, 3).put(1, 1);
        let i = probe_bytes(&[vec![0xFF, 0x0A], wr.bytes].concat()).unwrap();
        assert_eq!((i.width, i.height), (1 << 31, 1 << 30));
    }

    #[test]
    fn containers() {
        let cs = codestream(640, 480, Some(3));
        for split in [false, true] {
            let i = probe_bytes(&container(&cs, split)).unwrap();
            assert_eq!(
                (i.format, i.width, i.height, i.orientation),
                (Format::Jxl, 640, 480, Some(3))
            );
        }
        // jxlc with size 0 (extends to the end of the file).
        let mut f = CONTAINER_SIGNATURE.to_vec();
        f.extend(ftyp(b"jxl ", &[]));
        f.extend_from_slice(&[0, 0, 0, 0]);
        f.extend_from_slice(b"jxlc");
        f.extend(&cs);
        assert_eq!(probe_bytes(&f).unwrap().width, 640);
    }

    #[test]
    fn errors() {
        assert!(matches!(
            probe_bytes(&[0xFF, 0x0A, 0x00]),
            Err(Error::Truncated(_))
        ));
        let mut none = CONTAINER_SIGNATURE.to_vec();
        none.extend(ftyp(b"jxl ", &[]));
        assert!(matches!(probe_bytes(&none), Err(Error::Corrupt(_))));
        let cs = codestream(5, 5, None);
        let mut bad = container(&cs, false);
        let at = bad.len() - cs.len();
        bad[at] = 0;
        assert!(matches!(probe_bytes(&bad), Err(Error::Corrupt(_))));
    }
}
