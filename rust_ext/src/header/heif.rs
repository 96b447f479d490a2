//! HEIF (ISO/IEC 23008-12) as used by AVIF and HEIC: size and orientation of the primary
//! image item, read from the `meta` box.
//!
//! ```text
//! meta (full box)
//! ├── pitm   primary item ID (u16 in version 0, u32 otherwise)
//! └── iprp
//!     ├── ipco   item properties, numbered from 1 in order: ispe, irot, imir, ...
//!     └── ipma   for each item: the property numbers associated with it, in order
//! ```
//!
//! * `ispe` (full box): image width u32, height u32 — the stored size.
//! * `irot`: low 2 bits `angle`; the image is displayed rotated by angle × 90°
//!   **anti-clockwise**.
//! * `imir`: low bit `mode` (called `axis` in the first edition); 0 mirrors top↔bottom
//!   (about a horizontal axis), 1 mirrors left↔right (ISO/IEC 23008-12:2022, libavif ≥ 1.2,
//!   libheif).
//! * Transformative properties apply in the order they are listed in `ipma`.
//!
//! * `clap` (clean aperture): a crop, applied first. HEVC codes sizes in whole blocks, so a
//!   123×45 HEIC typically has `ispe` 124×64 and a `clap` of 123×45; decoders (libheif,
//!   Pillow) return the cropped size, and so do we.
//!
//! The primary item's first `ispe` gives the size; without `pitm`/`ipma` (or without an
//! `ispe` among its properties) we fall back to the largest `ispe`. A `clap` of the
//! primary item that fits inside it replaces it. Its `irot`/`imir` are
//! composed and reported as the equivalent EXIF orientation (see [`Transform::exif`]):
//!
//! | irot angle | no imir | imir 0 (top↔bottom) | imir 1 (left↔right) |
//! |-----------:|:-------:|:-------------------:|:-------------------:|
//! | 0          | 1       | 4                   | 2                   |
//! | 1 (90° ⟲)  | 8       | 5                   | 7                   |
//! | 2 (180°)   | 3       | 2                   | 4                   |
//! | 3 (270° ⟲) | 6       | 7                   | 5                   |
//!
//! (irot before imir, the order MIAF requires.) An item with neither property has no
//! orientation (`None`).

use super::bmff::{self, children, SubBox};
use super::bytes::{be16, be32};
use super::finish;
use super::src::Src;
use crate::error::{Error, Result};
use crate::header::{Format, HeaderInfo};
use std::io::{Read, Seek};

/// Largest `meta` box we read into memory (real ones are a few KiB to a few hundred).
const META_CAP: usize = 1 << 20;

pub(super) fn probe<R: Read + Seek>(src: &mut Src<'_, R>, format: Format) -> Result<HeaderInfo> {
    let mut saw_moov = false;
    let meta = bmff::walk(src, bmff::WHAT, |src, b| {
        saw_moov |= &b.ty == b"moov";
        if &b.ty != b"meta" {
            return Ok(None);
        }
        match src.read_vec(b.body_len(), META_CAP, bmff::WHAT)? {
            Some(body) => Ok(Some(body)),
            None => Err(Error::Unsupported(
                "HEIF meta box is larger than 1 MiB".into(),
            )),
        }
    })?;
    let meta = meta.ok_or_else(|| missing_meta(format, saw_moov))?;
    let (w, h, orientation) = parse_meta(&meta)?;
    finish(format, w, h, orientation)
}

/// No `meta` box up to the end of the file. HEIF requires one, so the file was most likely
/// cut short; a `moov` box instead means an image sequence (tracks only) we do not read.
fn missing_meta(format: Format, saw_moov: bool) -> Error {
    if saw_moov {
        Error::Unsupported(format!("{} sequence without a meta box", format.as_str()))
    } else {
        Error::truncated(&format!("{} header (no meta box)", format.as_str()))
    }
}

