//! The PyO3 bindings: every #[pyfunction] of `pycore._rust`. Each converts its Python inputs
//! to Rust values, runs the plain-Rust work with the GIL released (`detached`), and converts
//! the result back. Numeric columns go out as NumPy arrays.

use crate::bucket::{self, AssignOptions, SmallPolicy};
use crate::error::{Error, Status};
use crate::rows;
use crate::{parquet_out, pool, scan, walk};

mod bucket_rows;
use numpy::{IntoPyArray, PyReadonlyArray1};
use pyo3::exceptions::{PyKeyboardInterrupt, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::collections::HashSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e {
            Error::Io { .. } => PyOSError::new_err(e.to_string()),
            _ => PyValueError::new_err(e.to_string()),
        }
    }
}

/// Release the GIL and run `f` in a pool of `threads` workers (0 = one per core).
fn detached<T: Send>(py: Python<'_>, threads: usize, f: impl FnOnce() -> T + Send) -> PyResult<T> {
    Ok(py.detach(|| pool::run_in_pool(threads, f))?)
}

/// [`detached`] for long runs over many items: `f` gets a cancel flag its workers check between
/// items; meanwhile this thread checks for Python signals (Ctrl-C) every 50 ms and, on one, sets
/// the flag, waits for the workers to return and raises the signal's exception (KeyboardInterrupt).
fn detached_cancellable<T: Send>(
    py: Python<'_>,
    threads: usize,
    f: impl FnOnce(&AtomicBool) -> T + Send,
) -> PyResult<T> {
    let mut raised: Option<PyErr> = None;
    let r = py.detach(|| {
        pool::run_cancellable(threads, f, || {
            Python::attach(|py| py.check_signals())
                .map_err(|e| raised = Some(e))
                .is_err()
        })
    })?;
    r.ok_or_else(|| raised.unwrap_or_else(|| PyKeyboardInterrupt::new_err("interrupted")))
}

/// Files per step of a cancellable scan (the flag is checked between steps).
const SCAN_CHUNK: usize = 512;

/// Walk a directory: (candidate paths, {extension: skipped count}, [(path, problem)]).
#[pyfunction]
#[pyo3(signature = (root, extensions, threads=0))]
#[allow(clippy::type_complexity)]
fn walk_dir(
    py: Python<'_>,
    root: PathBuf,
    extensions: Vec<String>,
    threads: usize,
) -> PyResult<(Vec<OsString>, Vec<(String, u64)>, Vec<(OsString, String)>)> {
    let exts: HashSet<String> = extensions
        .into_iter()
        .map(|e| e.to_ascii_lowercase())
        .collect();
    let r = detached(py, threads, || walk::walk(&root, &exts))??;
    // An OsString becomes a str (surrogate-escaped, lossless), far cheaper than a pathlib.Path.
    let files = r.files.into_iter().map(PathBuf::into_os_string).collect();
    let problems = r
        .problems
        .into_iter()
        .map(|(p, why)| (p.into_os_string(), why))
        .collect();
    Ok((files, r.skipped.into_iter().collect(), problems))
}

/// Probe `paths` in parallel, Ctrl-C-able between chunks.
fn scan_cancellable(
    py: Python<'_>,
    paths: &[PathBuf],
    hash: bool,
    max_pixels: Option<u64>,
    threads: usize,
) -> PyResult<Vec<scan::ScanRecord>> {
    let max_pixels = max_pixels.unwrap_or(crate::limits::MAX_PIXELS);
    let opts = scan::ScanOptions { hash, max_pixels };
    detached_cancellable(py, threads, |cancel| {
        let mut out = Vec::with_capacity(paths.len());
        for part in paths.chunks(SCAN_CHUNK) {
            if cancel.load(Ordering::Relaxed) {
                break;
            }
            out.extend(scan::scan_files(part, &opts));
        }
        out
    })
}

/// Probe files in parallel; returns a dict of columns (lists and NumPy arrays; `status_code`
/// indexes `STATUSES`).
#[pyfunction]
#[pyo3(signature = (paths, hash=true, max_pixels=None, threads=0))]
fn scan_files<'py>(
    py: Python<'py>,
    paths: Vec<PathBuf>,
    hash: bool,
    max_pixels: Option<u64>,
    threads: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let recs = scan_cancellable(py, &paths, hash, max_pixels, threads)?;
    crate::bindings_shards::record_columns(py, &recs)
}

fn assign_options(
    small: &str,
    step: u32,
    min_side: u32,
    max_crop: Option<f64>,
    flag_only: bool,
    seed: Option<u64>,
) -> PyResult<AssignOptions> {
    let small = match small {
        "upscale" => SmallPolicy::Upscale,
        "own" => SmallPolicy::Own,
        "reject" => SmallPolicy::Reject,
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown small-image policy {other:?}"
            )))
        }
    };
    Ok(AssignOptions {
        small,
        step,
        min_side,
        max_crop,
        flag_only,
        random_crop_seed: seed,
    })
}

