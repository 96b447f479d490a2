//! GIF: `GIF87a`/`GIF89a`, then the Logical Screen Descriptor whose first two fields are
//! the canvas width and height as little-endian u16.

use super::bytes::le16;
use super::{finish, Format};
use crate::error::{Error, Result};
use crate::header::HeaderInfo;

/// Parse the size from the first 10 bytes of the file.
pub(super) fn probe(head: &[u8]) -> Result<HeaderInfo> {
    match (le16(head, 6), le16(head, 8)) {
        (Some(w), Some(h)) => finish(Format::Gif, w.into(), h.into(), None),
        _ => Err(Error::truncated("GIF header")),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::header::tests::probe_bytes;

    pub(crate) fn gif(w: u16, h: u16) -> Vec<u8> {
        let mut g = b"GIF89a".to_vec();
        g.extend_from_slice(&w.to_le_bytes());
        g.extend_from_slice(&h.to_le_bytes());
        g.extend_from_slice(&[0, 0, 0, 0x3b]);
        g
    }

    #[test]
    fn sizes() {
        let info = probe_bytes(&gif(320, 65535)).unwrap();
        assert_eq!(
            (info.format, info.width, info.height),
            (Format::Gif, 320, 65535)
        );
        let mut g87 = gif(1, 2);
        g87[4] = b'7';
        assert_eq!(probe_bytes(&g87).unwrap().height, 2);
        assert!(matches!(probe_bytes(&gif(0, 2)), Err(Error::Corrupt(_))));
        assert!(matches!(
            probe_bytes(&gif(1, 2)[..9]),
            Err(Error::Truncated(_))
        ));
    }
}
