//! Decoding image files to the 8-bit luma Pillow's `Image.open(p).convert("L")` gives.
//!
//! - JPEG: libjpeg-turbo through its TurboJPEG API (the system library, linked directly), with
//!   the same settings Pillow uses — accurate integer IDCT (ISLOW), fancy upsampling — to RGB,
//!   then Pillow's luma `(19595 R + 38470 G + 7471 B + 0x8000) >> 16`. Grayscale JPEGs decode
//!   to gray directly; CMYK/YCCK JPEGs follow Pillow ("CMYK;I": Adobe inverted values, then
//!   Pillow's CMYK→RGB, then luma). With `scale_min_side`, a JPEG is decoded at reduced scale in
//!   the DCT domain (1/2, 1/4, 1/8, the smallest keeping both sides ≥ the minimum): the fast mode.
//! - PNG: the `png` crate, expanded to 8 bits per sample the way Pillow reads each colour type
//!   (palette → RGB, low bit depths scaled, 16-bit RGB/LA: high byte, 16-bit gray: Pillow's
//!   "I;16" → "L" clip to 255).
//! - Everything else is `Error::Unsupported`; the Python side then falls back to Pillow itself.

use crate::error::{Error, IoResultExt, Result};
use crate::phash::Luma;
use crate::quality::{ColorAcc, Stats};
use std::os::raw::{c_char, c_int, c_uchar, c_ulong, c_void};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

