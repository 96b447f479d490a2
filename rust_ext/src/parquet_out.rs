//! Writing a folder's bucketed rows as a manifest Parquet file, without a dataframe library.
//!
//! The columns, their order and types are the manifest's (pycore/manifest.py `COLUMNS`, checked
//! against [`COLUMNS`] by tests/test_bucket_fast.py) and every value follows the rules of the
//! Python path it replaces: unknown values are nulls, bucket columns are set only on ok rows,
//! `path` is the UTF-8 text of the path (invalid bytes as U+FFFD) and `path_bytes` its exact
//! bytes when they are not UTF-8. tests/test_bucket_fast.py reads files written both ways back
//! with Polars and compares frames and metadata.

use crate::error::{Error, Result, Status};
use crate::rows::BucketRows;
use parquet::basic::{Compression, Encoding};
use parquet::data_type::{
    BoolType, ByteArray, ByteArrayType, DataType, DoubleType, Int32Type, Int64Type,
};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::{SerializedColumnWriter, SerializedFileWriter};
use parquet::schema::parser::parse_message_type;
use parquet::schema::types::ColumnPath;
use std::fs::File;
use std::io::BufWriter;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

/// Rows per row group (Polars writes groups of this order too).
const ROW_GROUP: usize = 131_072;

/// The manifest columns a folder's bucketed rows have, with their Parquet types.
pub const COLUMNS: [(&str, &str); 22] = [
    ("path", "BYTE_ARRAY path (STRING)"),
    ("path_bytes", "BYTE_ARRAY path_bytes"),
    ("status", "BYTE_ARRAY status (STRING)"),
    ("error", "BYTE_ARRAY error (STRING)"),
    ("warning", "BYTE_ARRAY warning (STRING)"),
    ("format", "BYTE_ARRAY format (STRING)"),
    ("width", "INT32 width"),
    ("height", "INT32 height"),
    ("orientation", "INT32 orientation (INTEGER(8,false))"),
    ("file_size", "INT64 file_size"),
    ("mtime", "DOUBLE mtime"),
    ("content_hash", "BYTE_ARRAY content_hash (STRING)"),
    ("bucket_width", "INT32 bucket_width"),
    ("bucket_height", "INT32 bucket_height"),
    ("scale", "DOUBLE scale"),
    ("scaled_width", "INT32 scaled_width"),
    ("scaled_height", "INT32 scaled_height"),
    ("crop_left", "INT32 crop_left"),
    ("crop_top", "INT32 crop_top"),
    ("crop_fraction", "DOUBLE crop_fraction"),
    ("upscaled", "BOOLEAN upscaled"),
    ("crop_flagged", "BOOLEAN crop_flagged"),
];

fn perr(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        kind: Status::IoError,
        msg: format!("cannot write {}: {e}", path.display()),
    }
}

/// Write `rows` (after `assign`) to `path` with `metadata` as the footer's key/value pairs.
pub fn write_rows(path: &Path, rows: &BucketRows, metadata: &[(String, String)]) -> Result<()> {
    if rows.assigned.len() != rows.len() {
        return Err(Error::InvalidInput(
            "rows must be bucketed before they are written".into(),
        ));
    }
    let fields: Vec<String> = COLUMNS
        .iter()
        .map(|(_, t)| format!("OPTIONAL {t};"))
        .collect();
    let schema = parse_message_type(&format!("message schema {{ {} }}", fields.join(" ")))
        .map_err(|e| Error::InvalidInput(format!("manifest schema: {e}")))?;
    let kv = metadata
        .iter()
        .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
        .collect();
    // Sorted paths share long prefixes: delta strings store each once (Polars uses zstd instead).
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_column_dictionary_enabled(ColumnPath::from("path"), false)
        .set_column_encoding(ColumnPath::from("path"), Encoding::DELTA_BYTE_ARRAY)
        .set_key_value_metadata(Some(kv))
        .set_created_by(format!("hw {}", env!("CARGO_PKG_VERSION")))
        .build();
    let file = File::create(path).map_err(|e| perr(path, e))?;
    let mut w = SerializedFileWriter::new(BufWriter::new(file), Arc::new(schema), Arc::new(props))
        .map_err(|e| perr(path, e))?;
    let mut start = 0;
    while start < rows.len() || start == 0 {
        let end = (start + ROW_GROUP).min(rows.len());
        let mut rg = w.next_row_group().map_err(|e| perr(path, e))?;
        let mut i = 0;
        while let Some(mut col) = rg.next_column().map_err(|e| perr(path, e))? {
            write_column(&mut col, COLUMNS[i].0, rows, start..end).map_err(|e| perr(path, e))?;
            col.close().map_err(|e| perr(path, e))?;
            i += 1;
        }
        rg.close().map_err(|e| perr(path, e))?;
        start = end;
        if end == rows.len() {
            break;
        }
    }
    // Flushed here; the caller (pycore.io.atomic_path) syncs and renames the file.
    w.into_inner()
        .map_err(|e| perr(path, e))?
        .into_inner()
        .map_err(|e| perr(path, e.error()))?;
    Ok(())
}

