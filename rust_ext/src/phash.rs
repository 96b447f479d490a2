//! Perceptual hashes bit-identical to the `imagehash` package (4.3.2): `phash` and `dhash`.
//!
//! Both start from an 8-bit luma image (Pillow's `convert("L")`, see `decode`) and resize it
//! with a reproduction of Pillow's LANCZOS resampling (libImaging/Resample.c): separable passes,
//! horizontal first unless the height shrinks much more than the width, coefficients `sinc(x)·sinc(x/3)` over a support of `3·scale`, normalised,
//! then quantised to 22-bit fixed point (`PRECISION_BITS = 32 - 8 - 2`), accumulated in `i32`
//! with a rounding half, shifted and clipped to 0..255.
//!
//! phash: resize to 32×32, a type-II DCT (unnormalised, like `scipy.fftpack.dct`) along axis 0
//! then axis 1, the top-left 8×8 block, bit = coefficient > median of the 64. dhash: resize to
//! 9×8 (w×h), bit = right neighbour > left. The first coefficient is the most significant bit,
//! so `format!("{h:016x}")` equals `str(imagehash.phash(img))`.
//!
//! Ties: a bit is set only when a coefficient is strictly above the median of the 64 (the mean
//! of the two middle values). When those two values are equal — a perfectly flat image, where
//! every AC coefficient is 0 up to rounding — the result depends on the rounding noise of the
//! DCT implementation (scipy uses an FFT; this is a direct sum in f64), so flat or perfectly
//! symmetric images can differ from imagehash in the tied bits. Real photos have no such ties.

