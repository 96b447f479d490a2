//! JPEG: a sequence of marker segments starting with SOI (`FF D8`).
//!
//! * A marker is `FF xx`. Any number of extra `FF` fill bytes may precede it. `FF 00` is a
//!   stuffed byte (not a marker); like libjpeg and Pillow we skip stray bytes between
//!   segments, up to [`MAX_JUNK`].
//! * Standalone markers carry no length: TEM (`01`), RST0–7 (`D0`–`D7`), SOI (`D8`),
//!   EOI (`D9`). Every other marker is followed by a big-endian u16 length that counts
//!   itself but not the marker.
//! * SOF0–SOF15 (`C0`–`CF`) except DHT (`C4`), JPG (`C8`) and DAC (`CC`) start a frame:
//!   precision u8, height u16, width u16, component count u8. A zero height means the
//!   height comes later in a DNL segment, which we do not chase (`Unsupported`).
//! * APP1 (`E1`) starting `Exif\0\0` holds a TIFF structure with the EXIF orientation.
//!   The first such segment wins, as in Pillow. A broken one is ignored.
//! * SOS (`DA`) starts entropy-coded data: the header is over.
//!
//! The orientation is looked for up to SOS: after the frame header has been read, running
//! into trouble only ends the search, it does not fail the probe.

use super::src::Src;
use super::tiff::exif_orientation;
use super::{finish, Format, EXIF_CAP, MAX_ITEMS};
use crate::error::{Error, Result};
use crate::header::HeaderInfo;
use std::io::{Read, Seek};

const WHAT: &str = "JPEG header";

/// Bytes (fill, stray data and the markers' own `FF`) we are willing to step over one at
/// a time in a whole file. Well above the 10,000 segments MAX_ITEMS allows.
const MAX_JUNK: u32 = 256 * 1024;

const SOS: u8 = 0xDA;
const EOI: u8 = 0xD9;
const APP1: u8 = 0xE1;
/// JPEG-LS frame header: a different codec we do not claim to read.
const SOF55: u8 = 0xF7;

/// What the segment scan has found so far.
#[derive(Debug, Default)]
struct Scan {
    size: Option<(u32, u32)>,
    orientation: Option<u16>,
    exif_seen: bool,
}

pub(super) fn probe<R: Read + Seek>(src: &mut Src<'_, R>) -> Result<HeaderInfo> {
    src.seek_to(2, WHAT)?;
    let mut scan = Scan::default();
    let outcome = scan_segments(src, &mut scan);
    match (scan.size, outcome) {
        (Some((w, h)), _) => finish(Format::Jpeg, w, h, scan.orientation),
        (None, Err(e)) => Err(e),
        (None, Ok(())) => Err(Error::Corrupt("JPEG has no frame header".into())),
    }
}

/// SOF markers, i.e. `C0..=CF` minus DHT, JPG and DAC.
fn is_sof(m: u8) -> bool {
    (0xC0..=0xCF).contains(&m) && !matches!(m, 0xC4 | 0xC8 | 0xCC)
}

/// Markers without a length field.
fn is_standalone(m: u8) -> bool {
    m == 0x01 || (0xD0..=0xD8).contains(&m)
}

/// Walk segments until we have both the frame size and the first EXIF block, or reach the
/// scan data. Returns `Err` only for problems; the caller decides whether they matter.
fn scan_segments<R: Read + Seek>(src: &mut Src<'_, R>, scan: &mut Scan) -> Result<()> {
    let mut junk = MAX_JUNK;
    for _ in 0..MAX_ITEMS {
        let marker = next_marker(src, &mut junk)?;
        match marker {
            m if is_standalone(m) => {}
            SOS | EOI => {
                return match scan.size {
                    Some(_) => Ok(()),
                    None => Err(Error::Corrupt(
                        "JPEG data starts before any frame header".into(),
                    )),
                };
            }
            SOF55 if scan.size.is_none() => {
                return Err(Error::Unsupported("JPEG-LS is not supported".into()));
            }
            m if is_sof(m) => {
                let body = segment_body_len(src)?;
                if scan.size.is_none() {
                    scan.size = Some(read_frame_header(src, body)?);
                } else {
                    src.skip(body, WHAT)?;
                }
            }
            APP1 => {
                let body = segment_body_len(src)?;
                read_app1(src, body, scan)?;
            }
            _ => {
                let body = segment_body_len(src)?;
                src.skip(body, WHAT)?;
            }
        }
        if scan.size.is_some() && scan.exif_seen {
            return Ok(());
        }
    }
    Err(Error::Corrupt("too many JPEG segments".into()))
}

