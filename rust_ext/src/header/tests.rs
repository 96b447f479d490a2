//! Cross-format tests: sniffing, every prefix of every sample, and pseudo-random input.

use super::bytes::Endian;
use super::probe;
use crate::error::{Error, Result};
use crate::header::{Format, HeaderInfo};
use std::io::{self, Cursor, Read, Seek, SeekFrom};

/// Probe an in-memory file.
pub(super) fn probe_bytes(b: &[u8]) -> Result<HeaderInfo> {
    probe(&mut Cursor::new(b), b.len() as u64)
}

/// A reader that counts the bytes actually read, to prove we only read headers.
pub(super) struct CountingReader<'a> {
    inner: Cursor<&'a [u8]>,
    read: u64,
}

impl CountingReader<'_> {
    /// Probe `b` through a counting reader; returns the result and the bytes read.
    pub(super) fn probe(b: &[u8]) -> (Result<HeaderInfo>, u64) {
        let mut r = CountingReader {
            inner: Cursor::new(b),
            read: 0,
        };
        let res = probe(&mut r, b.len() as u64);
        (res, r.read)
    }
}

impl Read for CountingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

impl Seek for CountingReader<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// A named sample file and what probing it should give.
type Sample = (&'static str, Vec<u8>, Format, u32, u32, Option<u16>);

/// One valid sample per format and variant.
fn samples() -> Vec<Sample> {
    use super::{bmp, gif, heif, jpeg, jxl, png, tiff, webp};
    let mut v = vec![
        (
            "jpeg",
            jpeg::tests::jpeg(640, 480, None),
            Format::Jpeg,
            640,
            480,
            None,
        ),
        (
            "jpeg exif II",
            jpeg::tests::jpeg(64, 48, Some((Endian::Little, 6))),
            Format::Jpeg,
            64,
            48,
            Some(6),
        ),
        (
            "jpeg exif MM",
            jpeg::tests::jpeg(64, 48, Some((Endian::Big, 8))),
            Format::Jpeg,
            64,
            48,
            Some(8),
        ),
        ("png", png::tests::png(3, 5, &[]), Format::Png, 3, 5, None),
        (
            "png exif",
            png::tests::png_with_exif(3, 5, Endian::Big, 3),
            Format::Png,
            3,
            5,
            Some(3),
        ),
        ("gif", gif::tests::gif(7, 9), Format::Gif, 7, 9, None),
        (
            "bmp",
            bmp::tests::bmp_info(11, -13),
            Format::Bmp,
            11,
            13,
            None,
        ),
        (
            "webp vp8",
            webp::tests::vp8(30, 20),
            Format::Webp,
            30,
            20,
            None,
        ),
        (
            "webp vp8l",
            webp::tests::vp8l(31, 21),
            Format::Webp,
            31,
            21,
            None,
        ),
        (
            "tiff II",
            tiff::tests::tiff_file(Endian::Little),
            Format::Tiff,
            640,
            70_000,
            Some(6),
        ),
        (
            "tiff MM",
            tiff::tests::tiff_file(Endian::Big),
            Format::Tiff,
            640,
            70_000,
            Some(6),
        ),
        (
            "jxl",
            jxl::tests::codestream(33, 44, Some(5)),
            Format::Jxl,
            33,
            44,
            Some(5),
        ),
    ];
    let exif = tiff::tests::exif(Endian::Little, 2);
    v.push((
        "webp vp8x",
        webp::tests::vp8x(32, 22, Some(exif)),
        Format::Webp,
        32,
        22,
        Some(2),
    ));
    let irot = super::bmff::tests::bx(b"irot", &[1]);
    v.push((
        "avif",
        heif::tests::avif(&[irot]),
        Format::Avif,
        4000,
        3000,
        Some(8),
    ));
    let cs = jxl::tests::codestream(33, 44, Some(5));
    v.push((
        "jxl box",
        jxl::tests::container(&cs, false),
        Format::Jxl,
        33,
        44,
        Some(5),
    ));
    v.push((
        "jxl split",
        jxl::tests::container(&cs, true),
        Format::Jxl,
        33,
        44,
        Some(5),
    ));
    v
}

#[test]
fn all_samples() {
    for (name, bytes, format, w, h, o) in samples() {
        let want = HeaderInfo {
            format,
            width: w,
            height: h,
            orientation: o,
        };
        assert_eq!(probe_bytes(&bytes).unwrap(), want, "{name}");
    }
}

/// Every prefix of every sample gives a result without panicking, and prefixes too short
/// to hold the size are errors (mostly `Truncated`).
#[test]
fn every_prefix() {
    for (name, bytes, ..) in samples() {
        for n in 0..bytes.len() {
            let cut = &bytes[..n];
            match probe_bytes(cut) {
                Ok(_) => {}
                Err(Error::Truncated(_) | Error::NotImage(_) | Error::Corrupt(_)) => {}
                Err(e) => panic!("{name}[..{n}]: unexpected {e:?}"),
            }
            // Same bytes, but with the caller claiming the full length.
            let _ = probe(&mut Cursor::new(cut), bytes.len() as u64);
        }
        assert!(probe_bytes(&bytes[..1]).is_err(), "{name}");
    }
}

/// A tiny linear congruential generator (Knuth's MMIX constants).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const MAGICS: [&[u8]; 15] = [
    b"\xFF\xD8\xFF",
    b"\x89PNG\r\n\x1A\n",
    b"\x89PNG\r\n\x1A\n\0\0\0\x0DIHDR",
    b"GIF89a",
    b"BM",
    b"RIFF\0\0\0\0WEBPVP8 ",
    b"RIFF\0\0\0\0WEBPVP8L",
    b"RIFF\0\0\0\0WEBPVP8X",
    b"II*\0",
    b"MM\0*",
    b"II+\0",
    b"\0\0\0\x18ftypavif",
    b"\0\0\0\x18ftypheic",
    b"\xFF\x0A",
    b"\0\0\0\x0CJXL \r\n\x87\n",
];