#[inline]
fn l24(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

fn rgb_to_luma(px: &[u8], channels: usize) -> Vec<u8> {
    if channels == 4 {
        // 4-byte pixels: one u32 load each, which the compiler vectorises.
        return px
            .chunks_exact(4)
            .map(|p| {
                let v = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
                l24(v as u8, (v >> 8) as u8, (v >> 16) as u8)
            })
            .collect();
    }
    let mut out = vec![0u8; px.len() / channels];
    for (o, p) in out.iter_mut().zip(px.chunks_exact(channels)) {
        *o = l24(p[0], p[1], p[2]);
    }
    out
}

#[inline]
fn muldiv255(a: u32, b: u32) -> u32 {
    let t = a * b + 128;
    ((t >> 8) + t) >> 8
}

/// Pillow's `cmyk2rgb` then luma, from the inverted ("CMYK;I") stored values.
fn cmyk_inverted_to_luma(px: &[u8]) -> Vec<u8> {
    px.chunks_exact(4)
        .map(|p| {
            let (r, g, b) = cmyk_inverted_rgb(p);
            l24(r, g, b)
        })
        .collect()
}

/// Pillow's `cmyk2rgb` of one inverted ("CMYK;I") pixel.
#[inline]
fn cmyk_inverted_rgb(p: &[u8]) -> (u8, u8, u8) {
    let (c, m, y, k) = (255 - p[0], 255 - p[1], 255 - p[2], 255 - p[3]);
    let nk = 255 - k as i32;
    let ch = |v: u8| (nk - muldiv255(v as u32, nk as u32) as i32).clamp(0, 255) as u8;
    (ch(c), ch(m), ch(y))
}

/// Colour sums over the statistics grid (`quality::grid_step`) of `h` rows of `w` pixels of
/// `bytes_pp` bytes each, `stride` bytes apart; `rgb` reads one pixel.
fn grid_color(
    px: &[u8],
    (w, h, stride, bytes_pp): (usize, usize, usize, usize),
    acc: &mut ColorAcc,
    rgb: impl Fn(&[u8]) -> (u8, u8, u8),
) {
    let k = crate::quality::grid_step(w, h);
    for y in (0..h).step_by(k) {
        let row = &px[y * stride..];
        for x in (0..w).step_by(k) {
            let (r, g, b) = rgb(&row[x * bytes_pp..(x + 1) * bytes_pp]);
            acc.add(r, g, b);
        }
    }
}

/// Pillow refuses images above this (DecompressionBombError); so do we.
pub const MAX_PIXELS: u64 = crate::limits::MAX_PIXELS;

fn check_pixels(n: u64) -> Result<()> {
    if n > MAX_PIXELS {
        return Err(Error::TooLarge(format!(
            "image has {n} pixels, more than the {MAX_PIXELS} limit"
        )));
    }
    Ok(())
}

// ---- TurboJPEG (libjpeg-turbo) FFI: the stable 2.x API, also exported by 3.x ----

#[allow(non_camel_case_types)]
type tjhandle = *mut c_void;

const TJPF_RGBX: c_int = 2;
const TJPF_GRAY: c_int = 6;
const TJPF_CMYK: c_int = 11;
const TJCS_YCBCR: c_int = 1;
const TJCS_GRAY: c_int = 2;
const TJCS_CMYK: c_int = 3;
const TJCS_YCCK: c_int = 4;
const TJFLAG_ACCURATEDCT: c_int = 4096;
const TJERR_WARNING: c_int = 0;

#[link(name = "turbojpeg")]
extern "C" {
    fn tjInitDecompress() -> tjhandle;
    fn tjDestroy(handle: tjhandle) -> c_int;
    fn tjDecompressHeader3(
        handle: tjhandle,
        jpeg_buf: *const c_uchar,
        jpeg_size: c_ulong,
        width: *mut c_int,
        height: *mut c_int,
        jpeg_subsamp: *mut c_int,
        jpeg_colorspace: *mut c_int,
    ) -> c_int;
    fn tjDecompress2(
        handle: tjhandle,
        jpeg_buf: *const c_uchar,
        jpeg_size: c_ulong,
        dst_buf: *mut c_uchar,
        width: c_int,
        pitch: c_int,
        height: c_int,
        pixel_format: c_int,
        flags: c_int,
    ) -> c_int;
    fn tjDecompressToYUVPlanes(
        handle: tjhandle,
        jpeg_buf: *const c_uchar,
        jpeg_size: c_ulong,
        dst_planes: *mut *mut c_uchar,
        width: c_int,
        strides: *mut c_int,
        height: c_int,
        flags: c_int,
    ) -> c_int;
    fn tjPlaneWidth(component_id: c_int, width: c_int, subsamp: c_int) -> c_int;
    fn tjPlaneHeight(component_id: c_int, height: c_int, subsamp: c_int) -> c_int;
    fn tjGetErrorStr2(handle: tjhandle) -> *mut c_char;
    fn tjGetErrorCode(handle: tjhandle) -> c_int;
}

struct Decompressor(tjhandle);

impl Decompressor {
    fn new() -> Result<Decompressor> {
        // SAFETY: plain constructor; null on failure.
        let h = unsafe { tjInitDecompress() };
        if h.is_null() {
            return Err(Error::Unsupported("cannot start libjpeg-turbo".into()));
        }
        Ok(Decompressor(h))
    }

    fn error(&self) -> String {
        // SAFETY: the handle is valid; the library returns a NUL-terminated static/handle string.
        unsafe {
            let p = tjGetErrorStr2(self.0);
            if p.is_null() {
                return "unknown libjpeg-turbo error".into();
            }
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: the handle came from tjInitDecompress and is destroyed once.
        unsafe {
            tjDestroy(self.0);
        }
    }
}

impl Decompressor {
    /// The outcome of a decode call: Pillow refuses truncated JPEGs ("image file is
    /// truncated"); other warnings (extraneous bytes, ...) it decodes through, and so do we.
    fn check(&self, rc: c_int) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: valid handle.
        let code = unsafe { tjGetErrorCode(self.0) };
        let msg = self.error();
        if msg.contains("Premature end") {
            return Err(Error::Truncated(format!("JPEG data: {msg}")));
        }
        if code != TJERR_WARNING {
            return Err(Error::Corrupt(format!("JPEG data: {msg}")));
        }
        Ok(())
    }
}

thread_local! {
    static TJ: std::cell::RefCell<Option<Decompressor>> = const { std::cell::RefCell::new(None) };
    /// Per-thread scratch for decoded pixels that are not kept (RGB before luma, chroma planes).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The scaled size TurboJPEG produces for `num/denom` (TJSCALED).
fn scaled(dim: c_int, num: c_int, denom: c_int) -> c_int {
    (dim * num + denom - 1) / denom
}

/// The DCT scaling denominator of fast mode: the smallest scale 1/2^k (k ≤ 3) keeping both
/// sides ≥ `min` (1 = full size when even 1/2 would go below it).
pub fn fast_denom(w: u32, h: u32, min: u32) -> u32 {
    let (w, h, min) = (w as c_int, h as c_int, min.max(1) as c_int);
    let mut denom = 1;
    for d in [2, 4, 8] {
        if scaled(w, 1, d) >= min && scaled(h, 1, d) >= min {
            denom = d;
        }
    }
    denom as u32
}

/// A buffer of `n` bytes from `v`, grown when needed (contents are overwritten by the caller).
fn sized(v: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if v.len() < n {
        v.resize(n, 0);
    }
    &mut v[..n]
}

/// libjpeg's YCbCr → RGB (jdcolor.c, 16-bit fixed point, rounded, clamped).
#[inline]
fn ycc_rgb(y: u8, cb: u8, cr: u8) -> (u8, u8, u8) {
    let (y, cb, cr) = (y as i32, cb as i32 - 128, cr as i32 - 128);
    let c = |v: i32| v.clamp(0, 255) as u8;
    (
        c(y + ((91881 * cr + 32768) >> 16)),
        c(y + ((-22554 * cb - 46802 * cr + 32768) >> 16)),
        c(y + ((116130 * cb + 32768) >> 16)),
    )
}

/// Decode a JPEG to luma. `scale_min_side`: decode at the smallest 1/2^k scale (k ≤ 3) whose
/// sides are both ≥ this (fast mode); None = full size (exact mode). With `acc`, the colour
/// sums of the decoded RGB pixels are gathered on the way (see `quality`).
///
/// Fast mode on a YCbCr JPEG (nearly all of them) skips what luma-only work does not need: the
/// luma is the decoded Y plane itself (`Y = 0.299 R + 0.587 G + 0.114 B`, Pillow's weights, so
/// it differs from Pillow's `convert("L")` only by rounding and out-of-gamut clamping). Without
/// `acc` libjpeg-turbo decodes Y alone (no chroma IDCT, upsampling or colour conversion); with
/// it, the Y, Cb and Cr planes (no upsampling or conversion), and the colour sums read each
/// grid pixel's RGB from its Y and its nearest chroma sample.
pub fn decode_jpeg(
    bytes: &[u8],
    scale_min_side: Option<u32>,
    acc: Option<&mut ColorAcc>,
) -> Result<Luma> {
    TJ.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Decompressor::new()?);
        }
        let tj = slot.as_ref().expect("initialised above");
        let (mut w, mut h, mut sub, mut cs) = (0, 0, 0, 0);
        // SAFETY: buffer and out-pointers are valid for the call.
        let rc = unsafe {
            tjDecompressHeader3(
                tj.0,
                bytes.as_ptr(),
                bytes.len() as c_ulong,
                &mut w,
                &mut h,
                &mut sub,
                &mut cs,
            )
        };
        if rc != 0 {
            return Err(Error::Corrupt(format!("JPEG header: {}", tj.error())));
        }
        if w <= 0 || h <= 0 {
            return Err(Error::Corrupt("JPEG has a zero size".into()));
        }
        check_pixels(w as u64 * h as u64)?;
        let denom = scale_min_side.map_or(1, |m| fast_denom(w as u32, h as u32, m) as c_int);
        let (sw, sh) = (scaled(w, 1, denom), scaled(h, 1, denom));
        let luma_only = scale_min_side.is_some() && cs == TJCS_YCBCR;
        if cs == TJCS_GRAY || (luma_only && acc.is_none()) {
            let l = decode_gray(tj, bytes, sw, sh)?;
            if let Some(a) = acc {
                a.add_gray(crate::quality::grid_points(l.width, l.height));
            }
            return Ok(l);
        }
        match acc {
            Some(a) if luma_only => decode_planes(tj, bytes, (sw, sh, sub), a),
            acc => decode_color(tj, bytes, (sw, sh, cs), acc),
        }
    })
}