/// An 8-bit single-channel image, rows top to bottom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Luma {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Luma {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Luma {
        debug_assert_eq!(data.len(), width * height);
        Luma {
            width,
            height,
            data,
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;
const LANCZOS_SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

fn lanczos(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for a box of (0, in_size).
/// Returns (ksize, bounds as (xmin, count), fixed-point coefficients `out_size * ksize`).
fn coefficients(in_size: usize, out_size: usize) -> (usize, Vec<(usize, usize)>, Vec<i32>) {
    // `(double)(in1 - in0) / outSize` with in0, in1 floats: exact for any realistic size.
    let scale = (in_size as f32) as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = LANCZOS_SUPPORT * filterscale;
    let ksize = (support.ceil() as usize) * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let xmin = xmin as usize;
        let count = (xmax - xmin as i64).max(0) as usize;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(count) {
            let w = lanczos(((x + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for x in 0..ksize {
            let mut v = if x < count { k[x] } else { 0.0 };
            if x < count && ww != 0.0 {
                v /= ww;
            }
            let f = v * (1u32 << PRECISION_BITS) as f64;
            kk[xx * ksize + x] = if v < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, count));
    }
    (ksize, bounds, kk)
}

#[inline]
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The resampling coefficients of one (input size, output size) pair, computed once per thread
/// (a set of photos has few distinct sizes; the computation's `sin` calls cost as much as the
/// passes themselves).
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    kk: Vec<i32>,
    #[cfg(target_arch = "x86_64")]
    split: SplitCoeffs,
}

/// A small per-thread cache of tables keyed by (input size, output size), most recently used
/// last; a set of photos has few distinct sizes, and a miss only recomputes.
pub(crate) type SizeCache<T> = std::cell::RefCell<Vec<((usize, usize), std::rc::Rc<T>)>>;

/// The entry of `key` in `cache`, made with `make` (evicting the least recently used beyond
/// `cap` entries) when missing.
pub(crate) fn size_cached<T>(
    cache: &SizeCache<T>,
    key: (usize, usize),
    cap: usize,
    make: impl FnOnce() -> T,
) -> std::rc::Rc<T> {
    let mut c = cache.borrow_mut();
    if let Some(k) = c.iter().position(|(k, _)| *k == key) {
        let hit = c.remove(k);
        let v = hit.1.clone();
        c.push(hit);
        return v;
    }
    let v = std::rc::Rc::new(make());
    if c.len() >= cap {
        c.remove(0);
    }
    c.push((key, v.clone()));
    v
}

thread_local! {
    static COEFFS: SizeCache<Coeffs> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`coefficients`] of `in_size` → `out_size`, from this thread's cache.
fn cached_coefficients(in_size: usize, out_size: usize) -> std::rc::Rc<Coeffs> {
    COEFFS.with(|cell| {
        size_cached(cell, (in_size, out_size), 64, || {
            let (ksize, bounds, kk) = coefficients(in_size, out_size);
            Coeffs {
                #[cfg(target_arch = "x86_64")]
                split: SplitCoeffs::new(&bounds, ksize, &kk),
                ksize,
                bounds,
                kk,
            }
        })
    })
}

/// One horizontal pass over rows `row0..row0 + rows` of `src` (width `w`) to width `out_w`.
fn pass_h(src: &[u8], w: usize, row0: usize, rows: usize, out_w: usize) -> Vec<u8> {
    let half = 1i32 << (PRECISION_BITS - 1);
    let co = cached_coefficients(w, out_w);
    let mut out = vec![0u8; out_w * rows];
    #[cfg(target_arch = "x86_64")]
    {
        let split = &co.split;
        let mut wide = vec![0i16; w + 8];
        for ty in 0..rows {
            let y = row0 + ty;
            for (d, &p) in wide.iter_mut().zip(&src[y * w..(y + 1) * w]) {
                *d = p as i16;
            }
            for (xx, &(xmin, _)) in co.bounds.iter().enumerate() {
                out[ty * out_w + xx] = clip8(half.wrapping_add(split.dot(xx, &wide[xmin..])));
            }
        }
        out
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let (ksize, kk) = (co.ksize, &co.kk);
        for ty in 0..rows {
            let y = row0 + ty;
            let row = &src[y * w..(y + 1) * w];
            for (xx, &(xmin, count)) in co.bounds.iter().enumerate() {
                let k = &kk[xx * ksize..xx * ksize + count];
                let mut ss = half;
                for (p, c) in row[xmin..xmin + count].iter().zip(k) {
                    ss += *p as i32 * c;
                }
                out[ty * out_w + xx] = clip8(ss);
            }
        }
        out
    }
}

/// Fixed-point coefficients split as k = hi·2^11 + lo (lo in 0..2048), both fitting i16, so a
/// dot product runs on SSE2's `pmaddwd` (8 products per instruction) and still gives exactly
/// Pillow's `Σ pixel·k` in 32-bit integers: 2^11·Σ p·hi + Σ p·lo.
#[cfg(target_arch = "x86_64")]
struct SplitCoeffs {
    /// Per output: taps rounded up to a multiple of 8, zero padded.
    stride: usize,
    counts: Vec<usize>,
    hi: Vec<i16>,
    lo: Vec<i16>,
}

#[cfg(target_arch = "x86_64")]
impl SplitCoeffs {
    fn new(bounds: &[(usize, usize)], ksize: usize, kk: &[i32]) -> SplitCoeffs {
        let stride = ksize.div_ceil(8) * 8;
        let mut hi = vec![0i16; stride * bounds.len()];
        let mut lo = vec![0i16; stride * bounds.len()];
        for (xx, &(_, count)) in bounds.iter().enumerate() {
            for x in 0..count {
                let k = kk[xx * ksize + x];
                hi[xx * stride + x] = (k >> 11) as i16;
                lo[xx * stride + x] = (k & 0x7FF) as i16;
            }
        }
        SplitCoeffs {
            stride,
            counts: bounds.iter().map(|b| b.1).collect(),
            hi,
            lo,
        }
    }

    /// Σ px[x]·k[x] over output `xx`'s taps; `px` must hold ≥ taps rounded up to 8 values
    /// (the caller pads with 8 zeros).
    #[inline]
    fn dot(&self, xx: usize, px: &[i16]) -> i32 {
        use std::arch::x86_64::*;
        let n = self.counts[xx].div_ceil(8) * 8;
        let hi = &self.hi[xx * self.stride..xx * self.stride + n];
        let lo = &self.lo[xx * self.stride..xx * self.stride + n];
        // Pixels past the real taps multiply zero coefficients; `px` may be shorter than `n`
        // only by the padding the caller guarantees, so bound-check once here.
        assert!(px.len() >= n);
        // SAFETY: SSE2 is part of the x86_64 baseline; every load reads 8 i16 inside the
        // slices checked above (unaligned loads).
        unsafe {
            let mut ah = _mm_setzero_si128();
            let mut al = _mm_setzero_si128();
            let mut i = 0;
            while i < n {
                let p = _mm_loadu_si128(px.as_ptr().add(i) as *const __m128i);
                let h = _mm_loadu_si128(hi.as_ptr().add(i) as *const __m128i);
                let l = _mm_loadu_si128(lo.as_ptr().add(i) as *const __m128i);
                ah = _mm_add_epi32(ah, _mm_madd_epi16(p, h));
                al = _mm_add_epi32(al, _mm_madd_epi16(p, l));
                i += 8;
            }
            let mut a = [0i32; 4];
            let mut b = [0i32; 4];
            _mm_storeu_si128(a.as_mut_ptr() as *mut __m128i, ah);
            _mm_storeu_si128(b.as_mut_ptr() as *mut __m128i, al);
            let sh = a[0]
                .wrapping_add(a[1])
                .wrapping_add(a[2])
                .wrapping_add(a[3]);
            let sl = b[0]
                .wrapping_add(b[1])
                .wrapping_add(b[2])
                .wrapping_add(b[3]);
            sh.wrapping_shl(11).wrapping_add(sl)
        }
    }
}

/// One vertical pass of `src` (width `w`, whose row 0 is source row `row0`) to `out_h` rows,
/// with coefficients for a source of `in_h` rows.
fn pass_v(src: &[u8], w: usize, in_h: usize, row0: usize, out_h: usize) -> Vec<u8> {
    let half = 1i32 << (PRECISION_BITS - 1);
    let co = cached_coefficients(in_h, out_h);
    let (ksize, kk) = (co.ksize, &co.kk);
    let mut out = vec![0u8; w * out_h];
    for (yy, &(ymin, count)) in co.bounds.iter().enumerate() {
        let k = &kk[yy * ksize..yy * ksize + count];
        for xx in 0..w {
            let mut ss = half;
            for (y, c) in k.iter().enumerate() {
                ss += src[(ymin - row0 + y) * w + xx] as i32 * c;
            }
            out[yy * w + xx] = clip8(ss);
        }
    }
    out
}

/// Pillow's `im.resize((w, h), Image.LANCZOS)` for an "L" image, bit for bit (Pillow 13's
/// ImagingResampleInner: horizontal pass first — over only the rows the vertical pass reads —
/// unless the height shrinks by more than twice what the width does, then vertical first).
pub fn resize_lanczos(img: &Luma, out_w: usize, out_h: usize) -> Luma {
    let (w, h) = (img.width, img.height);
    if w == out_w && h == out_h {
        return img.clone();
    }
    let need_h = out_w != w;
    let need_v = out_h != h;
    let dy = h as i64 - out_h as i64;
    let dx = w as i64 - out_w as i64;
    let horizontal_first = !(dy > 0 && dy > dx * 2);
    if horizontal_first {
        if !need_v {
            return Luma::new(out_w, h, pass_h(&img.data, w, 0, h, out_w));
        }
        let bounds_v = &cached_coefficients(h, out_h).bounds;
        let first = bounds_v[0].0;
        let last = bounds_v[out_h - 1].0 + bounds_v[out_h - 1].1;
        let tmp = pass_h(&img.data, w, first, last - first, out_w);
        Luma::new(out_w, out_h, pass_v(&tmp, out_w, h, first, out_h))
    } else {
        let tmp = pass_v(&img.data, w, h, 0, out_h);
        if !need_h {
            return Luma::new(w, out_h, tmp);
        }
        Luma::new(out_w, out_h, pass_h(&tmp, w, 0, out_h, out_w))
    }
}

/// `cos(pi * k * (2n + 1) / 64)` for k < 8, n < 32.
fn dct_table() -> [[f64; 32]; 8] {
    let mut t = [[0.0; 32]; 8];
    for (k, row) in t.iter_mut().enumerate() {
        for (n, v) in row.iter_mut().enumerate() {
            *v = (std::f64::consts::PI * (k * (2 * n + 1)) as f64 / 64.0).cos();
        }
    }
    t
}

/// The top-left 8×8 of scipy's `dct(dct(a, axis=0), axis=1)` (type II, norm=None) of 32×32.
pub fn dct_low(pixels: &[u8]) -> [f64; 64] {
    debug_assert_eq!(pixels.len(), 1024);
    let t = dct_table();
    // Axis 0 (down the columns): y[k][j] = 2 Σ_n x[n][j] cos(..k..n..)
    let mut y = [[0.0f64; 32]; 8];
    for (k, yk) in y.iter_mut().enumerate() {
        for (j, v) in yk.iter_mut().enumerate() {
            let mut s = 0.0;
            for n in 0..32 {
                s += pixels[n * 32 + j] as f64 * t[k][n];
            }
            *v = 2.0 * s;
        }
    }
    let mut out = [0.0f64; 64];
    for k in 0..8 {
        for l in 0..8 {
            let mut s = 0.0;
            for m in 0..32 {
                s += y[k][m] * t[l][m];
            }
            out[k * 8 + l] = 2.0 * s;
        }
    }
    out
}

fn bits_to_u64(bits: impl Iterator<Item = bool>) -> u64 {
    bits.fold(0u64, |h, b| (h << 1) | b as u64)
}

/// phash of an already-resized 32×32 luma block.
pub fn phash_from_32(pixels: &[u8]) -> u64 {
    let c = dct_low(pixels);
    let mut sorted = c;
    sorted.sort_by(|a, b| a.total_cmp(b));
    let med = (sorted[31] + sorted[32]) / 2.0;
    bits_to_u64(c.iter().map(|&v| v > med))
}

/// imagehash.phash(img) (hash_size 8, highfreq_factor 4) of a luma image.
pub fn phash(img: &Luma) -> u64 {
    let small = resize_lanczos(img, 32, 32);
    phash_from_32(&small.data)
}

/// imagehash.dhash(img) (hash_size 8) of a luma image.
pub fn dhash(img: &Luma) -> u64 {
    let s = resize_lanczos(img, 9, 8);
    bits_to_u64((0..8).flat_map(|r| {
        let row = &s.data[r * 9..r * 9 + 9];
        (0..8).map(move |c| row[c + 1] > row[c])
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_resize_is_a_copy() {
        let img = Luma::new(3, 2, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(resize_lanczos(&img, 3, 2), img);
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = Luma::new(100, 70, vec![77; 7000]);
        let s = resize_lanczos(&img, 32, 32);
        assert!(s.data.iter().all(|&v| v == 77));
        let s = resize_lanczos(&img, 9, 8);
        assert!(s.data.iter().all(|&v| v == 77));
    }

    #[test]
    fn size_cache_hits_and_evicts() {
        let cache: SizeCache<usize> = std::cell::RefCell::new(Vec::new());
        let a = size_cached(&cache, (1, 2), 2, || 12);
        assert_eq!(*size_cached(&cache, (1, 2), 2, || unreachable!()), 12);
        size_cached(&cache, (3, 4), 2, || 34);
        size_cached(&cache, (1, 2), 2, || unreachable!()); // (1, 2) most recent again
        size_cached(&cache, (5, 6), 2, || 56); // evicts (3, 4)
        assert_eq!(*size_cached(&cache, (3, 4), 2, || 99), 99);
        assert_eq!(cache.borrow().len(), 2);
        assert_eq!(*a, 12);
        // cached coefficients are the computed ones
        let c = cached_coefficients(1000, 32);
        assert_eq!((c.ksize, &c.bounds, &c.kk), {
            let (k, b, kk) = coefficients(1000, 32);
            (k, &b.clone(), &kk.clone())
        });
    }

    #[test]
    fn coefficients_sum_to_one() {
        for (i, o) in [(1000, 32), (33, 32), (20, 32), (9, 8)] {
            let (ks, b, kk) = coefficients(i, o);
            for (xx, &(_, n)) in b.iter().enumerate() {
                let s: i64 = kk[xx * ks..xx * ks + n].iter().map(|&v| v as i64).sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= n as i64,
                    "{i}->{o}: {s}"
                );
            }
        }
    }

    #[test]
    fn dct_dc_term() {
        let px = vec![10u8; 1024];
        let c = dct_low(&px);
        // scipy: 2N * mean per axis -> 64 * 64 * 10
        assert!((c[0] - 40960.0).abs() < 1e-9);
        assert!(c[1..].iter().all(|v| v.abs() < 1e-9));
    }

    #[test]
    fn gradient_dhash() {
        // Brightness increasing to the right: every dhash bit is set.
        let mut d = vec![0u8; 64 * 64];
        for y in 0..64 {
            for x in 0..64 {
                d[y * 64 + x] = (x * 4) as u8;
            }
        }
        assert_eq!(dhash(&Luma::new(64, 64, d)), u64::MAX);
    }
}