/// Read up to and including the next marker code, skipping fill bytes and stray data.
/// `junk` is the budget of skipped bytes left for the whole file.
fn next_marker<R: Read + Seek>(src: &mut Src<'_, R>, junk: &mut u32) -> Result<u8> {
    let mut prev = 0u8;
    loop {
        let b = src.u8(WHAT)?;
        if prev == 0xFF && b != 0xFF && b != 0x00 {
            return Ok(b);
        }
        *junk = junk
            .checked_sub(1)
            .ok_or_else(|| Error::Corrupt("no JPEG marker where one was expected".into()))?;
        prev = b;
    }
}

/// Read a segment's length field; returns the number of bytes after it.
fn segment_body_len<R: Read + Seek>(src: &mut Src<'_, R>) -> Result<u64> {
    let len = src.be16(WHAT)?;
    len.checked_sub(2)
        .map(u64::from)
        .ok_or_else(|| Error::Corrupt(format!("JPEG segment length {len} is below 2")))
}

/// Parse an SOF segment body of `body` bytes; returns (width, height).
fn read_frame_header<R: Read + Seek>(src: &mut Src<'_, R>, body: u64) -> Result<(u32, u32)> {
    if body < 6 {
        return Err(Error::Corrupt("JPEG frame header is too short".into()));
    }
    let [_precision, h1, h0, w1, w0, _components] = src.array::<6>(WHAT)?;
    src.skip(body - 6, WHAT)?;
    let (w, h) = (u16::from_be_bytes([w1, w0]), u16::from_be_bytes([h1, h0]));
    if h == 0 && w != 0 {
        return Err(Error::Unsupported(
            "JPEG height is defined by a DNL segment".into(),
        ));
    }
    Ok((w.into(), h.into()))
}

