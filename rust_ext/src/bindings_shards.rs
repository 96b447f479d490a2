//! PyO3 bindings for reading images where they are stored (tar shards, byte buffers), kept
//! beside `bindings`, which registers them with one call. Same conventions: convert inputs,
//! run with the GIL released in a sized pool, return columns (NumPy for numbers, `status_code`
//! indexing `STATUSES`).

use crate::scan::{ScanOptions, ScanRecord};
use crate::{pool, tar};
use numpy::{IntoPyArray, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::path::PathBuf;

fn detached<T: Send>(py: Python<'_>, threads: usize, f: impl FnOnce() -> T + Send) -> PyResult<T> {
    Ok(py.detach(|| pool::run_in_pool(threads, f))?)
}

/// The columns of a scan (`scan_files`, `scan_ranges`, `scan_buffers`).
pub(crate) fn record_columns<'py>(
    py: Python<'py>,
    recs: &[ScanRecord],
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let codes: Vec<u8> = recs.iter().map(|r| r.status.code()).collect();
    d.set_item("status_code", codes.into_pyarray(py))?;
    let error: Vec<_> = recs.iter().map(|r| r.error.clone()).collect();
    d.set_item("error", error)?;
    let warning: Vec<_> = recs.iter().map(|r| r.warning.clone()).collect();
    d.set_item("warning", warning)?;
    let formats: Vec<_> = recs.iter().map(|r| r.format.map(|f| f.as_str())).collect();
    d.set_item("format", formats)?;
    let u32col = |f: fn(&ScanRecord) -> u32| recs.iter().map(f).collect::<Vec<_>>();
    d.set_item("width", u32col(|r| r.width).into_pyarray(py))?;
    d.set_item("height", u32col(|r| r.height).into_pyarray(py))?;
    let orient: Vec<u8> = recs.iter().map(|r| r.orientation).collect();
    d.set_item("orientation", orient.into_pyarray(py))?;
    let sizes: Vec<u64> = recs.iter().map(|r| r.file_size).collect();
    d.set_item("file_size", sizes.into_pyarray(py))?;
    let mtime: Vec<f64> = recs.iter().map(|r| r.mtime).collect();
    d.set_item("mtime", mtime.into_pyarray(py))?;
    let hashes: Vec<Option<String>> = recs
        .iter()
        .map(|r| r.content_hash.map(|h| format!("{h:032x}")))
        .collect();
    d.set_item("content_hash", hashes)?;
    Ok(d)
}

/// Index a tar shard: (names as bytes, data offsets, sizes, kinds, file length, problem as
/// (status name, message)).
#[pyfunction]
#[allow(clippy::type_complexity)]
fn tar_index<'py>(
    py: Python<'py>,
    path: PathBuf,
) -> PyResult<(
    Vec<Bound<'py, PyBytes>>,
    Bound<'py, numpy::PyArray1<u64>>,
    Bound<'py, numpy::PyArray1<u64>>,
    Vec<&'static str>,
    u64,
    Option<(&'static str, String)>,
)> {
    let idx = py.detach(|| tar::index_tar(&path))?;
    let names = idx
        .members
        .iter()
        .map(|m| PyBytes::new(py, &m.name))
        .collect();
    let offsets: Vec<u64> = idx.members.iter().map(|m| m.offset).collect();
    let sizes: Vec<u64> = idx.members.iter().map(|m| m.size).collect();
    let kinds = idx.members.iter().map(|m| m.kind.as_str()).collect();
    let problem = idx.problem.map(|(s, msg)| (s.name(), msg));
    Ok((
        names,
        offsets.into_pyarray(py),
        sizes.into_pyarray(py),
        kinds,
        idx.file_len,
        problem,
    ))
}

/// Probe byte ranges of files (tar members) in place; the columns of `scan_files`.
#[pyfunction]
#[pyo3(signature = (paths, offsets, sizes, hash=true, max_pixels=None, threads=0))]
#[allow(clippy::too_many_arguments)]
fn scan_ranges<'py>(
    py: Python<'py>,
    paths: Vec<PathBuf>,
    offsets: PyReadonlyArray1<'py, u64>,
    sizes: PyReadonlyArray1<'py, u64>,
    hash: bool,
    max_pixels: Option<u64>,
    threads: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let (o, s) = (offsets.as_slice()?, sizes.as_slice()?);
    if o.len() != paths.len() || s.len() != paths.len() {
        return Err(PyValueError::new_err(
            "paths, offsets and sizes differ in length",
        ));
    }
    let ranges: Vec<tar::Range> = paths
        .into_iter()
        .zip(o.iter().zip(s))
        .map(|(p, (&o, &s))| (p, o, s))
        .collect();
    let max_pixels = max_pixels.unwrap_or(crate::limits::MAX_PIXELS);
    let opts = ScanOptions { hash, max_pixels };
    let recs = detached(py, threads, || tar::scan_ranges(&ranges, &opts))?;
    record_columns(py, &recs)
}

/// Probe in-memory images (bytes objects); the columns of `scan_files` (mtime NaN).
#[pyfunction]
#[pyo3(signature = (buffers, hash=true, max_pixels=None, threads=0))]
fn scan_buffers<'py>(
    py: Python<'py>,
    buffers: Vec<Bound<'py, PyBytes>>,
    hash: bool,
    max_pixels: Option<u64>,
    threads: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let bufs: Vec<&[u8]> = buffers.iter().map(|b| b.as_bytes()).collect();
    let max_pixels = max_pixels.unwrap_or(crate::limits::MAX_PIXELS);
    let opts = ScanOptions { hash, max_pixels };
    let recs = detached(py, threads, || tar::scan_buffers(&bufs, &opts))?;
    record_columns(py, &recs)
}

/// `perceptual_hashes` for in-memory images (bytes objects): the same columns, same order.
#[pyfunction]
#[pyo3(signature = (buffers, fast_min_side=None, threads=0, stats=false))]
fn perceptual_hashes_buffers<'py>(
    py: Python<'py>,
    buffers: Vec<Bound<'py, PyBytes>>,
    fast_min_side: Option<u32>,
    threads: usize,
    stats: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let bufs: Vec<&[u8]> = buffers.iter().map(|b| b.as_bytes()).collect();
    let res = detached(py, threads, || {
        tar::hash_buffers(&bufs, fast_min_side, stats)
    })?;
    crate::bindings::hashed_columns(py, &res, stats)
}

/// Add this module's functions to `pycore._rust`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(tar_index, m)?)?;
    m.add_function(wrap_pyfunction!(scan_ranges, m)?)?;
    m.add_function(wrap_pyfunction!(scan_buffers, m)?)?;
    m.add_function(wrap_pyfunction!(perceptual_hashes_buffers, m)?)?;
    Ok(())
}
