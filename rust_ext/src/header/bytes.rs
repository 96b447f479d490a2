//! Panic-free fixed-width integer reads from byte slices.
//!
//! Every helper returns `None` when the slice is too short, so callers turn a short buffer
//! into the right error (usually `Truncated`) instead of indexing out of bounds.

/// `N` bytes starting at `off`, if they are all inside `b`.
pub(super) fn arr<const N: usize>(b: &[u8], off: usize) -> Option<[u8; N]> {
    b.get(off..off.checked_add(N)?)?.try_into().ok()
}

pub(super) fn be16(b: &[u8], off: usize) -> Option<u16> {
    arr(b, off).map(u16::from_be_bytes)
}

pub(super) fn be32(b: &[u8], off: usize) -> Option<u32> {
    arr(b, off).map(u32::from_be_bytes)
}

pub(super) fn be64(b: &[u8], off: usize) -> Option<u64> {
    arr(b, off).map(u64::from_be_bytes)
}

pub(super) fn le16(b: &[u8], off: usize) -> Option<u16> {
    arr(b, off).map(u16::from_le_bytes)
}

/// A 24-bit little-endian value (WebP VP8X canvas sizes, VP8 frame tags).
pub(super) fn le24(b: &[u8], off: usize) -> Option<u32> {
    let [x, y, z] = arr::<3>(b, off)?;
    Some(u32::from_le_bytes([x, y, z, 0]))
}

pub(super) fn le32(b: &[u8], off: usize) -> Option<u32> {
    arr(b, off).map(u32::from_le_bytes)
}

/// Byte order of a TIFF structure: `II` (Intel, little-endian) or `MM` (Motorola, big-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Endian {
    Little,
    Big,
}

impl Endian {
    pub(super) fn u16(self, b: &[u8], off: usize) -> Option<u16> {
        let a = arr(b, off)?;
        Some(match self {
            Endian::Little => u16::from_le_bytes(a),
            Endian::Big => u16::from_be_bytes(a),
        })
    }

    pub(super) fn u32(self, b: &[u8], off: usize) -> Option<u32> {
        let a = arr(b, off)?;
        Some(match self {
            Endian::Little => u32::from_le_bytes(a),
            Endian::Big => u32::from_be_bytes(a),
        })
    }

    pub(super) fn u64(self, b: &[u8], off: usize) -> Option<u64> {
        let a = arr(b, off)?;
        Some(match self {
            Endian::Little => u64::from_le_bytes(a),
            Endian::Big => u64::from_be_bytes(a),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_slices_give_none() {
        assert_eq!(be16(&[1], 0), None);
        assert_eq!(be32(&[1, 2, 3, 4], 1), None);
        assert_eq!(le24(&[1, 2, 3], 0), Some(0x030201));
        assert_eq!(arr::<2>(&[1, 2], usize::MAX), None);
        assert_eq!(Endian::Big.u16(&[1, 2], 0), Some(0x0102));
        assert_eq!(Endian::Little.u16(&[1, 2], 0), Some(0x0201));
        assert_eq!(Endian::Little.u64(&[1, 0, 0, 0, 0, 0, 0, 0], 0), Some(1));
    }
}