/// Decode straight to 8-bit gray (for YCbCr files: the Y plane, chroma never decoded).
fn decode_gray(tj: &Decompressor, bytes: &[u8], sw: c_int, sh: c_int) -> Result<Luma> {
    let n = (sw as usize)
        .checked_mul(sh as usize)
        .ok_or_else(|| Error::TooLarge("JPEG too large".into()))?;
    let mut buf = vec![0u8; n];
    // SAFETY: `buf` holds sw * sh bytes, the exact output of this call (pitch 0 = tight).
    let rc = unsafe {
        tjDecompress2(
            tj.0,
            bytes.as_ptr(),
            bytes.len() as c_ulong,
            buf.as_mut_ptr(),
            sw,
            0,
            sh,
            TJPF_GRAY,
            TJFLAG_ACCURATEDCT,
        )
    };
    tj.check(rc)?;
    Ok(Luma::new(sw as usize, sh as usize, buf))
}

/// Decode the Y, Cb and Cr planes of a YCbCr JPEG at `sw`×`sh`: the luma is Y; the colour
/// sums take each grid pixel's Y with the chroma sample covering it.
fn decode_planes(
    tj: &Decompressor,
    bytes: &[u8],
    (sw, sh, sub): (c_int, c_int, c_int),
    acc: &mut ColorAcc,
) -> Result<Luma> {
    // SAFETY: pure functions of their arguments (-1 for an unknown subsampling).
    let (yw, yh, cw, ch) = unsafe {
        (
            tjPlaneWidth(0, sw, sub),
            tjPlaneHeight(0, sh, sub),
            tjPlaneWidth(1, sw, sub),
            tjPlaneHeight(1, sh, sub),
        )
    };
    if yw < sw || yh < sh || cw < 1 || ch < 1 {
        return Err(Error::Unsupported(format!("JPEG subsampling {sub}")));
    }
    let (yw, yh, cw, ch) = (yw as usize, yh as usize, cw as usize, ch as usize);
    let (sw, sh) = (sw as usize, sh as usize);
    let mut y = vec![0u8; yw * yh];
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let chroma = sized(&mut s, 2 * cw * ch);
        let (cb, cr) = chroma.split_at_mut(cw * ch);
        let mut planes = [y.as_mut_ptr(), cb.as_mut_ptr(), cr.as_mut_ptr()];
        let mut strides = [yw as c_int, cw as c_int, cw as c_int];
        // SAFETY: each plane holds its tjPlaneWidth × tjPlaneHeight bytes at the given strides,
        // exactly what this call writes for a `sw`×`sh` output.
        let rc = unsafe {
            tjDecompressToYUVPlanes(
                tj.0,
                bytes.as_ptr(),
                bytes.len() as c_ulong,
                planes.as_mut_ptr(),
                sw as c_int,
                strides.as_mut_ptr(),
                sh as c_int,
                TJFLAG_ACCURATEDCT,
            )
        };
        tj.check(rc)?;
        let k = crate::quality::grid_step(sw, sh);
        let cols: Vec<(usize, usize)> = (0..sw).step_by(k).map(|x| (x, x * cw / yw)).collect();
        for r in (0..sh).step_by(k) {
            let (row, c0) = (&y[r * yw..(r + 1) * yw], r * ch / yh * cw);
            let (cbr, crr) = (&cb[c0..c0 + cw], &cr[c0..c0 + cw]);
            for &(x, c) in &cols {
                let (r, g, b) = ycc_rgb(row[x], cbr[c], crr[c]);
                acc.add(r, g, b);
            }
        }
        Ok::<(), Error>(())
    })?;
    if yw != sw {
        for r in 1..sh {
            y.copy_within(r * yw..r * yw + sw, r * sw);
        }
    }
    y.truncate(sw * sh);
    Ok(Luma::new(sw, sh, y))
}

