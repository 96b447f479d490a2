//! BMP: a 14-byte file header (`BM`, file size, reserved, pixel-data offset) followed by a
//! DIB header whose first u32 is its own size, which tells the variant:
//!
//! * 12 bytes, BITMAPCOREHEADER (OS/2 1.x): u16 width, u16 height.
//! * 16..=124 bytes (OS/2 2.x 16/64, BITMAPINFOHEADER 40, v2 52, v3 56, v4 108, v5 124):
//!   i32 width, i32 height. A negative height means rows are stored top-down; the size is
//!   its absolute value. A negative width is invalid.
//!
//! All fields are little-endian.

use super::bytes::{le16, le32};
use super::{finish, Format};
use crate::error::{Error, Result};
use crate::header::HeaderInfo;

const WHAT: &str = "BMP header";
const DIB_SIZE_AT: usize = 14;

/// DIB header sizes written by real encoders.
const KNOWN_DIB_SIZES: [u32; 8] = [12, 16, 40, 52, 56, 64, 108, 124];

/// Whether `head` (starting with `BM`) plausibly is a BMP, judged by the DIB header size.
/// Keeps text files that happen to start with "BM" out of the BMP parser.
pub(super) fn looks_like_bmp(head: &[u8]) -> bool {
    match le32(head, DIB_SIZE_AT) {
        Some(size) => (12..=256).contains(&size),
        None => true, // too short to tell: let the parser report truncation
    }
}

/// Parse the size from the first 26 bytes of the file.
pub(super) fn probe(head: &[u8]) -> Result<HeaderInfo> {
    let dib = le32(head, DIB_SIZE_AT).ok_or_else(|| Error::truncated(WHAT))?;
    if !KNOWN_DIB_SIZES.contains(&dib) {
        return Err(Error::Unsupported(format!("BMP DIB header of {dib} bytes")));
    }
    let (w, h) = if dib == 12 {
        let w = le16(head, 18).map(u32::from);
        let h = le16(head, 20).map(u32::from);
        w.zip(h).ok_or_else(|| Error::truncated(WHAT))?
    } else {
        let w = le32(head, 18).map(|v| v as i32);
        let h = le32(head, 22).map(|v| v as i32);
        let (w, h) = w.zip(h).ok_or_else(|| Error::truncated(WHAT))?;
        if w < 0 {
            return Err(Error::Corrupt(format!("BMP width {w} is negative")));
        }
        (w.unsigned_abs(), h.unsigned_abs())
    };
    finish(Format::Bmp, w, h, None)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::header::tests::probe_bytes;

    pub(crate) fn bmp_info(w: i32, h: i32) -> Vec<u8> {
        let mut b = b"BM".to_vec();
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&54u32.to_le_bytes());
        b.extend_from_slice(&40u32.to_le_bytes());
        b.extend_from_slice(&w.to_le_bytes());
        b.extend_from_slice(&h.to_le_bytes());
        b.extend_from_slice(&[1, 0, 24, 0]);
        b.extend_from_slice(&[0; 24]);
        b
    }

    fn bmp_core(w: u16, h: u16) -> Vec<u8> {
        let mut b = b"BM".to_vec();
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&26u32.to_le_bytes());
        b.extend_from_slice(&12u32.to_le_bytes());
        b.extend_from_slice(&w.to_le_bytes());
        b.extend_from_slice(&h.to_le_bytes());
        b.extend_from_slice(&[1, 0, 24, 0]);
        b
    }

    #[test]
    fn variants() {
        let i = probe_bytes(&bmp_info(100, -200)).unwrap();
        assert_eq!((i.format, i.width, i.height), (Format::Bmp, 100, 200));
        let i = probe_bytes(&bmp_info(100_000, 100_000)).unwrap();
        assert_eq!((i.width, i.height), (100_000, 100_000));
        let i = probe_bytes(&bmp_info(1, i32::MIN)).unwrap();
        assert_eq!(i.height, 1 << 31);
        let i = probe_bytes(&bmp_core(7, 9)).unwrap();
        assert_eq!((i.width, i.height, i.orientation), (7, 9, None));
    }

    #[test]
    fn errors() {
        assert!(matches!(
            probe_bytes(&bmp_info(-1, 5)),
            Err(Error::Corrupt(_))
        ));
        assert!(matches!(
            probe_bytes(&bmp_info(0, 5)),
            Err(Error::Corrupt(_))
        ));
        assert!(matches!(
            probe_bytes(&bmp_info(5, 0)),
            Err(Error::Corrupt(_))
        ));
        let mut odd = bmp_info(5, 5);
        odd[14] = 20;
        assert!(matches!(probe_bytes(&odd), Err(Error::Unsupported(_))));
        assert!(matches!(
            probe_bytes(&bmp_info(5, 5)[..20]),
            Err(Error::Truncated(_))
        ));
        assert!(matches!(
            probe_bytes(b"BMW motorcycles are fast"),
            Err(Error::NotImage(_))
        ));
    }
}
