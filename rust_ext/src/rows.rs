//! A folder's manifest rows kept in Rust from the scan to the Parquet file, so that `hw bucket
//! DIR` needs no dataframe library: scan records are appended ([`BucketRows::extend`]),
//! bucketed ([`BucketRows::assign`]), summarised ([`summarize`], also used for a manifest that
//! is re-bucketed from Python) and written ([`crate::parquet_out::write_rows`]).

use crate::bucket::{self, AssignOptions, Assignment, Size};
use crate::error::{Result, Status};
use crate::scan::ScanRecord;
use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// The `error` of a row rejected by bucketing starts with this, then the status name.
pub const REJECTED_BY_BUCKETING: &str = "rejected by bucketing: ";

/// Whether a row takes part in bucketing: read fine (or rejected by an earlier bucketing) and
/// of known size. Other rows keep their status and get no bucket.
pub fn eligible(status: Status, width: u32, height: u32) -> bool {
    (status == Status::Ok || status.is_bucket()) && width > 0 && height > 0
}

/// 64-bit key of a path for seeded random crops: xxh3-64 of its bytes.
pub fn path_key(path: &std::path::Path) -> u64 {
    xxhash_rust::xxh3::xxh3_64(path.as_os_str().as_bytes())
}

/// Scanned files and, once [`BucketRows::assign`] ran, their buckets.
#[derive(Debug, Default)]
pub struct BucketRows {
    pub paths: Vec<PathBuf>,
    pub recs: Vec<ScanRecord>,
    /// One per row after `assign` (empty before).
    pub assigned: Vec<Assignment>,
}

impl BucketRows {
    pub fn len(&self) -> usize {
        self.recs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }

    pub fn extend(&mut self, paths: &[PathBuf], recs: Vec<ScanRecord>) {
        debug_assert_eq!(paths.len(), recs.len());
        self.paths.extend_from_slice(paths);
        self.recs.extend(recs);
        self.assigned.clear();
    }

    /// Bucket every eligible row (current rayon pool): its status becomes the assignment's and
    /// its `error` says why it was rejected (none when ok). Other rows keep status and error.
    pub fn assign(&mut self, table: &[Size], opts: &AssignOptions) -> Result<()> {
        let sizes: Vec<Size> = self
            .recs
            .iter()
            .map(|r| match eligible(r.status, r.width, r.height) {
                true => (r.width, r.height),
                false => (0, 0),
            })
            .collect();
        let keys: Vec<u64> = match opts.random_crop_seed {
            Some(_) => self.paths.iter().map(|p| path_key(p)).collect(),
            None => vec![0; self.paths.len()],
        };
        let out = bucket::assign_all(table, &sizes, &keys, opts)?;
        for (rec, a) in self.recs.iter_mut().zip(&out) {
            if let Some(status) = a.status {
                rec.status = status;
                rec.error =
                    (status != Status::Ok).then(|| format!("{REJECTED_BY_BUCKETING}{status}"));
            }
        }
        self.assigned = out;
        Ok(())
    }

    /// Whether row `i` is bucketed (status ok after `assign`): its bucket columns are set.
    pub fn is_bucketed(&self, i: usize) -> bool {
        self.recs[i].status == Status::Ok
            && self.assigned.get(i).is_some_and(|a| a.status.is_some())
    }

    /// [`summarize`] over these rows (after `assign`).
    pub fn summary(&self) -> Summary {
        let n = self.len();
        let mut cols = SummaryColumns::with_capacity(n);
        for i in 0..n {
            let (r, ok) = (&self.recs[i], self.is_bucketed(i));
            let a = self.assigned.get(i).copied().unwrap_or_default();
            cols.status.push(r.status.code());
            cols.bucket.push(if ok {
                (a.bucket_width, a.bucket_height)
            } else {
                (0, 0)
            });
            cols.upscaled.push(ok && a.upscaled);
            cols.flagged.push(ok && a.flagged);
            cols.orientation.push(r.orientation);
            cols.crop.push(if ok { a.crop_fraction } else { 0.0 });
        }
        summarize(&cols).expect("status codes made here are valid")
    }
}

/// The per-row inputs of [`summarize`] (a bucket of (0, 0) where a row has none).
#[derive(Debug, Default)]
pub struct SummaryColumns {
    pub status: Vec<u8>,
    pub bucket: Vec<Size>,
    pub upscaled: Vec<bool>,
    pub flagged: Vec<bool>,
    /// 0 = none.
    pub orientation: Vec<u8>,
    pub crop: Vec<f64>,
}

