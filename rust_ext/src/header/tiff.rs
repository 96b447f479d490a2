//! TIFF structures: TIFF files themselves, and the EXIF blocks embedded in JPEG (APP1),
//! PNG (`eXIf`), WebP (`EXIF`) which are TIFF structures too.
//!
//! Layout: an 8-byte header — byte order `II` (little-endian) or `MM` (big-endian), the
//! magic 42, and the u32 offset of IFD0. An IFD is a u16 entry count followed by 12-byte
//! entries `tag u16, type u16, count u32, value-or-offset [u8; 4]`. A value that fits in
//! four bytes is stored in the entry itself, left-justified, in the file's byte order.
//!
//! BigTIFF (magic 43) has a 16-byte header (`offset size` 8, reserved 0, u64 IFD0 offset),
//! u64 entry counts and 20-byte entries `tag u16, type u16, count u64, value [u8; 8]`.
//!
//! We want three IFD0 tags: 256 ImageWidth, 257 ImageLength (SHORT or LONG, or LONG8 in
//! BigTIFF) and 274 Orientation (SHORT; we also accept LONG).
//!
//! The size reported is ImageWidth × ImageLength as stored. (Pillow's `Image.size` for a
//! TIFF with orientation 5–8 is already swapped; our stored size plus the orientation
//! gives the same display size.)

use super::bytes::Endian;
use super::src::Src;
use super::{finish, Format};
use crate::error::{Error, Result};
use crate::header::HeaderInfo;
use std::io::{Read, Seek};

const WHAT: &str = "TIFF header";

/// IFD entries examined at most. Tags are sorted, and ours (256, 257, 274) are among the
/// lowest defined, so a real file has them within the first few dozen entries.
const MAX_ENTRIES: u64 = 4096;

const TAG_WIDTH: u16 = 256;
const TAG_HEIGHT: u16 = 257;
const TAG_ORIENTATION: u16 = 274;

const TYPE_SHORT: u16 = 3;
const TYPE_LONG: u16 = 4;
const TYPE_LONG8: u16 = 16;

/// Random access to the bytes of a TIFF structure (offsets are relative to its header).
pub(super) trait ByteSource {
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<()>;
}

/// An in-memory TIFF structure (an EXIF payload).
impl ByteSource for &[u8] {
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        let start = usize::try_from(off).map_err(|_| Error::truncated("EXIF data"))?;
        let end = start
            .checked_add(buf.len())
            .ok_or_else(|| Error::truncated("EXIF data"))?;
        let src = self
            .get(start..end)
            .ok_or_else(|| Error::truncated("EXIF data"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// A TIFF file, read through [`Src`] (offsets are from the start of the file).
impl<R: Read + Seek> ByteSource for Src<'_, R> {
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.seek_to(off, WHAT)?;
        self.read_exact(buf, WHAT)
    }
}

/// What IFD0 told us.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Ifd0 {
    pub(super) width: Option<u32>,
    pub(super) height: Option<u32>,
    pub(super) orientation: Option<u16>,
    /// False when the data ended inside the entry table (the fields above are partial).
    pub(super) complete: bool,
}

/// Geometry of classic TIFF vs BigTIFF.
#[derive(Debug, Clone, Copy)]
struct Layout {
    order: Endian,
    big: bool,
}

impl Layout {
    fn count_len(self) -> usize {
        if self.big {
            8
        } else {
            2
        }
    }

    fn entry_len(self) -> u64 {
        if self.big {
            20
        } else {
            12
        }
    }
}

/// Read the header and IFD0 of a TIFF structure.
pub(super) fn read_ifd0<S: ByteSource>(s: &mut S) -> Result<Ifd0> {
    let (layout, ifd_off) = read_tiff_header(s)?;
    let mut count_buf = [0u8; 8];
    let count_bytes = count_buf.get_mut(..layout.count_len()).unwrap_or_default();
    s.read_at(ifd_off, count_bytes)?;
    let count = if layout.big {
        layout.order.u64(&count_buf, 0)
    } else {
        layout.order.u16(&count_buf, 0).map(u64::from)
    }
    .unwrap_or(0);
    let table = ifd_off.saturating_add(layout.count_len() as u64);
    Ok(read_entries(s, layout, table, count.min(MAX_ENTRIES)))
}

/// Byte order, classic/Big, and the offset of IFD0.
fn read_tiff_header<S: ByteSource>(s: &mut S) -> Result<(Layout, u64)> {
    let mut h = [0u8; 16];
    s.read_at(0, h.get_mut(..8).unwrap_or_default())?;
    let order = match h.get(..2) {
        Some(b"II") => Endian::Little,
        Some(b"MM") => Endian::Big,
        _ => return Err(Error::Corrupt("bad TIFF byte order mark".into())),
    };
    match order.u16(&h, 2) {
        Some(42) => {
            let off = order.u32(&h, 4).unwrap_or(0);
            Ok((Layout { order, big: false }, u64::from(off)))
        }
        Some(43) => {
            s.read_at(8, h.get_mut(8..16).unwrap_or_default())?;
            if order.u16(&h, 4) != Some(8) || order.u16(&h, 6) != Some(0) {
                return Err(Error::Corrupt("bad BigTIFF header".into()));
            }
            Ok((Layout { order, big: true }, order.u64(&h, 8).unwrap_or(0)))
        }
        _ => Err(Error::Corrupt("bad TIFF magic number".into())),
    }
}

