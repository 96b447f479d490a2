//! Aspect-ratio bucket assignment.
//!
//! An image of size w×h goes to the bucket whose aspect ratio is nearest in log space,
//! |ln(w/h) − ln(bw/bh)|. Ties (buckets of equal ratio) go to the bucket whose area is nearest
//! the image's area in log space, then to the earlier table entry, so assignment is
//! deterministic. The image is scaled to cover the bucket (scale = max(bw/w, bh/h)) and cropped,
//! centred or at a seeded random offset.

use crate::error::{Error, Result, Status};
use rayon::prelude::*;

/// A bucket table entry (width, height) in pixels.
pub type Size = (u32, u32);

/// What to do with an image that would have to be upscaled to cover its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmallPolicy {
    /// Upscale it (the default of most trainers).
    Upscale,
    /// Give it its own bucket: its size (or the table's max area, if larger) floored to `step`,
    /// as kohya's `bucket_no_upscale` does.
    Own,
    /// Reject it with status `needs_upscale`.
    Reject,
}

#[derive(Debug, Clone)]
pub struct AssignOptions {
    pub small: SmallPolicy,
    /// Side multiple for `SmallPolicy::Own` buckets.
    pub step: u32,
    /// Images whose shorter side is below this get status `too_small`.
    pub min_side: u32,
    /// Crop fraction above which an image is rejected (or flagged when `flag_only`).
    pub max_crop: Option<f64>,
    pub flag_only: bool,
    /// Random crop offsets from this seed (mixed with each row's key); centred when None.
    pub random_crop_seed: Option<u64>,
}

impl Default for AssignOptions {
    fn default() -> Self {
        AssignOptions {
            small: SmallPolicy::Upscale,
            step: 64,
            min_side: 0,
            max_crop: None,
            flag_only: false,
            random_crop_seed: None,
        }
    }
}

/// The outcome for one image.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Assignment {
    /// `Ok` or a rejection (`TooSmall`, `NeedsUpscale`, `CropTooLarge`); `None` when the size
    /// is unknown and the row keeps the status it has.
    pub status: Option<Status>,
    /// The crop is over `max_crop` but the image was kept (`flag_only`).
    pub flagged: bool,
    pub bucket_width: u32,
    pub bucket_height: u32,
    pub scale: f64,
    /// The image size after scaling (before cropping).
    pub scaled_width: u32,
    pub scaled_height: u32,
    pub crop_left: u32,
    pub crop_top: u32,
    /// Share of the scaled image's pixels cut away by the crop.
    pub crop_fraction: f64,
    pub upscaled: bool,
}

/// Check a table: non-empty, every side positive.
pub fn validate_table(table: &[Size]) -> Result<()> {
    if table.is_empty() {
        return Err(Error::InvalidInput("bucket table is empty".into()));
    }
    if let Some((w, h)) = table.iter().find(|(w, h)| *w == 0 || *h == 0) {
        return Err(Error::InvalidInput(format!(
            "bucket {w}x{h} has a zero side"
        )));
    }
    Ok(())
}

/// Index of the nearest bucket for an image of size w×h (both > 0).
pub fn nearest(table: &[Size], log_ratios: &[f64], w: u32, h: u32) -> usize {
    let r = (f64::from(w) / f64::from(h)).ln();
    let area = (f64::from(w) * f64::from(h)).ln();
    let mut best = 0usize;
    let mut best_key = (f64::INFINITY, f64::INFINITY);
    for (i, (&(bw, bh), &lr)) in table.iter().zip(log_ratios).enumerate() {
        let d = (r - lr).abs();
        let a = ((f64::from(bw) * f64::from(bh)).ln() - area).abs();
        // Strictly better ratio, or an equal ratio with a strictly nearer area; else keep first.
        if d < best_key.0 || (d == best_key.0 && a < best_key.1) {
            best = i;
            best_key = (d, a);
        }
    }
    best
}

/// Log aspect ratio of each bucket.
pub fn log_ratios(table: &[Size]) -> Vec<f64> {
    table
        .iter()
        .map(|&(w, h)| (f64::from(w) / f64::from(h)).ln())
        .collect()
}