impl SummaryColumns {
    pub fn with_capacity(n: usize) -> Self {
        SummaryColumns {
            status: Vec::with_capacity(n),
            bucket: Vec::with_capacity(n),
            upscaled: Vec::with_capacity(n),
            flagged: Vec::with_capacity(n),
            orientation: Vec::with_capacity(n),
            crop: Vec::with_capacity(n),
        }
    }
}

/// What `hw bucket` reports about a bucketed manifest.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Summary {
    pub rows: u64,
    pub ok: u64,
    /// Rows per status other than ok, most first (ties in status order).
    pub not_ok: Vec<(Status, u64)>,
    /// Ok rows per bucket, in first-seen order.
    pub buckets: Vec<(Size, u64)>,
    pub upscaled: u64,
    pub flagged: u64,
    /// Ok rows with an EXIF orientation other than 1.
    pub rotated: u64,
    /// Mean crop fraction of the ok rows (0 without any).
    pub mean_crop: f64,
}

/// Count statuses, buckets and the rest over rows (one implementation for both paths).
pub fn summarize(c: &SummaryColumns) -> Result<Summary> {
    let n = c.status.len();
    let same = [
        c.bucket.len(),
        c.upscaled.len(),
        c.flagged.len(),
        c.orientation.len(),
        c.crop.len(),
    ];
    if same.iter().any(|&m| m != n) {
        return Err(crate::error::Error::InvalidInput(
            "summary columns differ in length".into(),
        ));
    }
    let mut by_status = [0u64; Status::ALL.len()];
    let mut buckets: Vec<(Size, u64)> = Vec::new();
    let mut index: HashMap<Size, usize> = HashMap::new();
    let mut s = Summary {
        rows: n as u64,
        ..Default::default()
    };
    let mut crop_sum = 0.0;
    for i in 0..n {
        let code = c.status[i] as usize;
        if code >= by_status.len() {
            return Err(crate::error::Error::InvalidInput(format!(
                "status code {code} is out of range"
            )));
        }
        by_status[code] += 1;
        if code != Status::Ok.code() as usize {
            continue;
        }
        let slot = *index.entry(c.bucket[i]).or_insert_with(|| {
            buckets.push((c.bucket[i], 0));
            buckets.len() - 1
        });
        buckets[slot].1 += 1;
        s.upscaled += u64::from(c.upscaled[i]);
        s.flagged += u64::from(c.flagged[i]);
        s.rotated += u64::from(c.orientation[i] > 1);
        crop_sum += c.crop[i];
    }
    s.ok = by_status[Status::Ok.code() as usize];
    s.mean_crop = if s.ok > 0 {
        crop_sum / s.ok as f64
    } else {
        0.0
    };
    s.buckets = buckets;
    let mut not_ok: Vec<(Status, u64)> = Status::ALL
        .iter()
        .zip(by_status)
        .filter(|(st, k)| **st != Status::Ok && *k > 0)
        .map(|(st, k)| (*st, k))
        .collect();
    not_ok.sort_by_key(|&(st, k)| (std::cmp::Reverse(k), st.code()));
    s.not_ok = not_ok;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(status: Status, w: u32, h: u32, orientation: u8) -> ScanRecord {
        ScanRecord {
            status,
            width: w,
            height: h,
            orientation,
            mtime: 1.0,
            ..Default::default()
        }
    }

    #[test]
    fn assign_keeps_failed_rows_and_explains_rejections() {
        let mut rows = BucketRows::default();
        let paths: Vec<PathBuf> = ["a", "b", "c", "d"].iter().map(PathBuf::from).collect();
        rows.extend(
            &paths,
            vec![
                rec(Status::Ok, 2000, 1000, 6),
                rec(Status::Corrupt, 0, 0, 0),
                rec(Status::Ok, 100, 100, 0),
                rec(Status::TooSmall, 1024, 1024, 1),
            ],
        );
        rows.recs[1].error = Some("bad marker".into());
        let opts = AssignOptions {
            min_side: 256,
            ..Default::default()
        };
        rows.assign(&[(1024, 1024), (1344, 768)], &opts).unwrap();
        let st: Vec<Status> = rows.recs.iter().map(|r| r.status).collect();
        assert_eq!(
            st,
            [Status::Ok, Status::Corrupt, Status::TooSmall, Status::Ok]
        );
        assert_eq!(rows.recs[1].error.as_deref(), Some("bad marker"));
        assert_eq!(
            rows.recs[2].error.as_deref(),
            Some("rejected by bucketing: too_small")
        );
        assert_eq!(rows.recs[3].error, None);
        let s = rows.summary();
        assert_eq!((s.rows, s.ok, s.rotated), (4, 2, 1));
        assert_eq!(s.not_ok, vec![(Status::Corrupt, 1), (Status::TooSmall, 1)]);
        assert_eq!(s.buckets, vec![((1344, 768), 1), ((1024, 1024), 1)]);
    }
}
