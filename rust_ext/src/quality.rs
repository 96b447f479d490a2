//! Image quality statistics, computed from the pixels `decode` already produced for the
//! perceptual hash (no second decode). Definitions (also in data_manifests/manifest_schema.md):
//!
//! - `sharpness`: the luma (Pillow's "L", 0..255) is area-averaged to a working size whose
//!   shorter side is [`WORK_SIDE`] (images already smaller are used as they are, never
//!   upscaled); on that f32 image, the population variance of the 4-neighbour Laplacian
//!   `L[y-1][x] + L[y+1][x] + L[y][x-1] + L[y][x+1] - 4 L[y][x]` over the interior pixels.
//! - The other statistics are taken over the *statistics grid* of the decoded image: the pixels
//!   whose row and column are both multiples of `k = max(1, ⌊shorter side / GRID_ROWS⌋)` (at
//!   least [`GRID_ROWS`] rows and columns of samples; a few thousand pixels, whatever the size).
//! - `luma_mean`, `luma_std`: mean and population standard deviation of the luma on the grid.
//! - `clip_low`, `clip_high`: fraction of grid luma ≤ [`CLIP_LOW`] and ≥ [`CLIP_HIGH`].
//! - `colorfulness` (Hasler & Süsstrunk 2003): with rg = R − G and yb = (R + G)/2 − B over the
//!   grid's RGB pixels, `sqrt(σ_rg² + σ_yb²) + 0.3 · sqrt(μ_rg² + μ_yb²)` (population σ).
//! - `chroma`: mean over pixels of max(R, G, B) − min(R, G, B); `grayscale` is chroma ≤
//!   [`GRAY_CHROMA`].
//! - `jpeg_quality`: the IJG quality 1..100 whose standard tables (scaled as libjpeg's
//!   `jpeg_quality_scaling`, clamped to 1..255) are nearest (sum of absolute differences) to
//!   the file's quantisation tables; None for files that are not JPEG.

/// Shorter side of the working image for `sharpness` (the fast hash mode's smallest decoded
/// side, so both hash modes measure on the same working size).
pub const WORK_SIDE: usize = 128;
/// The statistics grid has at least this many rows and columns (see the module docs).
pub const GRID_ROWS: usize = 64;

/// The grid step of a `w`×`h` image.
pub fn grid_step(w: usize, h: usize) -> usize {
    (w.min(h) / GRID_ROWS).max(1)
}

/// Pixels on the grid of a `w`×`h` image.
pub fn grid_points(w: usize, h: usize) -> u64 {
    let k = grid_step(w, h);
    (w.div_ceil(k) * h.div_ceil(k)) as u64
}

/// Luma at or below this counts as a crushed shadow.
pub const CLIP_LOW: u8 = 5;
/// Luma at or above this counts as a blown highlight.
pub const CLIP_HIGH: u8 = 250;
/// Mean max−min channel spread (0..255) at or below which an image counts as grayscale.
pub const GRAY_CHROMA: f64 = 2.0;

/// Colour sums gathered while converting RGB pixels to luma.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ColorAcc {
    pub n: u64,
    pub rg: i64,
    pub rg2: i64,
    /// Sums of 2·yb = R + G − 2B (kept integral).
    pub yb2: i64,
    pub yb2sq: i64,
    pub chroma: u64,
}

impl ColorAcc {
    #[inline]
    pub fn add(&mut self, r: u8, g: u8, b: u8) {
        let (ri, gi, bi) = (r as i64, g as i64, b as i64);
        let rg = ri - gi;
        let yb = ri + gi - 2 * bi;
        self.n += 1;
        self.rg += rg;
        self.rg2 += rg * rg;
        self.yb2 += yb;
        self.yb2sq += yb * yb;
        self.chroma += (r.max(g).max(b) - r.min(g).min(b)) as u64;
    }

    /// `n` gray pixels (R = G = B): every sum but the count stays 0.
    pub fn add_gray(&mut self, n: u64) {
        self.n += n;
    }

    pub fn merge(&mut self, o: &ColorAcc) {
        self.n += o.n;
        self.rg += o.rg;
        self.rg2 += o.rg2;
        self.yb2 += o.yb2;
        self.yb2sq += o.yb2sq;
        self.chroma += o.chroma;
    }