/// Width, height and orientation of the primary item, from a `meta` body.
fn parse_meta(meta: &[u8]) -> Result<(u32, u32, Option<u16>)> {
    let kids = children(meta.get(4..).unwrap_or_default())?;
    let primary = find(&kids, b"pitm").and_then(|b| parse_pitm(b.body));
    let iprp = find(&kids, b"iprp").ok_or_else(|| no_size("no iprp box"))?;
    let iprp_kids = children(iprp.body)?;
    let ipco = find(&iprp_kids, b"ipco").ok_or_else(|| no_size("no ipco box"))?;
    let props = children(ipco.body)?;
    let assoc = primary
        .map(|item| associations(&iprp_kids, item))
        .unwrap_or_default();
    let item = ItemProps::collect(assoc.iter().filter_map(|&i| property(&props, i)));
    let size = item
        .ispe
        .or_else(|| largest_ispe(&props))
        .ok_or_else(|| no_size("no ispe property"))?;
    let size = item.clap.filter(|&c| fits(c, size)).unwrap_or(size);
    Ok((size.0, size.1, item.transform.map(Transform::exif)))
}

/// Whether a clean aperture of size `c` lies within the image size `s`.
fn fits(c: (u32, u32), s: (u32, u32)) -> bool {
    c.0 >= 1 && c.1 >= 1 && c.0 <= s.0 && c.1 <= s.1
}

/// The properties of the primary item that matter to us, in `ipma` order.
#[derive(Debug, Default)]
struct ItemProps {
    /// The first `ispe`.
    ispe: Option<(u32, u32)>,
    /// The first `clap` size, in the stored (pre-rotation) frame.
    clap: Option<(u32, u32)>,
    /// `irot` and `imir` composed; `None` when the item has neither.
    transform: Option<Transform>,
}

impl<'a> ItemProps {
    fn collect(props: impl Iterator<Item = &'a SubBox<'a>>) -> ItemProps {
        let mut item = ItemProps::default();
        for p in props {
            let step = match (&p.ty, p.body.first()) {
                (b"ispe", _) => {
                    item.ispe = item.ispe.or_else(|| parse_ispe(p.body));
                    continue;
                }
                (b"clap", _) => {
                    item.clap = item.clap.or_else(|| item.clap_in_stored_frame(p.body));
                    continue;
                }
                (b"irot", Some(&angle)) => Transform::rotate_ccw(angle & 3),
                (b"imir", Some(&mode)) => Transform::mirror(mode & 1),
                _ => continue,
            };
            item.transform = Some(item.transform.unwrap_or(Transform::IDENTITY).then(step));
        }
        item
    }

    /// A `clap` met after a quarter-turn `irot` crops the rotated image: swap it back.
    fn clap_in_stored_frame(&self, body: &[u8]) -> Option<(u32, u32)> {
        let (w, h) = parse_clap(body)?;
        match self.transform {
            Some(t) if t.swaps_axes() => Some((h, w)),
            _ => Some((w, h)),
        }
    }
}

fn no_size(why: &str) -> Error {
    Error::Unsupported(format!("HEIF image size not found: {why}"))
}

fn find<'a>(boxes: &'a [SubBox<'a>], ty: &[u8; 4]) -> Option<&'a SubBox<'a>> {
    boxes.iter().find(|b| &b.ty == ty)
}

/// Property number `index` (1-based; 0 means "none").
fn property<'a>(props: &'a [SubBox<'a>], index: u16) -> Option<&'a SubBox<'a>> {
    props.get(usize::from(index).checked_sub(1)?)
}

/// `pitm`: version u8, flags u24, item ID.
fn parse_pitm(body: &[u8]) -> Option<u32> {
    match body.first()? {
        0 => be16(body, 4).map(u32::from),
        _ => be32(body, 4),
    }
}

/// `ispe`: version/flags, width u32, height u32.
fn parse_ispe(body: &[u8]) -> Option<(u32, u32)> {
    Some((be32(body, 4)?, be32(body, 8)?))
}

/// `clap` (clean aperture): eight u32 — width N/D, height N/D, then horizontal and
/// vertical offsets N/D — giving the displayed size, rounded to the nearest integer.
fn parse_clap(body: &[u8]) -> Option<(u32, u32)> {
    let ratio = |at: usize| -> Option<u32> {
        let (n, d) = (u64::from(be32(body, at)?), u64::from(be32(body, at + 4)?));
        if d == 0 {
            return None;
        }
        u32::try_from((n + d / 2) / d).ok()
    };
    Some((ratio(0)?, ratio(8)?))
}