/// Assign buckets to sizes (with `status_codes`: only rows whose status allows it, see
/// `rows::eligible`). Returns a dict of NumPy columns: `assigned` is false for a 0×0
/// (unknown) size, whose row keeps its status; `status_code` indexes `STATUSES`.
#[pyfunction]
#[pyo3(signature = (table, widths, heights, keys, small="upscale", step=64, min_side=0, max_crop=None, flag_only=false, seed=None, threads=0, status_codes=None))]
#[allow(clippy::too_many_arguments)]
fn assign_buckets<'py>(
    py: Python<'py>,
    table: Vec<(u32, u32)>,
    widths: PyReadonlyArray1<'py, u32>,
    heights: PyReadonlyArray1<'py, u32>,
    keys: PyReadonlyArray1<'py, u64>,
    small: &str,
    step: u32,
    min_side: u32,
    max_crop: Option<f64>,
    flag_only: bool,
    seed: Option<u64>,
    threads: usize,
    status_codes: Option<PyReadonlyArray1<'py, u8>>,
) -> PyResult<Bound<'py, PyDict>> {
    let (w, h, k) = (widths.as_slice()?, heights.as_slice()?, keys.as_slice()?);
    if w.len() != h.len() {
        return Err(PyValueError::new_err("widths and heights differ in length"));
    }
    let codes = status_codes.as_ref().map(|c| c.as_slice()).transpose()?;
    if codes.is_some_and(|c| c.len() != w.len()) {
        return Err(PyValueError::new_err(
            "status codes and sizes differ in length",
        ));
    }
    // With status codes, rows that are not eligible (failed reads) keep their status.
    let sizes: Vec<(u32, u32)> = (0..w.len())
        .map(|i| match codes.map(|c| Status::from_code(c[i])) {
            Some(Some(st)) if !rows::eligible(st, w[i], h[i]) => (0, 0),
            Some(None) => (0, 0),
            _ => (w[i], h[i]),
        })
        .collect();
    let keys = k.to_vec();
    let opts = assign_options(small, step, min_side, max_crop, flag_only, seed)?;
    let out = detached(py, threads, || {
        bucket::assign_all(&table, &sizes, &keys, &opts)
    })??;
    let d = PyDict::new(py);
    macro_rules! col {
        ($name:literal, $f:expr) => {
            d.set_item(
                $name,
                out.iter().map($f).collect::<Vec<_>>().into_pyarray(py),
            )?
        };
    }
    col!("assigned", |a| a.status.is_some());
    col!("status_code", |a| a.status.unwrap_or_default().code());
    col!("flagged", |a| a.flagged);
    col!("bucket_width", |a| a.bucket_width);
    col!("bucket_height", |a| a.bucket_height);
    col!("scale", |a| a.scale);
    col!("scaled_width", |a| a.scaled_width);
    col!("scaled_height", |a| a.scaled_height);
    col!("crop_left", |a| a.crop_left);
    col!("crop_top", |a| a.crop_top);
    col!("crop_fraction", |a| a.crop_fraction);
    col!("upscaled", |a| a.upscaled);
    Ok(d)
}

/// 64-bit keys for seeded random crops: xxh3-64 of each path's bytes.
#[pyfunction]
fn path_keys<'py>(py: Python<'py>, paths: Vec<PathBuf>) -> Bound<'py, numpy::PyArray1<u64>> {
    use std::os::unix::ffi::OsStrExt;
    let keys: Vec<u64> = py.detach(|| {
        paths
            .iter()
            .map(|p| xxhash_rust::xxh3::xxh3_64(p.as_os_str().as_bytes()))
            .collect()
    });
    keys.into_pyarray(py)
}

/// A kohya-style generated bucket table.
#[pyfunction]
fn generate_buckets(
    max_area: u64,
    step: u32,
    min_side: u32,
    max_side: u32,
) -> PyResult<Vec<(u32, u32)>> {
    Ok(bucket::generate(max_area, step, min_side, max_side)?)
}

// ---- hw dedup: perceptual hashes, Hamming search, groups ----