/// Walk `count` entries starting at `table`; the first occurrence of each tag wins.
fn read_entries<S: ByteSource>(s: &mut S, layout: Layout, table: u64, count: u64) -> Ifd0 {
    let mut ifd = Ifd0 {
        complete: true,
        ..Ifd0::default()
    };
    let mut entry = [0u8; 20];
    for i in 0..count {
        let off = table.saturating_add(i.saturating_mul(layout.entry_len()));
        let buf = entry
            .get_mut(..layout.entry_len() as usize)
            .unwrap_or_default();
        if s.read_at(off, buf).is_err() {
            ifd.complete = false;
            break;
        }
        apply_entry(&mut ifd, layout, &entry);
    }
    ifd
}

/// Record the entry if it is one of our tags with a usable type.
fn apply_entry(ifd: &mut Ifd0, layout: Layout, e: &[u8]) {
    let o = layout.order;
    let (Some(tag), Some(ty)) = (o.u16(e, 0), o.u16(e, 2)) else {
        return;
    };
    let count = if layout.big {
        o.u64(e, 4)
    } else {
        o.u32(e, 4).map(u64::from)
    };
    if count.unwrap_or(0) == 0 {
        return;
    }
    let value_at = if layout.big { 12 } else { 8 };
    let value = match ty {
        TYPE_SHORT => o.u16(e, value_at).map(u64::from),
        TYPE_LONG => o.u32(e, value_at).map(u64::from),
        TYPE_LONG8 if layout.big => o.u64(e, value_at),
        _ => None,
    };
    let Some(value) = value else { return };
    match tag {
        TAG_WIDTH if ifd.width.is_none() => ifd.width = u32::try_from(value).ok(),
        TAG_HEIGHT if ifd.height.is_none() => ifd.height = u32::try_from(value).ok(),
        TAG_ORIENTATION if ifd.orientation.is_none() => {
            ifd.orientation = u16::try_from(value).ok();
        }
        _ => {}
    }
}

/// The Orientation tag of an EXIF payload, or `None` if it is absent or the payload is
/// broken (a bad EXIF block never fails the probe). A leading `Exif\0\0` is tolerated.
pub(super) fn exif_orientation(payload: &[u8]) -> Option<u16> {
    let mut tiff = payload.strip_prefix(b"Exif\0\0").unwrap_or(payload);
    read_ifd0(&mut tiff).ok()?.orientation
}

