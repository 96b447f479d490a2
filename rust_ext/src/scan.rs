//! Per-file probing: file metadata, header (format, size, orientation) and content hash.
//!
//! One call never fails as a whole because of one file: every problem becomes a
//! [`ScanRecord`] with a short status kind and a message.

use crate::error::{Error, IoResultExt, Result, Status};
use crate::header::{self, Format};
use rayon::prelude::*;
use std::fs::{self, File};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;
use xxhash_rust::xxh3::Xxh3;

/// Options for a scan.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Hash the whole file's bytes (xxh3-128). Off: only headers are read.
    pub hash: bool,
    /// Headers declaring more pixels than this get status `too_large` (sizes still recorded).
    pub max_pixels: u64,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            hash: true,
            max_pixels: crate::limits::MAX_PIXELS,
        }
    }
}

/// What the scan learned about one file. Sizes are 0 when unknown.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScanRecord {
    pub status: Status,
    pub error: Option<String>,
    pub warning: Option<String>,
    pub format: Option<Format>,
    /// Display size, after EXIF orientation.
    pub width: u32,
    pub height: u32,
    /// Orientation applied (1–8); 0 when the file has none or an invalid one.
    pub orientation: u8,
    pub file_size: u64,
    /// Modification time in seconds since the Unix epoch; NaN when unknown.
    pub mtime: f64,
    pub content_hash: Option<u128>,
}

/// Display size for a stored size and an EXIF orientation: 5–8 swap the axes.
pub fn oriented(width: u32, height: u32, orientation: u8) -> (u32, u32) {
    if (5..=8).contains(&orientation) {
        (height, width)
    } else {
        (width, height)
    }
}

/// Probe one file. Never panics, never returns an error: problems become the status.
pub fn scan_file(path: &Path, opts: &ScanOptions) -> ScanRecord {
    let mut rec = ScanRecord {
        mtime: f64::NAN,
        ..Default::default()
    };
    match scan_into(path, opts, &mut rec) {
        Ok(()) => rec.status = Status::Ok,
        Err(e) => {
            rec.status = e.status();
            rec.error = Some(e.to_string());
        }
    }
    rec
}

fn scan_into(path: &Path, opts: &ScanOptions, rec: &mut ScanRecord) -> Result<()> {
    let meta = link_target_metadata(path)?;
    rec.file_size = meta.len();
    rec.mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
        .unwrap_or(f64::NAN);
    if !meta.is_file() {
        return Err(Error::Io {
            kind: Status::NotAFile,
            msg: "not a regular file".into(),
        });
    }
    if rec.file_size == 0 {
        return Err(Error::Io {
            kind: Status::Empty,
            msg: "file is empty (0 bytes)".into(),
        });
    }
    let file = File::open(path).ctx("cannot open file")?;
    let mut reader = BufReader::with_capacity(16 * 1024, file);
    probe_into(&mut reader, rec.file_size, opts, rec)
}

/// Header (format, oriented size), content hash and pixel limit of one image held in a reader
/// of `len` bytes: a file, a tar member's byte range or an in-memory buffer.
pub fn probe_into<R: Read + Seek>(
    reader: &mut R,
    len: u64,
    opts: &ScanOptions,
    rec: &mut ScanRecord,
) -> Result<()> {
    let info = header::probe(reader, len)?;
    rec.format = Some(info.format);
    let orientation = match info.orientation {
        None => 0,
        Some(v @ 1..=8) => v as u8,
        Some(v) => {
            rec.warning = Some(format!("EXIF orientation {v} is not in 1–8; ignored"));
            0
        }
    };
    rec.orientation = orientation;
    (rec.width, rec.height) = oriented(info.width, info.height, orientation);
    if opts.hash {
        rec.content_hash = Some(hash_reader(reader)?);
    }
    let pixels = u64::from(info.width) * u64::from(info.height);
    if pixels > opts.max_pixels {
        return Err(Error::TooLarge(format!(
            "header declares {}×{} = {pixels} pixels, over the limit of {} (--max-pixels)",
            info.width, info.height, opts.max_pixels
        )));
    }
    Ok(())
}