/// Handle an APP1 body: read the first `Exif\0\0` block's orientation, skip anything else.
fn read_app1<R: Read + Seek>(src: &mut Src<'_, R>, body: u64, scan: &mut Scan) -> Result<()> {
    if scan.exif_seen || body < 6 {
        return src.skip(body, WHAT);
    }
    let id = src.array::<6>(WHAT)?;
    if &id != b"Exif\0\0" {
        return src.skip(body - 6, WHAT);
    }
    scan.exif_seen = true;
    if let Some(tiff) = src.read_vec(body - 6, EXIF_CAP, WHAT)? {
        scan.orientation = exif_orientation(&tiff);
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::header::bytes::Endian;
    use crate::header::tests::{probe_bytes, CountingReader};
    use crate::header::tiff::tests::exif;

    fn segment(marker: u8, body: &[u8]) -> Vec<u8> {
        let mut s = vec![0xFF, marker];
        s.extend_from_slice(&((body.len() + 2) as u16).to_be_bytes());
        s.extend_from_slice(body);
        s
    }

    fn sof(marker: u8, w: u16, h: u16) -> Vec<u8> {
        let mut b = vec![8];
        b.extend_from_slice(&h.to_be_bytes());
        b.extend_from_slice(&w.to_be_bytes());
        b.extend_from_slice(&[3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
        segment(marker, &b)
    }

    fn app1_exif(order: Endian, orientation: u16) -> Vec<u8> {
        let mut b = b"Exif\0\0".to_vec();
        b.extend(exif(order, orientation));
        segment(APP1, &b)
    }

    fn sos() -> Vec<u8> {
        let mut s = segment(SOS, &[1, 1, 0, 0, 0x3F, 0]);
        s.extend_from_slice(&[0x12, 0x34, 0xFF, 0x00, 0x56, 0xFF, 0xD9]);
        s
    }

    /// SOI, JFIF APP0, optional EXIF APP1, DQT, SOF0, SOS, data, EOI.
    pub(crate) fn jpeg(w: u16, h: u16, exif: Option<(Endian, u16)>) -> Vec<u8> {
        let mut j = vec![0xFF, 0xD8];
        j.extend(segment(0xE0, b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"));
        if let Some((order, o)) = exif {
            j.extend(app1_exif(order, o));
        }
        j.extend(segment(0xDB, &[0; 65]));
        j.extend(sof(0xC0, w, h));
        j.extend(sos());
        j
    }

    #[test]
    fn plain_and_exif_both_orders() {
        let i = probe_bytes(&jpeg(640, 480, None)).unwrap();
        assert_eq!(
            (i.format, i.width, i.height, i.orientation),
            (Format::Jpeg, 640, 480, None)
        );
        for order in [Endian::Little, Endian::Big] {
            let i = probe_bytes(&jpeg(3000, 2000, Some((order, 6)))).unwrap();
            assert_eq!(
                (i.width, i.height, i.orientation),
                (3000, 2000, Some(6)),
                "{order:?}"
            );
        }
    }

    #[test]
    fn fill_bytes_standalone_markers_and_junk() {
        let mut j = vec![0xFF, 0xD8, 0xFF, 0xFF, 0xFF];
        j.extend(segment(0xE0, b"JFIF\0"));
        j.extend_from_slice(&[0xFF, 0xD0, 0xFF, 0x01, 0x00, 0x17, 0xFF, 0x00, 0xFF, 0xFF]);
        j.extend(sof(0xC2, 17, 33));
        j.extend(sos());
        let i = probe_bytes(&j).unwrap();
        assert_eq!((i.width, i.height), (17, 33));
    }

    #[test]
    fn exif_after_frame_header_and_first_exif_wins() {
        let mut j = vec![0xFF, 0xD8];
        j.extend(sof(0xC1, 10, 20));
        j.extend(app1_exif(Endian::Big, 3));
        j.extend(app1_exif(Endian::Big, 8));
        j.extend(sos());
        assert_eq!(probe_bytes(&j).unwrap().orientation, Some(3));
        // A truncated tail after the frame header does not fail the probe.
        let mut cut = vec![0xFF, 0xD8];
        cut.extend(sof(0xC0, 10, 20));
        cut.extend_from_slice(&[0xFF, 0xDB, 0x00]);
        assert_eq!(probe_bytes(&cut).unwrap().orientation, None);
    }

    #[test]
    fn xmp_app1_and_broken_exif_are_ignored() {
        let mut j = vec![0xFF, 0xD8];
        j.extend(segment(APP1, b"http://ns.adobe.com/xap/1.0/\0<x/>"));
        j.extend(segment(APP1, b"Exif\0\0MM\0*\xff\xff\xff\xff"));
        j.extend(sof(0xC0, 1, 1));
        j.extend(sos());
        let i = probe_bytes(&j).unwrap();
        assert_eq!((i.width, i.height, i.orientation), (1, 1, None));
    }

    #[test]
    fn non_sof_c_markers_are_skipped() {
        let mut j = vec![0xFF, 0xD8];
        for m in [0xC4, 0xC8, 0xCC] {
            j.extend(segment(m, &[0, 0, 0, 0, 0, 0, 0, 0]));
        }
        j.extend(sof(0xCF, 5, 6));
        assert_eq!(probe_bytes(&j).unwrap().width, 5);
    }

    #[test]
    fn errors() {
        let mut no_sof = vec![0xFF, 0xD8];
        no_sof.extend(segment(0xE0, b"JFIF\0"));
        no_sof.extend(sos());
        assert!(matches!(probe_bytes(&no_sof), Err(Error::Corrupt(_))));
        let mut eoi = vec![0xFF, 0xD8, 0xFF, 0xD9];
        assert!(matches!(probe_bytes(&eoi), Err(Error::Corrupt(_))));
        eoi.truncate(3);
        assert!(matches!(probe_bytes(&eoi), Err(Error::Truncated(_))));
        let bad_len = [0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x01, 0, 0, 0, 0];
        assert!(matches!(probe_bytes(&bad_len), Err(Error::Corrupt(_))));
        let mut zero_w = vec![0xFF, 0xD8];
        zero_w.extend(sof(0xC0, 0, 5));
        assert!(matches!(probe_bytes(&zero_w), Err(Error::Corrupt(_))));
        let mut dnl = vec![0xFF, 0xD8];
        dnl.extend(sof(0xC0, 5, 0));
        assert!(matches!(probe_bytes(&dnl), Err(Error::Unsupported(_))));
        let mut ls = vec![0xFF, 0xD8];
        ls.extend(sof(SOF55, 5, 5));
        assert!(matches!(probe_bytes(&ls), Err(Error::Unsupported(_))));
        let mut junk = vec![0xFF, 0xD8];
        junk.extend(segment(0xE0, b"JFIF\0"));
        junk.extend(vec![0x41; 300_000]);
        assert!(matches!(probe_bytes(&junk), Err(Error::Corrupt(_))));
        let cut = jpeg(10, 10, Some((Endian::Little, 6)));
        assert!(matches!(probe_bytes(&cut[..40]), Err(Error::Truncated(_))));
    }

    #[test]
    fn reads_only_the_header() {
        let mut j = jpeg(65_535, 65_000, Some((Endian::Big, 1)));
        j.extend(vec![0u8; 4 << 20]);
        let (info, read) = CountingReader::probe(&j);
        let info = info.unwrap();
        assert_eq!((info.width, info.height), (65_535, 65_000));
        assert!(read < 64 * 1024, "read {read} bytes");
    }
}
