//! Bindings of a folder's rows kept in Rust (`rows`, `parquet_out`): `BucketRows` and
//! `bucket_summary`. Part of `bindings`, the only module that knows PyO3.

use super::{assign_options, detached, scan_cancellable};
use crate::parquet_out;
use crate::rows::{self, BucketRows, Summary, SummaryColumns};
use numpy::PyReadonlyArray1;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;

/// A bucketed manifest's counts (see `rows::summarize`) as a dict.
fn summary_dict<'py>(py: Python<'py>, s: &Summary) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("rows", s.rows)?;
    d.set_item("ok", s.ok)?;
    let not_ok: Vec<(&str, u64)> = s.not_ok.iter().map(|(st, k)| (st.name(), *k)).collect();
    d.set_item("not_ok", not_ok)?;
    d.set_item("buckets", s.buckets.clone())?;
    d.set_item("upscaled", s.upscaled)?;
    d.set_item("flagged", s.flagged)?;
    d.set_item("rotated", s.rotated)?;
    d.set_item("mean_crop", s.mean_crop)?;
    Ok(d)
}

/// Counts of a bucketed manifest from its columns (bucket (0, 0), orientation 0 and crop 0
/// where a row has none).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub(super) fn bucket_summary<'py>(
    py: Python<'py>,
    status_codes: PyReadonlyArray1<'py, u8>,
    bucket_widths: PyReadonlyArray1<'py, u32>,
    bucket_heights: PyReadonlyArray1<'py, u32>,
    upscaled: PyReadonlyArray1<'py, bool>,
    flagged: PyReadonlyArray1<'py, bool>,
    orientation: PyReadonlyArray1<'py, u8>,
    crop_fraction: PyReadonlyArray1<'py, f64>,
) -> PyResult<Bound<'py, PyDict>> {
    let (bw, bh) = (bucket_widths.as_slice()?, bucket_heights.as_slice()?);
    if bw.len() != bh.len() {
        return Err(PyValueError::new_err(
            "bucket widths and heights differ in length",
        ));
    }
    let cols = SummaryColumns {
        status: status_codes.as_slice()?.to_vec(),
        bucket: bw.iter().copied().zip(bh.iter().copied()).collect(),
        upscaled: upscaled.as_slice()?.to_vec(),
        flagged: flagged.as_slice()?.to_vec(),
        orientation: orientation.as_slice()?.to_vec(),
        crop: crop_fraction.as_slice()?.to_vec(),
    };
    summary_dict(py, &rows::summarize(&cols)?)
}

/// A folder's manifest rows held in Rust from the scan to the Parquet file (`hw bucket DIR`
/// without a dataframe library): `scan` chunks of paths, `assign` buckets, `summary`, `write`.
#[pyclass(name = "BucketRows", module = "pycore._rust")]
#[derive(Default)]
pub(super) struct PyBucketRows {
    inner: BucketRows,
}

#[pymethods]
impl PyBucketRows {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// Probe `paths` and append their rows (in order).
    #[pyo3(signature = (paths, hash=true, max_pixels=None, threads=0))]
    fn scan(
        &mut self,
        py: Python<'_>,
        paths: Vec<PathBuf>,
        hash: bool,
        max_pixels: Option<u64>,
        threads: usize,
    ) -> PyResult<()> {
        let recs = scan_cancellable(py, &paths, hash, max_pixels, threads)?;
        self.inner.extend(&paths, recs);
        Ok(())
    }

    /// Bucket every eligible row (see `assign_buckets` for the options).
    #[pyo3(signature = (table, small="upscale", step=64, min_side=0, max_crop=None, flag_only=false, seed=None, threads=0))]
    #[allow(clippy::too_many_arguments)]
    fn assign(
        &mut self,
        py: Python<'_>,
        table: Vec<(u32, u32)>,
        small: &str,
        step: u32,
        min_side: u32,
        max_crop: Option<f64>,
        flag_only: bool,
        seed: Option<u64>,
        threads: usize,
    ) -> PyResult<()> {
        let opts = assign_options(small, step, min_side, max_crop, flag_only, seed)?;
        let inner = &mut self.inner;
        detached(py, threads, || inner.assign(&table, &opts))??;
        Ok(())
    }

    fn summary<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        summary_dict(py, &self.inner.summary())
    }

    /// Write the bucketed rows as a manifest Parquet file with these footer key/value pairs.
    fn write(
        &self,
        py: Python<'_>,
        path: PathBuf,
        metadata: Vec<(String, String)>,
    ) -> PyResult<()> {
        let inner = &self.inner;
        py.detach(|| parquet_out::write_rows(&path, inner, &metadata))?;
        Ok(())
    }
}