/// SplitMix64: a tiny, well-mixed hash for deterministic per-image random crops.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Scale w×h to cover bw×bh and place the crop. Returns the filled assignment (status "ok").
pub fn cover(w: u32, h: u32, bw: u32, bh: u32, key: u64, seed: Option<u64>) -> Assignment {
    let scale = (f64::from(bw) / f64::from(w)).max(f64::from(bh) / f64::from(h));
    // Rounded scaled size, never smaller than the bucket (the cover side is exact).
    let sw = ((f64::from(w) * scale).round() as u32).max(bw);
    let sh = ((f64::from(h) * scale).round() as u32).max(bh);
    let (rx, ry) = (sw - bw, sh - bh);
    let (crop_left, crop_top) = match seed {
        None => (rx / 2, ry / 2),
        Some(s) => {
            let a = splitmix64(s ^ splitmix64(key));
            let b = splitmix64(a);
            (
                (a % (u64::from(rx) + 1)) as u32,
                (b % (u64::from(ry) + 1)) as u32,
            )
        }
    };
    let crop_fraction = 1.0 - (f64::from(bw) * f64::from(bh)) / (f64::from(sw) * f64::from(sh));
    Assignment {
        status: Some(Status::Ok),
        flagged: false,
        bucket_width: bw,
        bucket_height: bh,
        scale,
        scaled_width: sw,
        scaled_height: sh,
        crop_left,
        crop_top,
        crop_fraction: crop_fraction.max(0.0),
        upscaled: scale > 1.0,
    }
}

/// kohya-style own bucket for an image that must not be upscaled: its size, shrunk to the
/// table's largest area if bigger, with both sides floored to `step`. None if a side floors to 0.
pub fn own_bucket(w: u32, h: u32, max_area: f64, step: u32) -> Option<Size> {
    let (mut fw, mut fh) = (f64::from(w), f64::from(h));
    if fw * fh > max_area {
        let s = (max_area / (fw * fh)).sqrt();
        fw *= s;
        fh *= s;
    }
    let step = step.max(1);
    let bw = (fw.floor() as u32 / step) * step;
    let bh = (fh.floor() as u32 / step) * step;
    (bw > 0 && bh > 0).then_some((bw, bh))
}

/// Assign one image. `key` seeds its random crop (e.g. a hash of its path).
pub fn assign(
    table: &[Size],
    lrs: &[f64],
    w: u32,
    h: u32,
    key: u64,
    o: &AssignOptions,
) -> Assignment {
    let rejected = |status| Assignment {
        status: Some(status),
        ..Default::default()
    };
    if w == 0 || h == 0 || w.min(h) < o.min_side {
        return rejected(Status::TooSmall);
    }
    let (bw, bh) = table[nearest(table, lrs, w, h)];
    let mut a = cover(w, h, bw, bh, key, o.random_crop_seed);
    if a.upscaled {
        match o.small {
            SmallPolicy::Upscale => {}
            SmallPolicy::Reject => return rejected(Status::NeedsUpscale),
            SmallPolicy::Own => {
                let max_area = table
                    .iter()
                    .map(|&(x, y)| f64::from(x) * f64::from(y))
                    .fold(0.0, f64::max);
                match own_bucket(w, h, max_area, o.step) {
                    Some((ow, oh)) => a = cover(w, h, ow, oh, key, o.random_crop_seed),
                    None => return rejected(Status::TooSmall),
                }
            }
        }
    }
    if let Some(max_crop) = o.max_crop {
        if a.crop_fraction > max_crop {
            if o.flag_only {
                a.flagged = true;
            } else {
                return rejected(Status::CropTooLarge);
            }
        }
    }
    a
}

/// Assign many images in parallel (current rayon pool). `sizes[i]` of (0, 0) means unknown and
/// gives an empty assignment with status `None` (the caller keeps the row's existing status).
pub fn assign_all(
    table: &[Size],
    sizes: &[Size],
    keys: &[u64],
    o: &AssignOptions,
) -> Result<Vec<Assignment>> {
    validate_table(table)?;
    if keys.len() != sizes.len() {
        return Err(Error::InvalidInput(
            "keys and sizes differ in length".into(),
        ));
    }
    let lrs = log_ratios(table);
    Ok(sizes
        .par_iter()
        .zip(keys.par_iter())
        .map(|(&(w, h), &k)| {
            if w == 0 && h == 0 {
                Assignment::default()
            } else {
                assign(table, &lrs, w, h, k, o)
            }
        })
        .collect())
}