/// Probe a TIFF (or BigTIFF) file: IFD0's ImageWidth, ImageLength and Orientation.
pub(super) fn probe<R: Read + Seek>(src: &mut Src<'_, R>) -> Result<HeaderInfo> {
    let ifd = read_ifd0(src)?;
    match (ifd.width, ifd.height) {
        (Some(w), Some(h)) => finish(Format::Tiff, w, h, ifd.orientation),
        _ if !ifd.complete => Err(Error::truncated(WHAT)),
        _ => Err(Error::Corrupt(
            "TIFF IFD0 lacks ImageWidth or ImageLength".into(),
        )),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::header::tests::probe_bytes;

    /// One classic-TIFF IFD entry with a value stored inline.
    fn entry(order: Endian, tag: u16, ty: u16, value: u32) -> Vec<u8> {
        let mut e = Vec::new();
        let (tag_b, ty_b, count_b) = match order {
            Endian::Little => (tag.to_le_bytes(), ty.to_le_bytes(), 1u32.to_le_bytes()),
            Endian::Big => (tag.to_be_bytes(), ty.to_be_bytes(), 1u32.to_be_bytes()),
        };
        e.extend_from_slice(&tag_b);
        e.extend_from_slice(&ty_b);
        e.extend_from_slice(&count_b);
        let v = match (order, ty) {
            (Endian::Little, TYPE_SHORT) => [(value as u16).to_le_bytes(), [0, 0]].concat(),
            (Endian::Big, TYPE_SHORT) => [(value as u16).to_be_bytes(), [0, 0]].concat(),
            (Endian::Little, _) => value.to_le_bytes().to_vec(),
            (Endian::Big, _) => value.to_be_bytes().to_vec(),
        };
        e.extend_from_slice(&v);
        e
    }

    /// A classic TIFF structure whose IFD0 (at offset 8) holds `entries` (tag, type, value).
    pub(crate) fn build(order: Endian, entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut t = Vec::new();
        match order {
            Endian::Little => t.extend_from_slice(b"II*\0\x08\0\0\0"),
            Endian::Big => t.extend_from_slice(b"MM\0*\0\0\0\x08"),
        }
        let n = entries.len() as u16;
        t.extend_from_slice(&match order {
            Endian::Little => n.to_le_bytes(),
            Endian::Big => n.to_be_bytes(),
        });
        for &(tag, ty, v) in entries {
            t.extend(entry(order, tag, ty, v));
        }
        t.extend_from_slice(&[0, 0, 0, 0]); // next IFD: none
        t
    }

    /// An EXIF payload (TIFF structure) carrying only an Orientation tag.
    pub(crate) fn exif(order: Endian, orientation: u16) -> Vec<u8> {
        build(
            order,
            &[(TAG_ORIENTATION, TYPE_SHORT, u32::from(orientation))],
        )
    }

    pub(crate) fn tiff_file(order: Endian) -> Vec<u8> {
        build(
            order,
            &[
                (254, TYPE_LONG, 0),
                (TAG_WIDTH, TYPE_SHORT, 640),
                (TAG_HEIGHT, TYPE_LONG, 70_000),
                (TAG_ORIENTATION, TYPE_SHORT, 6),
            ],
        )
    }

    #[test]
    fn exif_both_byte_orders() {
        for order in [Endian::Little, Endian::Big] {
            for o in [1u16, 3, 6, 8, 0, 9] {
                assert_eq!(exif_orientation(&exif(order, o)), Some(o), "{order:?} {o}");
            }
            let mut with_prefix = b"Exif\0\0".to_vec();
            with_prefix.extend(exif(order, 5));
            assert_eq!(exif_orientation(&with_prefix), Some(5));
        }
    }

    #[test]
    fn exif_broken_is_none() {
        assert_eq!(exif_orientation(b""), None);
        assert_eq!(exif_orientation(b"XX*\0\x08\0\0\0"), None);
        assert_eq!(exif_orientation(b"II*\0\xff\xff\xff\xff"), None);
        let mut t = exif(Endian::Little, 6);
        t.truncate(12);
        assert_eq!(exif_orientation(&t), None);
        // Orientation stored with an unexpected type (ASCII) is ignored.
        assert_eq!(
            exif_orientation(&build(Endian::Big, &[(TAG_ORIENTATION, 2, 6)])),
            None
        );
        // A LONG orientation is accepted.
        assert_eq!(
            exif_orientation(&build(Endian::Big, &[(TAG_ORIENTATION, TYPE_LONG, 3)])),
            Some(3)
        );
    }

    #[test]
    fn tiff_files_both_orders() {
        for order in [Endian::Little, Endian::Big] {
            let info = probe_bytes(&tiff_file(order)).unwrap();
            assert_eq!(info.format, Format::Tiff);
            assert_eq!(
                (info.width, info.height, info.orientation),
                (640, 70_000, Some(6))
            );
        }
    }

    #[test]
    fn bigtiff() {
        let mut t = b"II+\0\x08\0\0\0\x10\0\0\0\0\0\0\0".to_vec();
        t.extend_from_slice(&2u64.to_le_bytes());
        for (tag, ty, v) in [
            (TAG_WIDTH, TYPE_LONG8, 5_000_000_000u64),
            (TAG_HEIGHT, TYPE_SHORT, 7),
        ] {
            t.extend_from_slice(&tag.to_le_bytes());
            t.extend_from_slice(&ty.to_le_bytes());
            t.extend_from_slice(&1u64.to_le_bytes());
            t.extend_from_slice(&v.to_le_bytes());
        }
        // A width beyond u32 is unusable: the file lacks a usable ImageWidth.
        assert!(matches!(probe_bytes(&t), Err(Error::Corrupt(_))));
        t.splice(36..44, 300u64.to_le_bytes());
        let info = probe_bytes(&t).unwrap();
        assert_eq!((info.width, info.height, info.orientation), (300, 7, None));
    }

    #[test]
    fn tiff_errors() {
        let no_size = build(Endian::Little, &[(TAG_ORIENTATION, TYPE_SHORT, 1)]);
        assert!(matches!(probe_bytes(&no_size), Err(Error::Corrupt(_))));
        let zero = build(
            Endian::Little,
            &[(TAG_WIDTH, TYPE_SHORT, 0), (TAG_HEIGHT, TYPE_SHORT, 5)],
        );
        assert!(matches!(probe_bytes(&zero), Err(Error::Corrupt(_))));
        let mut cut = tiff_file(Endian::Big);
        cut.truncate(30);
        assert!(matches!(probe_bytes(&cut), Err(Error::Truncated(_))));
        let far = b"II*\0\xff\xff\xff\x7f".to_vec();
        assert!(matches!(probe_bytes(&far), Err(Error::Truncated(_))));
    }
}