    /// (colorfulness, mean chroma).
    pub fn finish(&self) -> (f64, f64) {
        if self.n == 0 {
            return (0.0, 0.0);
        }
        let n = self.n as f64;
        let mrg = self.rg as f64 / n;
        let vrg = (self.rg2 as f64 / n - mrg * mrg).max(0.0);
        let myb = self.yb2 as f64 / n / 2.0;
        let vyb = (self.yb2sq as f64 / n / 4.0 - myb * myb).max(0.0);
        let c = (vrg + vyb).sqrt() + 0.3 * (mrg * mrg + myb * myb).sqrt();
        (c, self.chroma as f64 / n)
    }
}

/// The statistics of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub sharpness: f64,
    pub luma_mean: f64,
    pub luma_std: f64,
    pub clip_low: f64,
    pub clip_high: f64,
    pub colorfulness: f64,
    pub grayscale: bool,
    pub jpeg_quality: Option<u8>,
}

/// Every statistic from the decoded luma (`width`×`height`, row-major), the colour sums and,
/// for JPEGs, the file's bytes.
pub fn stats(
    luma: &[u8],
    width: usize,
    height: usize,
    color: &ColorAcc,
    jpeg: Option<&[u8]>,
) -> Stats {
    let mut hist = [0u64; 256];
    let k = grid_step(width, height);
    for y in (0..height).step_by(k) {
        for &v in luma[y * width..(y + 1) * width].iter().step_by(k) {
            hist[v as usize] += 1;
        }
    }
    let n = hist.iter().sum::<u64>().max(1) as f64;
    let (mut s, mut s2) = (0f64, 0f64);
    for (v, &c) in hist.iter().enumerate() {
        let (v, c) = (v as f64, c as f64);
        s += v * c;
        s2 += v * v * c;
    }
    let mean = s / n;
    let low: u64 = hist[..=CLIP_LOW as usize].iter().sum();
    let high: u64 = hist[CLIP_HIGH as usize..].iter().sum();
    let (colorfulness, chroma) = color.finish();
    Stats {
        sharpness: sharpness(luma, width, height),
        luma_mean: mean,
        luma_std: (s2 / n - mean * mean).max(0.0).sqrt(),
        clip_low: low as f64 / n,
        clip_high: high as f64 / n,
        colorfulness,
        grayscale: chroma <= GRAY_CHROMA,
        jpeg_quality: jpeg.and_then(jpeg_quality),
    }
}

/// The working size for an image of `w`×`h`: shorter side [`WORK_SIDE`], aspect kept
/// (rounded half up), never larger than the image.
pub fn work_size(w: usize, h: usize) -> (usize, usize) {
    let short = w.min(h);
    if short <= WORK_SIDE {
        return (w, h);
    }
    let scale = |x: usize| ((x * WORK_SIDE + short / 2) / short).max(1);
    (scale(w), scale(h))
}

/// Area-average weights from `n_in` samples to `n_out`: per output (first input, weights).
fn area_weights(n_in: usize, n_out: usize) -> Vec<(usize, Vec<f32>)> {
    let s = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|i| {
            let (a, b) = (i as f64 * s, (i + 1) as f64 * s);
            let first = a.floor() as usize;
            let last = (b.ceil() as usize).min(n_in);
            let w = (first..last)
                .map(|j| (((j + 1) as f64).min(b) - (j as f64).max(a)).max(0.0) / s)
                .map(|v| v as f32)
                .collect();
            (first, w)
        })
        .collect()
}

/// [`area_weights`] with every output's taps padded to the same count `taps` (zero weights; the
/// first input moved left where the padding would run past the end), so the horizontal pass
/// runs a fixed-length, unrolled dot product per output.
struct Weights {
    /// Per output: its first input and its taps (`taps` weights at `i * taps`) — for the
    /// vertical pass, which only visits the real taps, `(first, start, end)` into `w`.
    spans: Vec<(usize, usize, usize)>,
    w: Vec<f32>,
    taps: usize,
    pfirst: Vec<usize>,
    pw: Vec<f32>,
}

/// Padded tap counts the horizontal pass has an unrolled version for.
const TAP_SIZES: [usize; 8] = [2, 3, 4, 6, 8, 10, 12, 16];

thread_local! {
    static WEIGHTS: crate::phash::SizeCache<Weights> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`area_weights`] of `n_in` → `n_out`, flattened and padded, from this thread's cache.