/// Values and definition levels (1 = set, 0 = null) of one optional column.
fn put<T: DataType>(
    col: &mut SerializedColumnWriter<'_>,
    vals: impl Iterator<Item = Option<T::T>>,
) -> parquet::errors::Result<()> {
    let (mut values, mut defs) = (Vec::new(), Vec::new());
    for v in vals {
        defs.push(i16::from(v.is_some()));
        values.extend(v);
    }
    col.typed::<T>().write_batch(&values, Some(&defs), None)?;
    Ok(())
}

fn text(s: &str) -> ByteArray {
    ByteArray::from(s.as_bytes().to_vec())
}

fn write_column(
    col: &mut SerializedColumnWriter<'_>,
    name: &str,
    rows: &BucketRows,
    range: std::ops::Range<usize>,
) -> parquet::errors::Result<()> {
    let recs = &rows.recs[range.clone()];
    let idx = range.clone();
    // Bucket columns are set on ok rows only.
    let ok = |i: usize| rows.is_bucketed(i).then(|| rows.assigned[i]);
    let int = |v: u32| i32::try_from(v).ok();
    match name {
        "path" => put::<ByteArrayType>(
            col,
            rows.paths[range]
                .iter()
                .map(|p| Some(text(&String::from_utf8_lossy(p.as_os_str().as_bytes())))),
        ),
        "path_bytes" => put::<ByteArrayType>(
            col,
            rows.paths[range].iter().map(|p| {
                let b = p.as_os_str().as_bytes();
                std::str::from_utf8(b)
                    .is_err()
                    .then(|| ByteArray::from(b.to_vec()))
            }),
        ),
        "status" => put::<ByteArrayType>(col, recs.iter().map(|r| Some(text(r.status.name())))),
        "error" => put::<ByteArrayType>(col, recs.iter().map(|r| r.error.as_deref().map(text))),
        "warning" => put::<ByteArrayType>(col, recs.iter().map(|r| r.warning.as_deref().map(text))),
        "format" => {
            put::<ByteArrayType>(col, recs.iter().map(|r| r.format.map(|f| text(f.as_str()))))
        }
        // A size is known when the width is (the height comes with it).
        "width" => put::<Int32Type>(
            col,
            recs.iter()
                .map(|r| (r.width > 0).then_some(r.width).and_then(int)),
        ),
        "height" => put::<Int32Type>(
            col,
            recs.iter()
                .map(|r| (r.width > 0).then_some(r.height).and_then(int)),
        ),
        "orientation" => put::<Int32Type>(
            col,
            recs.iter()
                .map(|r| (r.orientation > 0).then_some(i32::from(r.orientation))),
        ),
        "file_size" => put::<Int64Type>(
            col,
            recs.iter().map(|r| match (r.file_size, r.status) {
                (0, Status::Empty) => Some(0),
                (0, _) => None,
                (n, _) => i64::try_from(n).ok(),
            }),
        ),
        "mtime" => put::<DoubleType>(
            col,
            recs.iter().map(|r| (!r.mtime.is_nan()).then_some(r.mtime)),
        ),
        "content_hash" => put::<ByteArrayType>(
            col,
            recs.iter()
                .map(|r| r.content_hash.map(|h| text(&format!("{h:032x}")))),
        ),
        "bucket_width" => {
            put::<Int32Type>(col, idx.map(|i| ok(i).and_then(|a| int(a.bucket_width))))
        }
        "bucket_height" => {
            put::<Int32Type>(col, idx.map(|i| ok(i).and_then(|a| int(a.bucket_height))))
        }
        "scale" => put::<DoubleType>(col, idx.map(|i| ok(i).map(|a| a.scale))),
        "scaled_width" => {
            put::<Int32Type>(col, idx.map(|i| ok(i).and_then(|a| int(a.scaled_width))))
        }
        "scaled_height" => {
            put::<Int32Type>(col, idx.map(|i| ok(i).and_then(|a| int(a.scaled_height))))
        }
        "crop_left" => put::<Int32Type>(col, idx.map(|i| ok(i).and_then(|a| int(a.crop_left)))),
        "crop_top" => put::<Int32Type>(col, idx.map(|i| ok(i).and_then(|a| int(a.crop_top)))),
        "crop_fraction" => put::<DoubleType>(col, idx.map(|i| ok(i).map(|a| a.crop_fraction))),
        "upscaled" => put::<BoolType>(col, idx.map(|i| ok(i).map(|a| a.upscaled))),
        "crop_flagged" => put::<BoolType>(col, idx.map(|i| ok(i).map(|a| a.flagged))),
        other => Err(parquet::errors::ParquetError::General(format!(
            "no column {other}"
        ))),
    }
}