/// (phash, dhash, ok, error kind, error message) of each file; hashes are 0 where not ok.
/// `fast_min_side`: decode JPEGs at reduced DCT scale keeping both sides ≥ this (fast mode).
/// `stats`: also the quality statistics of `quality` from the same decode (NaN / -1 where
/// not ok or, for jpeg_quality, not a JPEG). Ctrl-C stops the workers between files.
#[pyfunction]
#[pyo3(signature = (paths, fast_min_side=None, threads=0, stats=false))]
#[allow(clippy::type_complexity)]
fn perceptual_hashes<'py>(
    py: Python<'py>,
    paths: Vec<PathBuf>,
    fast_min_side: Option<u32>,
    threads: usize,
    stats: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let res = detached_cancellable(py, threads, |cancel| {
        crate::decode::hash_files(&paths, fast_min_side, stats, cancel)
    })?;
    hashed_columns(py, &res, stats)
}

/// The columns of `perceptual_hashes` (and `perceptual_hashes_buffers`) for per-image results.
pub(crate) fn hashed_columns<'py>(
    py: Python<'py>,
    res: &[crate::error::Result<crate::decode::Hashed>],
    stats: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let hashes = |f: fn(&crate::decode::Hashed) -> u64| {
        res.iter()
            .map(|r| r.as_ref().map(f).unwrap_or(0))
            .collect::<Vec<u64>>()
    };
    d.set_item("phash", hashes(|h| h.phash).into_pyarray(py))?;
    d.set_item("dhash", hashes(|h| h.dhash).into_pyarray(py))?;
    d.set_item(
        "ok",
        res.iter()
            .map(|r| r.is_ok())
            .collect::<Vec<_>>()
            .into_pyarray(py),
    )?;
    d.set_item(
        "error_kind",
        res.iter()
            .map(|r| r.as_ref().err().map(|e| e.kind()))
            .collect::<Vec<_>>(),
    )?;
    d.set_item(
        "error",
        res.iter()
            .map(|r| r.as_ref().err().map(|e| e.to_string()))
            .collect::<Vec<_>>(),
    )?;
    if stats {
        let st: Vec<Option<&crate::quality::Stats>> = res
            .iter()
            .map(|r| r.as_ref().ok().and_then(|h| h.stats.as_ref()))
            .collect();
        let col = |f: fn(&crate::quality::Stats) -> f64| {
            st.iter()
                .map(|s| s.map_or(f32::NAN, |s| f(s) as f32))
                .collect::<Vec<f32>>()
                .into_pyarray(py)
        };
        d.set_item("sharpness", col(|s| s.sharpness))?;
        d.set_item("luma_mean", col(|s| s.luma_mean))?;
        d.set_item("luma_std", col(|s| s.luma_std))?;
        d.set_item("clip_low", col(|s| s.clip_low))?;
        d.set_item("clip_high", col(|s| s.clip_high))?;
        d.set_item("colorfulness", col(|s| s.colorfulness))?;
        let gray: Vec<bool> = st.iter().map(|s| s.is_some_and(|s| s.grayscale)).collect();
        d.set_item("grayscale", gray.into_pyarray(py))?;
        let q: Vec<i16> = st
            .iter()
            .map(|s| s.and_then(|s| s.jpeg_quality).map_or(-1, i16::from))
            .collect();
        d.set_item("jpeg_quality", q.into_pyarray(py))?;
    }
    Ok(d)
}

/// (phash, dhash) of an 8-bit luma array (rows × columns), as imagehash computes them.
#[pyfunction]
fn hash_luma(pixels: numpy::PyReadonlyArray2<'_, u8>) -> PyResult<(u64, u64)> {
    let a = pixels.as_array();
    let (h, w) = a.dim();
    if h == 0 || w == 0 {
        return Err(PyValueError::new_err("image has a zero size"));
    }
    let l = crate::phash::Luma::new(w, h, a.iter().copied().collect());
    Ok((crate::phash::phash(&l), crate::phash::dhash(&l)))
}

/// Luma (Pillow's convert("L")) of a JPEG/PNG file, as a 2-D uint8 array; for tests.
#[pyfunction]
#[pyo3(signature = (path, fast_min_side=None))]
fn decode_luma<'py>(
    py: Python<'py>,
    path: PathBuf,
    fast_min_side: Option<u32>,
) -> PyResult<Bound<'py, numpy::PyArray2<u8>>> {
    let l = py.detach(|| crate::decode::decode_file(&path, fast_min_side))?;
    let arr = numpy::ndarray::Array2::from_shape_vec((l.height, l.width), l.data)
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(arr.into_pyarray(py))
}