/// Random tails after each magic: anything may come back, nothing may panic or hang.
#[test]
fn fuzz_random_tails() {
    let mut rng = Lcg(0x5EED);
    for round in 0..4000 {
        let magic = MAGICS[round % MAGICS.len()];
        let len = rng.below(300) as usize;
        let mut data = magic.to_vec();
        // Bias towards small numbers so length fields are sometimes plausible.
        data.extend((0..len).map(|_| {
            if rng.below(3) == 0 {
                rng.byte() % 16
            } else {
                rng.byte()
            }
        }));
        let _ = probe_bytes(&data);
    }
}

/// Random byte mutations of valid samples reach deeper into each parser.
#[test]
fn fuzz_mutations() {
    let mut rng = Lcg(42);
    let samples = samples();
    for round in 0..6000 {
        let (_, base, ..) = &samples[round % samples.len()];
        let mut data = base.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(data.len() as u64) as usize;
            data[at] = match rng.below(4) {
                0 => 0,
                1 => 0xFF,
                _ => rng.byte(),
            };
        }
        if rng.below(4) == 0 {
            data.truncate(rng.below(data.len() as u64 + 1) as usize);
        }
        let _ = probe_bytes(&data);
    }
}

#[test]
fn not_images() {
    let texts: [&[u8]; 6] = [
        b"hello, this is a text file renamed to photo.jpg\n",
        b"<svg xmlns=\"http://www.w3.org/2000/svg\"/>",
        b"%PDF-1.7\n",
        b"\0",
        b"I",
        b"PK\x03\x04\x14\0\0\0",
    ];
    for t in texts {
        assert!(matches!(probe_bytes(t), Err(Error::NotImage(_))), "{t:?}");
    }
}

#[test]
fn empty_and_cut_signatures() {
    assert!(matches!(probe_bytes(b""), Err(Error::Truncated(_))));
    assert!(matches!(
        probe(&mut Cursor::new(b""), 100),
        Err(Error::Truncated(_))
    ));
    for cut in [
        &b"\x89PNG"[..],
        b"GIF8",
        b"\xFF\xD8",
        b"II*",
        b"RIFF\0\0",
        b"RIFF\0\0\0\0WE",
        b"\0\0\0\x18ft",
    ] {
        assert!(
            matches!(probe_bytes(cut), Err(Error::Truncated(_))),
            "{cut:?}"
        );
    }
}

#[test]
fn declared_giants_are_reported_not_allocated() {
    let (info, read) = CountingReader::probe(&super::png::tests::png(u32::MAX, u32::MAX, &[]));
    let info = info.unwrap();
    assert_eq!((info.width, info.height), (u32::MAX, u32::MAX));
    assert!(read < 1024);
}