/// Metadata of what a path points to, telling a broken link and a link loop apart.
fn link_target_metadata(path: &Path) -> Result<fs::Metadata> {
    match fs::metadata(path) {
        Ok(m) => Ok(m),
        Err(e) => {
            let is_link = fs::symlink_metadata(path)
                .map(|m| m.file_type().is_symlink())
                .unwrap_or(false);
            if is_link && e.kind() == std::io::ErrorKind::NotFound {
                let target = fs::read_link(path)
                    .map(|t| t.display().to_string())
                    .unwrap_or_default();
                Err(Error::Io {
                    kind: Status::BrokenSymlink,
                    msg: format!("symlink target does not exist: {target}"),
                })
            } else if is_link && e.raw_os_error() == Some(40) {
                Err(Error::Io {
                    kind: Status::SymlinkLoop,
                    msg: format!("symlink loop: {e}"),
                })
            } else {
                Err(Error::from_io(&e, "cannot stat file"))
            }
        }
    }
}

/// xxh3-128 of a whole file, streamed in 256 KiB blocks from the start.
pub fn hash_reader<R: Read + Seek>(r: &mut R) -> Result<u128> {
    r.seek(SeekFrom::Start(0)).ctx("cannot read file")?;
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::from_io(&e, "cannot read file")),
        };
        h.update(&buf[..n]);
    }
    Ok(h.digest128())
}

/// Probe many files in parallel in the current rayon pool, keeping input order.
pub fn scan_files(paths: &[PathBuf], opts: &ScanOptions) -> Vec<ScanRecord> {
    paths.par_iter().map(|p| scan_file(p, opts)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A minimal valid PNG header (IHDR only): enough for the probe.
    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut v = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
        v.extend_from_slice(&w.to_be_bytes());
        v.extend_from_slice(&h.to_be_bytes());
        v.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
        v
    }

    #[test]
    fn bad_inputs_become_rows() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n);
        fs::write(p("empty.jpg"), b"").unwrap();
        fs::write(p("text.jpg"), b"hello, I am text").unwrap();
        fs::write(p("huge.png"), png(100_000, 100_000)).unwrap();
        fs::write(p("ok.png"), png(30, 20)).unwrap();
        symlink(p("gone.png"), p("broken.png")).unwrap();
        symlink("loop.png", p("loop.png")).unwrap();
        fs::create_dir(p("dir.png")).unwrap();
        let o = ScanOptions::default();
        assert_eq!(scan_file(&p("empty.jpg"), &o).status.name(), "empty");
        assert_eq!(scan_file(&p("text.jpg"), &o).status.name(), "not_image");
        let huge = scan_file(&p("huge.png"), &o);
        assert_eq!((huge.status, huge.width), (Status::TooLarge, 100_000));
        let ok = scan_file(&p("ok.png"), &o);
        assert_eq!(
            (ok.status, ok.width, ok.height, ok.format),
            (Status::Ok, 30, 20, Some(Format::Png))
        );
        assert_eq!(
            ok.content_hash,
            Some(xxhash_rust::xxh3::xxh3_128(&png(30, 20)))
        );
        assert_eq!(
            scan_file(&p("broken.png"), &o).status.name(),
            "broken_symlink"
        );
        assert_eq!(scan_file(&p("loop.png"), &o).status.name(), "symlink_loop");
        assert_eq!(scan_file(&p("dir.png"), &o).status.name(), "not_a_file");
        assert_eq!(scan_file(&p("missing.png"), &o).status.name(), "not_found");
    }

    #[test]
    fn orientation_swaps_axes() {
        assert_eq!(oriented(4, 3, 6), (3, 4));
        assert_eq!(oriented(4, 3, 3), (4, 3));
        assert_eq!(oriented(4, 3, 0), (4, 3));
    }
}