fn cached_weights(n_in: usize, n_out: usize) -> std::rc::Rc<Weights> {
    WEIGHTS.with(|cell| {
        crate::phash::size_cached(cell, (n_in, n_out), 64, || {
            let aw = area_weights(n_in, n_out);
            let most = aw.iter().map(|(_, w)| w.len()).max().unwrap_or(1);
            let taps = TAP_SIZES
                .into_iter()
                .find(|&t| t >= most && t <= n_in)
                .unwrap_or(most);
            let mut wt = Weights {
                spans: Vec::with_capacity(n_out),
                w: Vec::new(),
                taps,
                pfirst: Vec::with_capacity(n_out),
                pw: vec![0.0; n_out * taps],
            };
            for (i, (first, ws)) in aw.into_iter().enumerate() {
                wt.spans.push((first, wt.w.len(), wt.w.len() + ws.len()));
                let pf = first.min(n_in - taps);
                let off = first - pf;
                wt.pw[i * taps + off..i * taps + off + ws.len()].copy_from_slice(&ws);
                wt.pfirst.push(pf);
                wt.w.extend(ws);
            }
            wt
        })
    })
}

/// One row of the horizontal pass with `N` taps per output.
fn hpass<const N: usize>(row: &[f32], wt: &Weights, out: &mut [f32]) {
    for ((o, &f), k) in out.iter_mut().zip(&wt.pfirst).zip(wt.pw.chunks_exact(N)) {
        let px: &[f32; N] = row[f..f + N].try_into().expect("N taps");
        let k: &[f32; N] = k.try_into().expect("N weights");
        let mut acc = 0f32;
        for t in 0..N {
            acc += px[t] * k[t];
        }
        *o = acc;
    }
}

/// The luma area-averaged to [`work_size`] as f32.
pub fn working_image(luma: &[u8], w: usize, h: usize) -> (Vec<f32>, usize, usize) {
    let (ow, oh) = work_size(w, h);
    if (ow, oh) == (w, h) {
        return (luma.iter().map(|&v| v as f32).collect(), w, h);
    }
    let wx = cached_weights(w, ow);
    let wy = cached_weights(h, oh);
    // Vertical pass first, along whole rows (8 lanes at a time), then the horizontal one on `oh` rows.
    let mut tmp = vec![0f32; w * oh];
    for (yy, &(first, a, b)) in wy.spans.iter().enumerate() {
        let dst = &mut tmp[yy * w..(yy + 1) * w];
        for (k, &wk) in wy.w[a..b].iter().enumerate() {
            let src = &luma[(first + k) * w..(first + k + 1) * w];
            let mut d8 = dst.chunks_exact_mut(8);
            let mut s8 = src.chunks_exact(8);
            for (d, s) in (&mut d8).zip(&mut s8) {
                for j in 0..8 {
                    d[j] += s[j] as f32 * wk;
                }
            }
            for (d, &v) in d8.into_remainder().iter_mut().zip(s8.remainder()) {
                *d += v as f32 * wk;
            }
        }
    }
    let mut out = vec![0f32; ow * oh];
    for yy in 0..oh {
        let (row, o) = (&tmp[yy * w..(yy + 1) * w], &mut out[yy * ow..(yy + 1) * ow]);
        match wx.taps {
            2 => hpass::<2>(row, &wx, o),
            3 => hpass::<3>(row, &wx, o),
            4 => hpass::<4>(row, &wx, o),
            6 => hpass::<6>(row, &wx, o),
            8 => hpass::<8>(row, &wx, o),
            10 => hpass::<10>(row, &wx, o),
            12 => hpass::<12>(row, &wx, o),
            16 => hpass::<16>(row, &wx, o),
            n => {
                for ((v, &f), k) in o.iter_mut().zip(&wx.pfirst).zip(wx.pw.chunks_exact(n)) {
                    *v = row[f..f + n].iter().zip(k).map(|(&p, &c)| p * c).sum();
                }
            }
        }
    }
    (out, ow, oh)
}