/// Decode to RGB (or CMYK) and convert to Pillow's luma (exact mode; fast mode for RGB/CMYK
/// files), gathering the colour sums into `acc` when given.
fn decode_color(
    tj: &Decompressor,
    bytes: &[u8],
    (sw, sh, cs): (c_int, c_int, c_int),
    acc: Option<&mut ColorAcc>,
) -> Result<Luma> {
    let cmyk = matches!(cs, TJCS_CMYK | TJCS_YCCK);
    let pf = if cmyk { TJPF_CMYK } else { TJPF_RGBX };
    let n = (sw as usize)
        .checked_mul(sh as usize)
        .and_then(|v| v.checked_mul(4))
        .ok_or_else(|| Error::TooLarge("JPEG too large".into()))?;
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let buf = sized(&mut s, n);
        // SAFETY: `buf` holds sw * sh * 4 bytes, the exact output of this call (pitch 0 = tight).
        let rc = unsafe {
            tjDecompress2(
                tj.0,
                bytes.as_ptr(),
                bytes.len() as c_ulong,
                buf.as_mut_ptr(),
                sw,
                0,
                sh,
                pf,
                TJFLAG_ACCURATEDCT,
            )
        };
        tj.check(rc)?;
        let (sw, sh) = (sw as usize, sh as usize);
        if let Some(a) = acc {
            let dims = (sw, sh, sw * 4, 4);
            if cmyk {
                grid_color(buf, dims, a, cmyk_inverted_rgb);
            } else {
                grid_color(buf, dims, a, |p| (p[0], p[1], p[2]));
            }
        }
        let data = if cmyk {
            cmyk_inverted_to_luma(buf)
        } else {
            rgb_to_luma(buf, 4)
        };
        Ok(Luma::new(sw, sh, data))
    })
}