/// All pairs (i < j) of `hashes` within Hamming distance `threshold`: (i, j, distance)
/// arrays sorted by (i, j). `brute_force` runs the O(n²) reference scan instead of
/// multi-index hashing.
#[pyfunction]
#[pyo3(signature = (hashes, threshold, brute_force=false, threads=0))]
#[allow(clippy::type_complexity)]
fn hamming_pairs<'py>(
    py: Python<'py>,
    hashes: PyReadonlyArray1<'py, u64>,
    threshold: u32,
    brute_force: bool,
    threads: usize,
) -> PyResult<(
    Bound<'py, numpy::PyArray1<u32>>,
    Bound<'py, numpy::PyArray1<u32>>,
    Bound<'py, numpy::PyArray1<u8>>,
)> {
    if threshold > 64 {
        return Err(PyValueError::new_err("threshold must be 0..64"));
    }
    if hashes.len()? > u32::MAX as usize {
        return Err(PyValueError::new_err("too many hashes (more than 2^32)"));
    }
    let h = hashes.as_slice()?.to_vec();
    let pairs = detached(py, threads, || {
        if brute_force {
            crate::mih::brute_force(&h, threshold)
        } else {
            crate::mih::pairs_within(&h, threshold)
        }
    })?;
    let i: Vec<u32> = pairs.iter().map(|p| p.0).collect();
    let j: Vec<u32> = pairs.iter().map(|p| p.1).collect();
    let d: Vec<u8> = pairs.iter().map(|p| p.2).collect();
    Ok((i.into_pyarray(py), j.into_pyarray(py), d.into_pyarray(py)))
}

/// Connected-component labels (0.., numbered by smallest member; -1 for singletons).
#[pyfunction]
fn connected_components<'py>(
    py: Python<'py>,
    n: usize,
    i: PyReadonlyArray1<'py, u32>,
    j: PyReadonlyArray1<'py, u32>,
) -> PyResult<Bound<'py, numpy::PyArray1<i64>>> {
    let (a, b) = (i.as_slice()?, j.as_slice()?);
    if a.len() != b.len() {
        return Err(PyValueError::new_err("edge arrays differ in length"));
    }
    if a.iter().chain(b).any(|&v| v as usize >= n) {
        return Err(PyValueError::new_err("edge refers to a node >= n"));
    }
    let edges: Vec<(u32, u32)> = a.iter().copied().zip(b.iter().copied()).collect();
    let labels = py.detach(|| crate::groups::components(n, &edges));
    Ok(labels.into_pyarray(py))
}

/// Per group label 0..: (largest internal Hamming distance, exact?) as two arrays.
#[pyfunction]
#[pyo3(signature = (hashes, labels, threads=0))]
#[allow(clippy::type_complexity)]
fn group_max_distances<'py>(
    py: Python<'py>,
    hashes: PyReadonlyArray1<'py, u64>,
    labels: PyReadonlyArray1<'py, i64>,
    threads: usize,
) -> PyResult<(
    Bound<'py, numpy::PyArray1<u8>>,
    Bound<'py, numpy::PyArray1<bool>>,
)> {
    let (h, l) = (hashes.as_slice()?.to_vec(), labels.as_slice()?.to_vec());
    if h.len() != l.len() {
        return Err(PyValueError::new_err("hashes and labels differ in length"));
    }
    let r = detached(py, threads, || crate::groups::max_distances(&h, &l))?;
    let d: Vec<u8> = r.iter().map(|x| x.0).collect();
    let e: Vec<bool> = r.iter().map(|x| x.1).collect();
    Ok((d.into_pyarray(py), e.into_pyarray(py)))
}

#[pymodule]
fn _rust(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(walk_dir, m)?)?;
    m.add_function(wrap_pyfunction!(scan_files, m)?)?;
    m.add_function(wrap_pyfunction!(assign_buckets, m)?)?;
    m.add_function(wrap_pyfunction!(path_keys, m)?)?;
    m.add_function(wrap_pyfunction!(bucket_rows::bucket_summary, m)?)?;
    m.add_class::<bucket_rows::PyBucketRows>()?;
    m.add("REJECTED_BY_BUCKETING", rows::REJECTED_BY_BUCKETING)?;
    m.add(
        "MANIFEST_COLUMNS",
        parquet_out::COLUMNS.map(|(n, _)| n).to_vec(),
    )?;
    m.add_function(wrap_pyfunction!(generate_buckets, m)?)?;
    m.add_function(wrap_pyfunction!(perceptual_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(hash_luma, m)?)?;
    m.add_function(wrap_pyfunction!(decode_luma, m)?)?;
    m.add_function(wrap_pyfunction!(hamming_pairs, m)?)?;
    m.add_function(wrap_pyfunction!(connected_components, m)?)?;
    m.add_function(wrap_pyfunction!(group_max_distances, m)?)?;
    crate::bindings_shards::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("STATUSES", Status::ALL.map(Status::name).to_vec())?;
    let bucket_statuses: Vec<&str> = Status::ALL
        .iter()
        .filter(|s| s.is_bucket())
        .map(|s| s.name())
        .collect();
    m.add("BUCKET_STATUSES", bucket_statuses)?;
    m.add("MAX_PIXELS", crate::limits::MAX_PIXELS)?;
    Ok(())
}