/// Variance of the 4-neighbour Laplacian of the working image (0 when smaller than 3×3).
pub fn sharpness(luma: &[u8], w: usize, h: usize) -> f64 {
    let (img, w, h) = working_image(luma, w, h);
    if w < 3 || h < 3 {
        return 0.0;
    }
    let (mut s, mut s2) = (0f64, 0f64);
    let n = w - 2;
    for y in 1..h - 1 {
        let up = &img[(y - 1) * w + 1..(y - 1) * w + 1 + n];
        let down = &img[(y + 1) * w + 1..(y + 1) * w + 1 + n];
        let mid = &img[y * w + 1..y * w + 1 + n];
        let left = &img[y * w..y * w + n];
        let right = &img[y * w + 2..y * w + 2 + n];
        // 8 independent lanes (vectorises), summed per row into f64.
        let (mut a, mut a2) = ([0f32; 8], [0f32; 8]);
        let full = n / 8 * 8;
        for i in (0..full).step_by(8) {
            for j in 0..8 {
                let x = i + j;
                let l = up[x] + down[x] + left[x] + right[x] - 4.0 * mid[x];
                a[j] += l;
                a2[j] += l * l;
            }
        }
        for x in full..n {
            let l = up[x] + down[x] + left[x] + right[x] - 4.0 * mid[x];
            a[0] += l;
            a2[0] += l * l;
        }
        s += a.iter().map(|&v| v as f64).sum::<f64>();
        s2 += a2.iter().map(|&v| v as f64).sum::<f64>();
    }
    let cnt = ((w - 2) * (h - 2)) as f64;
    let m = s / cnt;
    (s2 / cnt - m * m).max(0.0)
}

/// IJG's standard luminance and chrominance tables (natural order, Annex K).
const STD_LUMA: [u16; 64] = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113,
    92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
];
const STD_CHROMA: [u16; 64] = [
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
];
/// Zigzag position k → natural index (DQT segments store tables in zigzag order).
const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

/// The quantisation tables 0 and 1 (natural order) of a JPEG, read from its DQT segments.
pub fn quant_tables(bytes: &[u8]) -> [Option<[u16; 64]>; 2] {
    let mut out = [None, None];
    let mut i = 2; // after SOI
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            break;
        }
        let m = bytes[i + 1];
        if m == 0xFF {
            i += 1;
            continue;
        }
        if m == 0xD8 || m == 0x01 || (0xD0..=0xD7).contains(&m) {
            i += 2;
            continue;
        }
        if m == 0xDA || m == 0xD9 {
            break;
        }
        let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
        let end = (i + 2 + len).min(bytes.len());
        if m == 0xDB {
            let mut p = i + 4;
            while p < end {
                let (pq, tq) = (bytes[p] >> 4, (bytes[p] & 15) as usize);
                let size = if pq == 0 { 64 } else { 128 };
                if p + 1 + size > end {
                    break;
                }
                let mut t = [0u16; 64];
                for (k, &nat) in ZIGZAG.iter().enumerate() {
                    t[nat] = if pq == 0 {
                        bytes[p + 1 + k] as u16
                    } else {
                        u16::from_be_bytes([bytes[p + 1 + 2 * k], bytes[p + 2 + 2 * k]])
                    };
                }
                if tq < 2 {
                    out[tq] = Some(t);
                }
                p += 1 + size;
            }
        }
        if len < 2 {
            break;
        }
        i += 2 + len;
    }
    out
}

/// libjpeg's table for `quality` (jpeg_quality_scaling, baseline clamp to 1..255).
pub fn ijg_table(basic: &[u16; 64], quality: u32) -> [u16; 64] {
    let q = quality.clamp(1, 100);
    let scale = if q < 50 { 5000 / q } else { 200 - 2 * q };
    basic.map(|b| ((b as u32 * scale + 50) / 100).clamp(1, 255) as u16)
}