fn largest_ispe(props: &[SubBox<'_>]) -> Option<(u32, u32)> {
    props
        .iter()
        .filter(|p| &p.ty == b"ispe")
        .filter_map(|p| parse_ispe(p.body))
        .max_by_key(|&(w, h)| u64::from(w) * u64::from(h))
}

/// Property numbers associated with `item`, in order, across all `ipma` boxes.
fn associations(iprp_kids: &[SubBox<'_>], item: u32) -> Vec<u16> {
    let mut out = Vec::new();
    for ipma in iprp_kids.iter().filter(|b| &b.ty == b"ipma") {
        read_ipma(ipma.body, item, &mut out);
    }
    out
}

/// Parse one `ipma` body: version u8, flags u24, entry_count u32, then per entry an item
/// ID (u16 in version 0, else u32), a u8 count, and that many associations: u16 (top bit
/// "essential", 15-bit index) when flags bit 0 is set, else u8 (1 + 7 bits). Stops
/// quietly at the first byte that is missing.
fn read_ipma(body: &[u8], item: u32, out: &mut Vec<u16>) {
    let (Some(&version), Some(flags), Some(count)) = (body.first(), be32(body, 0), be32(body, 4))
    else {
        return;
    };
    let wide_index = flags & 1 != 0;
    let mut off = 8usize;
    for _ in 0..count {
        let id = if version == 0 {
            be16(body, off).map(u32::from)
        } else {
            be32(body, off)
        };
        let Some(id) = id else { return };
        off += if version == 0 { 2 } else { 4 };
        let Some(&n) = body.get(off) else { return };
        off += 1;
        for _ in 0..n {
            let index = if wide_index {
                be16(body, off).map(|v| v & 0x7FFF)
            } else {
                body.get(off).map(|&v| u16::from(v & 0x7F))
            };
            let Some(index) = index else { return };
            off += if wide_index { 2 } else { 1 };
            if id == item {
                out.push(index);
            }
        }
    }
}

/// A symmetry of the square — rotations by multiples of 90° and mirrors — as the 2×2
/// matrix `[a, b, c, d]` mapping `(x, y)` to `(a·x + b·y, c·x + d·y)`, with y pointing
/// down as in image coordinates. Entries are always −1, 0 or 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Transform([i8; 4]);

impl Transform {
    const IDENTITY: Transform = Transform([1, 0, 0, 1]);
    /// 90° anti-clockwise on screen: right (1, 0) goes up (0, −1).
    const CCW: Transform = Transform([0, 1, -1, 0]);
    const FLIP_TOP_BOTTOM: Transform = Transform([1, 0, 0, -1]);
    const FLIP_LEFT_RIGHT: Transform = Transform([-1, 0, 0, 1]);

    fn rotate_ccw(quarter_turns: u8) -> Transform {
        (0..quarter_turns).fold(Transform::IDENTITY, |t, _| t.then(Transform::CCW))
    }

    fn mirror(mode: u8) -> Transform {
        if mode == 0 {
            Transform::FLIP_TOP_BOTTOM
        } else {
            Transform::FLIP_LEFT_RIGHT
        }
    }

    /// `self` followed by `next` (the matrix product `next × self`).
    fn then(self, next: Transform) -> Transform {
        let [a, b, c, d] = next.0;
        let [e, f, g, h] = self.0;
        Transform([a * e + b * g, a * f + b * h, c * e + d * g, c * f + d * h])
    }

    /// Whether x and y trade places (a quarter turn, transpose or transverse).
    fn swaps_axes(self) -> bool {
        self.0[0] == 0
    }

    /// The EXIF orientation whose display transform this is: 1 identity, 2 mirror
    /// left↔right, 3 rotate 180°, 4 mirror top↔bottom, 5 transpose, 6 rotate 90°
    /// clockwise, 7 transverse, 8 rotate 90° anti-clockwise.
    fn exif(self) -> u16 {
        match self.0 {
            [-1, 0, 0, 1] => 2,
            [-1, 0, 0, -1] => 3,
            [1, 0, 0, -1] => 4,
            [0, 1, 1, 0] => 5,
            [0, -1, 1, 0] => 6,
            [0, -1, -1, 0] => 7,
            [0, 1, -1, 0] => 8,
            _ => 1,
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::header::bmff::tests::{bx, ftyp, full};
    use crate::header::tests::probe_bytes;

    fn ispe(w: u32, h: u32) -> Vec<u8> {
        full(b"ispe", 0, 0, &[w.to_be_bytes(), h.to_be_bytes()].concat())
    }

    /// ipma (version 0, narrow indices) with one entry per (item, properties).
    fn ipma(entries: &[(u16, &[u8])]) -> Vec<u8> {
        let mut b = (entries.len() as u32).to_be_bytes().to_vec();
        for (item, props) in entries {
            b.extend_from_slice(&item.to_be_bytes());
            b.push(props.len() as u8);
            b.extend(props.iter().map(|p| p | 0x80));
        }
        full(b"ipma", 0, 0, &b)
    }

    /// A HEIF file: `ftyp`, an `mdat` placed first, then `meta` with `pitm` = 1.
    pub(crate) fn heif(major: &[u8; 4], props: &[Vec<u8>], ipma_box: Vec<u8>) -> Vec<u8> {
        let mut f = ftyp(major, &[b"mif1", b"miaf"]);
        f.extend(bx(b"mdat", &[0xAA; 100]));
        let ipco = bx(b"ipco", &props.concat());
        let iprp = bx(b"iprp", &[ipco, ipma_box].concat());
        let hdlr = full(b"hdlr", 0, 0, b"\0\0\0\0pict\0\0\0\0\0\0\0\0\0\0\0\0\0");
        let pitm = full(b"pitm", 0, 0, &1u16.to_be_bytes());
        f.extend(full(b"meta", 0, 0, &[hdlr, pitm, iprp].concat()));
        f
    }

    /// An AVIF whose primary item 1 has a 4000×3000 ispe plus the given extra properties;
    /// a larger unrelated ispe (item 2) must not be chosen.
    pub(crate) fn avif(extra: &[Vec<u8>]) -> Vec<u8> {
        let mut props = vec![ispe(8000, 8000), ispe(4000, 3000)];
        props.extend_from_slice(extra);
        let mut assoc = vec![2u8];
        assoc.extend((0..extra.len()).map(|i| 3 + i as u8));
        heif(b"avif", &props, ipma(&[(2, &[1]), (1, &assoc)]))
    }

    fn irot(angle: u8) -> Vec<u8> {
        bx(b"irot", &[angle])
    }

    fn imir(mode: u8) -> Vec<u8> {
        bx(b"imir", &[mode])
    }

    #[test]
    fn primary_item_size() {
        let i = probe_bytes(&avif(&[])).unwrap();
        assert_eq!(
            (i.format, i.width, i.height, i.orientation),
            (Format::Avif, 4000, 3000, None)
        );
    }

    #[test]
    fn irot_imir_mapping() {
        let cases: [(&[Vec<u8>], u16); 12] = [
            (&[irot(0)], 1),
            (&[irot(1)], 8),
            (&[irot(2)], 3),
            (&[irot(3)], 6),
            (&[imir(0)], 4),
            (&[imir(1)], 2),
            (&[irot(1), imir(0)], 5),
            (&[irot(1), imir(1)], 7),
            (&[irot(2), imir(0)], 2),
            (&[irot(3), imir(0)], 7),
            (&[irot(3), imir(1)], 5),
            // Mirror first, then rotate: left↔right then 90° ⟲ is the transpose.
            (&[imir(1), irot(1)], 5),
        ];
        for (props, want) in cases {
            let i = probe_bytes(&avif(props)).unwrap();
            assert_eq!(i.orientation, Some(want), "{props:?}");
            assert_eq!((i.width, i.height), (4000, 3000));
        }
    }

    #[test]
    fn transform_group_is_closed() {
        let all = [0u8, 1, 2, 3].map(Transform::rotate_ccw);
        for r in all {
            for m in [
                Transform::mirror(0),
                Transform::mirror(1),
                Transform::IDENTITY,
            ] {
                let t = r.then(m);
                assert!(t.0.iter().all(|v| (-1..=1).contains(v)));
                assert!((1..=8).contains(&t.exif()));
            }
        }
        assert_eq!(Transform::rotate_ccw(4), Transform::IDENTITY);
    }

    #[test]
    fn heic_and_fallbacks() {
        // No ipma: largest ispe wins.
        let f = heif(b"heic", &[ispe(512, 512), ispe(4032, 3024)], Vec::new());
        let i = probe_bytes(&f).unwrap();
        assert_eq!(
            (i.format, i.width, i.height, i.orientation),
            (Format::Heic, 4032, 3024, None)
        );
        // mif1 major brand with avif compatible brand.
        let mut g = heif(b"mif1", &[ispe(10, 20)], ipma(&[(1, &[1])]));
        g[20..24].copy_from_slice(b"avif");
        assert_eq!(probe_bytes(&g).unwrap().format, Format::Avif);
        // Wide (u16) property indices, version 1 ipma with u32 item IDs.
        let mut b = 1u32.to_be_bytes().to_vec();
        b.extend_from_slice(&1u32.to_be_bytes());
        b.push(2);
        b.extend_from_slice(&[0x80, 0x02, 0x00, 0x01]);
        let wide = full(b"ipma", 1, 1, &b);
        let f = heif(b"heic", &[ispe(7, 9), irot(3)], wide);
        let i = probe_bytes(&f).unwrap();
        assert_eq!((i.width, i.height, i.orientation), (7, 9, Some(6)));
    }

    fn clap(w: u32, h: u32) -> Vec<u8> {
        let v = [w, 1, h, 1, 0, 1, 0, 1];
        bx(
            b"clap",
            &v.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>(),
        )
    }

    #[test]
    fn clean_aperture() {
        let i = probe_bytes(&avif(&[clap(123, 45)])).unwrap();
        assert_eq!((i.width, i.height, i.orientation), (123, 45, None));
        // Listed after a quarter turn, it crops the rotated image.
        let i = probe_bytes(&avif(&[irot(1), clap(45, 123)])).unwrap();
        assert_eq!((i.width, i.height, i.orientation), (123, 45, Some(8)));
        // A crop larger than the image, or with a zero denominator, is ignored.
        let i = probe_bytes(&avif(&[clap(5000, 45)])).unwrap();
        assert_eq!((i.width, i.height), (4000, 3000));
        let zero_d = bx(b"clap", &[0u8; 32]);
        assert_eq!(probe_bytes(&avif(&[zero_d])).unwrap().width, 4000);
        // Rounded to the nearest integer.
        assert_eq!(
            parse_clap(&[0, 0, 0, 7, 0, 0, 0, 2, 0, 0, 0, 9, 0, 0, 0, 3]),
            Some((4, 3))
        );
    }

    #[test]
    fn errors() {
        let no_ispe = heif(b"avif", &[irot(1)], ipma(&[(1, &[1])]));
        assert!(matches!(probe_bytes(&no_ispe), Err(Error::Unsupported(_))));
        let zero = heif(b"avif", &[ispe(0, 5)], ipma(&[(1, &[1])]));
        assert!(matches!(probe_bytes(&zero), Err(Error::Corrupt(_))));
        let mut no_meta = ftyp(b"avif", &[]);
        no_meta.extend(bx(b"mdat", &[0; 10]));
        assert!(matches!(probe_bytes(&no_meta), Err(Error::Truncated(_))));
        no_meta.extend(bx(b"moov", &[0; 10]));
        assert!(matches!(probe_bytes(&no_meta), Err(Error::Unsupported(_))));
        let f = avif(&[irot(1)]);
        assert!(matches!(
            probe_bytes(&f[..f.len() - 10]),
            Err(Error::Truncated(_))
        ));
        // A bogus property index is ignored.
        let bogus = heif(b"avif", &[ispe(3, 4)], ipma(&[(1, &[1, 99, 0])]));
        assert_eq!(probe_bytes(&bogus).unwrap().orientation, None);
    }
}