#[path = "decode_png.rs"]
mod png_luma;
pub use png_luma::decode_png;

/// Which decoder a file's bytes call for.
pub fn sniff(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("jpeg")
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("png")
    } else {
        None
    }
}

/// Decode bytes (JPEG or PNG) to luma. Other formats are `Error::Unsupported`.
pub fn decode_bytes(bytes: &[u8], scale_min_side: Option<u32>) -> Result<Luma> {
    decode_bytes_with(bytes, scale_min_side, None)
}

/// [`decode_bytes`], gathering the colour sums into `acc` when given.
pub fn decode_bytes_with(
    bytes: &[u8],
    scale_min_side: Option<u32>,
    acc: Option<&mut ColorAcc>,
) -> Result<Luma> {
    if bytes.is_empty() {
        return Err(Error::Io {
            kind: crate::error::Status::Empty,
            msg: "file is empty".into(),
        });
    }
    match sniff(bytes) {
        Some("jpeg") => decode_jpeg(bytes, scale_min_side, acc),
        Some("png") => decode_png(bytes, acc),
        _ => Err(Error::Unsupported(
            "not a JPEG or PNG (decoded by the Pillow fallback)".into(),
        )),
    }
}

/// Read and decode a file to luma.
pub fn decode_file(path: &Path, scale_min_side: Option<u32>) -> Result<Luma> {
    let bytes = std::fs::read(path).ctx(&path.display().to_string())?;
    decode_bytes(&bytes, scale_min_side)
}

/// What one file gives: its hashes and, when asked, its quality statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct Hashed {
    pub phash: u64,
    pub dhash: u64,
    pub stats: Option<Stats>,
}

/// Hash (and with `stats`, measure) one file from a single decode.
pub fn hash_file(path: &Path, scale_min_side: Option<u32>, stats: bool) -> Result<Hashed> {
    let bytes = std::fs::read(path).ctx(&path.display().to_string())?;
    hash_bytes(&bytes, scale_min_side, stats)
}

/// [`hash_file`] for an image already in memory (a tar member, a Parquet cell).
pub fn hash_bytes(bytes: &[u8], scale_min_side: Option<u32>, stats: bool) -> Result<Hashed> {
    let mut acc = ColorAcc::default();
    let l = decode_bytes_with(bytes, scale_min_side, stats.then_some(&mut acc))?;
    if l.width == 0 || l.height == 0 {
        return Err(Error::Corrupt("image has a zero size".into()));
    }
    let st = stats.then(|| {
        let jpeg = (sniff(bytes) == Some("jpeg")).then_some(bytes);
        crate::quality::stats(&l.data, l.width, l.height, &acc, jpeg)
    });
    Ok(Hashed {
        phash: crate::phash::phash(&l),
        dhash: crate::phash::dhash(&l),
        stats: st,
    })
}

/// [`hash_file`] of each path, in parallel (in the caller's rayon pool), in input order.
/// Workers check `cancel` before each file; once it is set, the remaining files are skipped
/// (their results are `Error::InvalidInput("cancelled")` and the caller discards the run).
pub fn hash_files(
    paths: &[std::path::PathBuf],
    scale_min_side: Option<u32>,
    stats: bool,
    cancel: &AtomicBool,
) -> Vec<Result<Hashed>> {
    use rayon::prelude::*;
    // One file per task: a worker that the OS deschedules (a loaded machine) holds up one file,
    // not a run of them — the others take the rest, as a shared queue would.
    paths
        .par_iter()
        .with_max_len(1)
        .map(|p| {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::InvalidInput("cancelled".into()));
            }
            hash_file(p, scale_min_side, stats)
        })
        .collect()
}

#[cfg(test)]
#[path = "decode_tests.rs"]
mod tests;