/// The estimated IJG quality (1..100) of a JPEG, or None without a luminance table.
pub fn jpeg_quality(bytes: &[u8]) -> Option<u8> {
    let [luma, chroma] = quant_tables(bytes);
    let luma = luma?;
    let dist = |t: &[u16; 64], r: &[u16; 64]| -> u64 {
        t.iter()
            .zip(r)
            .map(|(&a, &b)| (a as i64 - b as i64).unsigned_abs())
            .sum()
    };
    static TABLES: std::sync::OnceLock<Vec<([u16; 64], [u16; 64])>> = std::sync::OnceLock::new();
    let tables = TABLES.get_or_init(|| {
        (1..=100u32)
            .map(|q| (ijg_table(&STD_LUMA, q), ijg_table(&STD_CHROMA, q)))
            .collect()
    });
    let mut best = (u64::MAX, 0u32);
    for (q, (tl, tc)) in (1..=100u32).zip(tables) {
        let mut d = dist(&luma, tl);
        if let Some(c) = &chroma {
            d += dist(c, tc);
        }
        if d <= best.0 {
            best = (d, q);
        }
    }
    Some(best.1 as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_size_keeps_aspect_and_never_upscales() {
        assert_eq!(work_size(1200, 800), (192, 128));
        assert_eq!(work_size(800, 1200), (128, 192));
        assert_eq!(work_size(100, 50), (100, 50));
    }

    #[test]
    fn working_image_is_the_plain_area_average() {
        // The padded, unrolled passes against the direct double loop over `area_weights`.
        for (w, h) in [(250, 188), (1000, 750), (131, 400), (2000, 129)] {
            let luma: Vec<u8> = (0..w * h).map(|i| ((i * 7919) % 251) as u8).collect();
            let (img, ow, oh) = working_image(&luma, w, h);
            assert_eq!((ow, oh), work_size(w, h));
            let (wx, wy) = (area_weights(w, ow), area_weights(h, oh));
            for (yy, (fy, ky)) in wy.iter().enumerate() {
                for (xx, (fx, kx)) in wx.iter().enumerate() {
                    let mut want = 0f64;
                    for (i, &a) in ky.iter().enumerate() {
                        for (j, &b) in kx.iter().enumerate() {
                            want += luma[(fy + i) * w + fx + j] as f64 * a as f64 * b as f64;
                        }
                    }
                    let got = img[yy * ow + xx] as f64;
                    assert!(
                        (got - want).abs() < 1e-3,
                        "{w}x{h} at {xx},{yy}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn area_weights_sum_to_one() {
        for (i, o) in [(1200, 192), (300, 128), (129, 128)] {
            for (_, w) in area_weights(i, o) {
                let s: f32 = w.iter().sum();
                assert!((s - 1.0).abs() < 1e-5, "{i}->{o}: {s}");
            }
        }
    }

    #[test]
    fn flat_image_has_zero_sharpness_and_checkerboard_a_lot() {
        assert_eq!(sharpness(&[90u8; 64 * 64], 64, 64), 0.0);
        let board: Vec<u8> = (0..64 * 64)
            .map(|i| if (i % 64 + i / 64) % 2 == 0 { 0 } else { 255 })
            .collect();
        assert!(sharpness(&board, 64, 64) > 1e5);
    }

    #[test]
    fn luma_stats_and_clipping() {
        let luma: Vec<u8> = [0u8, 255, 100, 100].to_vec();
        let mut c = ColorAcc::default();
        c.add_gray(4);
        let s = stats(&luma, 2, 2, &c, None);
        assert!((s.luma_mean - 113.75).abs() < 1e-9);
        assert_eq!((s.clip_low, s.clip_high), (0.25, 0.25));
        assert!(s.grayscale);
        assert_eq!(s.colorfulness, 0.0);
        assert_eq!(s.jpeg_quality, None);
    }

    #[test]
    fn colorfulness_of_pure_red() {
        let mut c = ColorAcc::default();
        for _ in 0..10 {
            c.add(255, 0, 0);
        }
        let (cf, chroma) = c.finish();
        // rg = 255, yb = 127.5, no spread: 0.3 * sqrt(255² + 127.5²)
        assert!((cf - 0.3 * (255f64.powi(2) + 127.5f64.powi(2)).sqrt()).abs() < 1e-9);
        assert_eq!(chroma, 255.0);
    }

    #[test]
    fn quality_from_tables_round_trips() {
        for q in [10u32, 20, 50, 75, 90, 95] {
            let t0 = ijg_table(&STD_LUMA, q);
            let t1 = ijg_table(&STD_CHROMA, q);
            let mut b = vec![0xFF, 0xD8, 0xFF, 0xDB, 0, 2 + 65 * 2];
            for (id, t) in [(0u8, t0), (1, t1)] {
                b.push(id);
                b.extend(ZIGZAG.iter().map(|&nat| t[nat] as u8));
            }
            b.extend([0xFF, 0xD9]);
            assert_eq!(jpeg_quality(&b), Some(q as u8), "quality {q}");
        }
        assert_eq!(jpeg_quality(&[0xFF, 0xD8, 0xFF, 0xD9]), None);
    }
}