/// kohya-style generated table: for each width from `min_side` to `max_side` in `step`s, the
/// largest height (a multiple of `step`, ≤ max_side) with w·h ≤ max_area, both orientations,
/// plus the largest square. Sorted by aspect ratio, then width; duplicates removed.
pub fn generate(max_area: u64, step: u32, min_side: u32, max_side: u32) -> Result<Vec<Size>> {
    if step == 0 || min_side == 0 || max_side < min_side || max_area == 0 {
        return Err(Error::InvalidInput(format!(
            "cannot generate buckets from max_area={max_area} step={step} min_side={min_side} max_side={max_side}"
        )));
    }
    let mut out: Vec<Size> = Vec::new();
    let side = (((max_area as f64).sqrt() as u32) / step) * step;
    if side >= min_side && side > 0 {
        out.push((side.min(max_side), side.min(max_side)));
    }
    let mut w = min_side.div_ceil(step) * step;
    while w <= max_side {
        let h = ((max_area / u64::from(w)) as u32 / step * step).min(max_side);
        if h >= min_side {
            out.push((w, h));
            out.push((h, w));
        }
        w += step;
    }
    out.sort_by(|a, b| {
        let ra = f64::from(a.0) / f64::from(a.1);
        let rb = f64::from(b.0) / f64::from(b.1);
        ra.total_cmp(&rb).then(a.0.cmp(&b.0))
    });
    out.dedup();
    if out.is_empty() {
        return Err(Error::InvalidInput(
            "the generation options give no bucket".into(),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HW: [Size; 3] = [(832, 1248), (1024, 1024), (1248, 832)];

    #[test]
    fn nearest_by_log_ratio() {
        let l = log_ratios(&HW);
        assert_eq!(nearest(&HW, &l, 4000, 3000), 2);
        assert_eq!(nearest(&HW, &l, 3000, 4000), 0);
        assert_eq!(nearest(&HW, &l, 500, 510), 1);
    }

    #[test]
    fn equal_ratio_prefers_nearest_area() {
        let t = [(512, 512), (1024, 1024)];
        let l = log_ratios(&t);
        assert_eq!(nearest(&t, &l, 600, 600), 0);
        assert_eq!(nearest(&t, &l, 2000, 2000), 1);
    }

    #[test]
    fn cover_crops_inside() {
        let a = cover(4000, 3000, 1248, 832, 0, None);
        assert!(a.scaled_width >= 1248 && a.scaled_height >= 832);
        assert_eq!(a.scaled_width, 1248);
        assert_eq!(a.scaled_height, 936);
        assert_eq!((a.crop_left, a.crop_top), (0, 52));
        assert!(!a.upscaled);
        for s in 0..50 {
            let r = cover(4000, 3000, 1248, 832, s, Some(7));
            assert!(r.crop_top <= 104 && r.crop_left == 0);
        }
    }

    #[test]
    fn small_policies() {
        let l = log_ratios(&HW);
        let mut o = AssignOptions {
            small: SmallPolicy::Reject,
            ..Default::default()
        };
        assert_eq!(
            assign(&HW, &l, 300, 200, 0, &o).status,
            Some(Status::NeedsUpscale)
        );
        o.small = SmallPolicy::Own;
        let a = assign(&HW, &l, 300, 200, 0, &o);
        assert_eq!(
            (a.status, a.bucket_width, a.bucket_height, a.upscaled),
            (Some(Status::Ok), 256, 192, false)
        );
        o.small = SmallPolicy::Upscale;
        o.min_side = 256;
        assert_eq!(
            assign(&HW, &l, 300, 200, 0, &o).status,
            Some(Status::TooSmall)
        );
    }

    #[test]
    fn max_crop_rejects_or_flags() {
        let l = log_ratios(&HW);
        let mut o = AssignOptions {
            max_crop: Some(0.2),
            ..Default::default()
        };
        assert_eq!(
            assign(&HW, &l, 4000, 1000, 0, &o).status,
            Some(Status::CropTooLarge)
        );
        o.flag_only = true;
        let a = assign(&HW, &l, 4000, 1000, 0, &o);
        assert!(a.flagged && a.status == Some(Status::Ok));
    }

    #[test]
    fn generated_table_like_kohya() {
        let t = generate(1024 * 1024, 64, 256, 2048).unwrap();
        assert!(t.contains(&(1024, 1024)) && t.contains(&(832, 1216)) && t.contains(&(1216, 832)));
        assert!(t
            .iter()
            .all(|&(w, h)| w % 64 == 0 && h % 64 == 0 && u64::from(w) * u64::from(h) <= 1 << 20));
        assert!(generate(0, 64, 256, 2048).is_err());
    }
}
