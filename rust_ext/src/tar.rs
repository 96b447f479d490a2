//! WebDataset / img2dataset tar shards read in place: an index of the members (name, byte
//! range) from the 512-byte headers, and header probing + hashing of members by byte range,
//! without extracting anything.
//!
//! Supported: POSIX ustar (with the 155-byte prefix), GNU long names (`L`), pax extended
//! headers (`x`, `path=` and `size=`; global `g` headers are skipped). A shard that ends
//! early or holds a damaged header is not an error of the whole call: the index keeps every
//! member read so far and says where and why it stopped; a member whose data runs past the
//! end of the file is listed with its declared size and scanned as `truncated`.

use crate::error::{Error, IoResultExt, Result, Status};
use crate::scan::{probe_into, ScanOptions, ScanRecord};
use rayon::prelude::*;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

const BLOCK: u64 = 512;
/// Cap on a GNU long name or a pax header we are willing to buffer.
const MAX_META: u64 = 1 << 20;
/// Cap on members indexed in one shard (img2dataset writes 10k samples per shard).
const MAX_MEMBERS: usize = 10_000_000;

/// What a member is, from its type flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberKind {
    File,
    Dir,
    /// Links, devices, FIFOs, ...: listed, never read.
    Other,
}

impl MemberKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            MemberKind::File => "file",
            MemberKind::Dir => "dir",
            MemberKind::Other => "other",
        }
    }
}

/// One member: its name (raw bytes), where its data starts and how long it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: Vec<u8>,
    pub offset: u64,
    pub size: u64,
    pub kind: MemberKind,
}

/// The members of a shard, and why the walk stopped early if it did.
#[derive(Debug, Clone, Default)]
pub struct TarIndex {
    pub members: Vec<Member>,
    pub file_len: u64,
    /// (status, message) when the shard ends early or has a damaged header.
    pub problem: Option<(Status, String)>,
}

/// Parse an octal (or GNU base-256) numeric header field.
fn parse_num(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // base-256: the rest of the first byte and the following bytes, big endian.
        let mut v: u64 = u64::from(field[0] & 0x7F);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let s: Vec<u8> = field
        .iter()
        .copied()
        .take_while(|&b| b != 0)
        .filter(|b| *b != b' ')
        .collect();
    if s.is_empty() {
        return Some(0);
    }
    let text = std::str::from_utf8(&s).ok()?;
    u64::from_str_radix(text, 8).ok()
}

fn cstr(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// The header's checksum is the sum of its bytes with the checksum field read as spaces.
fn checksum_ok(h: &[u8; 512]) -> bool {
    let Some(want) = parse_num(&h[148..156]) else {
        return false;
    };
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(b)
            }
        })
        .sum();
    sum == want
}

/// Read exactly `buf.len()` bytes; Ok(false) at a clean end of file before any byte.
fn read_block<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Records of a pax extended header: (`path`, `size`) when present.
fn parse_pax(data: &[u8]) -> (Option<Vec<u8>>, Option<u64>) {
    let (mut path, mut size) = (None, None);
    let mut rest = data;
    while !rest.is_empty() {
        let Some(sp) = rest.iter().position(|&b| b == b' ') else {
            break;
        };
        let Some(len) = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
        else {
            break;
        };
        if len <= sp + 1 || len > rest.len() {
            break;
        }
        let rec = &rest[sp + 1..len];
        let rec = rec.strip_suffix(b"\n").unwrap_or(rec);
        if let Some(eq) = rec.iter().position(|&b| b == b'=') {
            let (k, v) = (&rec[..eq], &rec[eq + 1..]);
            match k {
                b"path" => path = Some(v.to_vec()),
                b"size" => size = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok()),
                _ => {}
            }
        }
        rest = &rest[len..];
    }
    (path, size)
}

fn padded(size: u64) -> u64 {
    size.div_ceil(BLOCK).saturating_mul(BLOCK)
}

/// Index a tar file. Fails as a whole only when the file cannot be opened or stat'ed.
pub fn index_tar(path: &Path) -> Result<TarIndex> {
    let file = File::open(path).ctx(&format!("cannot open {}", path.display()))?;
    let file_len = file.metadata().ctx("cannot stat shard")?.len();
    let mut r = BufReader::with_capacity(64 * 1024, file);
    let mut idx = TarIndex {
        file_len,
        ..Default::default()
    };
    idx.problem = walk(&mut r, file_len, &mut idx.members)
        .err()
        .map(|e| (e.status(), e.to_string()));
    Ok(idx)
}

fn walk<R: Read + Seek>(r: &mut R, file_len: u64, out: &mut Vec<Member>) -> Result<()> {
    let mut pos: u64 = 0;
    let mut long_name: Option<Vec<u8>> = None;
    let mut pax: (Option<Vec<u8>>, Option<u64>) = (None, None);
    let mut h = [0u8; 512];
    loop {
        if out.len() >= MAX_MEMBERS {
            return Err(Error::Unsupported(format!(
                "more than {MAX_MEMBERS} members in one shard; split it"
            )));
        }
        r.seek(SeekFrom::Start(pos)).ctx("tar shard")?;
        let got = read_block(r, &mut h).ctx("tar shard")?;
        if got == 0 {
            // No end-of-archive blocks: tolerated (many writers omit them).
            return Ok(());
        }
        if got < h.len() {
            return Err(Error::Truncated(format!(
                "shard ends inside a member header at byte {pos}"
            )));
        }
        if h.iter().all(|&b| b == 0) {
            return Ok(()); // end-of-archive marker
        }
        if !checksum_ok(&h) {
            return Err(Error::Corrupt(format!(
                "damaged tar header at byte {pos} (checksum mismatch); members after it are not listed"
            )));
        }
        let Some(mut size) = parse_num(&h[124..136]) else {
            return Err(Error::Corrupt(format!(
                "bad size field in tar header at byte {pos}"
            )));
        };
        let flag = h[156];
        let data = pos + BLOCK;
        match flag {
            b'L' | b'x' | b'g' => {
                if size > MAX_META {
                    return Err(Error::Corrupt(format!(
                        "tar extended header at byte {pos} declares {size} bytes"
                    )));
                }
                if data + size > file_len {
                    return Err(Error::truncated("tar extended header"));
                }
                let mut buf = vec![0u8; size as usize];
                r.seek(SeekFrom::Start(data)).ctx("tar shard")?;
                r.read_exact(&mut buf).ctx("tar extended header")?;
                match flag {
                    b'L' => long_name = Some(cstr(&buf).to_vec()),
                    b'x' => pax = parse_pax(&buf),
                    _ => {}
                }
                pos = data + padded(size);
                continue;
            }
            _ => {}
        }
        let name = header_name(&h, pax.0.take(), long_name.take());
        if let Some(s) = pax.1.take() {
            size = s;
        }
        let kind = match flag {
            b'0' | 0 | b'7' => MemberKind::File,
            b'5' => MemberKind::Dir,
            _ => MemberKind::Other,
        };
        let size = if kind == MemberKind::File { size } else { 0 };
        out.push(Member {
            name,
            offset: data,
            size,
            kind,
        });
        let next = data.saturating_add(padded(size));
        if data.saturating_add(size) > file_len {
            return Err(Error::Truncated(format!(
                "shard ends inside member data at byte {file_len} ({} bytes declared from byte {data})",
                size
            )));
        }
        pos = next;
    }
}

/// A member's name: a pax `path`, else a GNU long name, else the ustar prefix + name fields.
fn header_name(h: &[u8; 512], pax_path: Option<Vec<u8>>, long_name: Option<Vec<u8>>) -> Vec<u8> {
    if let Some(p) = pax_path.or(long_name) {
        return p;
    }
    let base = cstr(&h[0..100]);
    let prefix = if &h[257..262] == b"ustar" {
        cstr(&h[345..500])
    } else {
        &[]
    };
    if prefix.is_empty() {
        base.to_vec()
    } else {
        [prefix, b"/", base].concat()
    }
}

/// A byte range of a reader seen as a whole file: reads and seeks stay inside it.
pub struct Window<R> {
    inner: R,
    start: u64,
    len: u64,
    pos: u64,
}

impl<R: Read + Seek> Window<R> {
    pub fn new(mut inner: R, start: u64, len: u64) -> io::Result<Self> {
        inner.seek(SeekFrom::Start(start))?;
        Ok(Window {
            inner,
            start,
            len,
            pos: 0,
        })
    }
}

impl<R: Read + Seek> Read for Window<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if n == 0 {
            return Ok(0);
        }
        let got = self.inner.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl<R: Read + Seek> Seek for Window<R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        }
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        self.inner.seek(SeekFrom::Start(self.start + target))?;
        self.pos = target;
        Ok(target)
    }
}

/// Probe + hash one image held in a reader of `len` bytes (a member or a byte buffer), as
/// [`crate::scan::scan_file`] does for a file. `mtime` is left NaN.
pub fn scan_reader<R: Read + Seek>(r: &mut R, len: u64, opts: &ScanOptions) -> ScanRecord {
    let mut rec = ScanRecord {
        mtime: f64::NAN,
        file_size: len,
        ..Default::default()
    };
    let res = if len == 0 {
        Err(Error::Io {
            kind: Status::Empty,
            msg: "member is empty (0 bytes)".into(),
        })
    } else {
        probe_into(r, len, opts, &mut rec)
    };
    match res {
        Ok(()) => rec.status = Status::Ok,
        Err(e) => {
            rec.status = e.status();
            rec.error = Some(e.to_string());
        }
    }
    rec
}

/// A byte range of a file to scan: (file, offset, size).
pub type Range = (PathBuf, u64, u64);

/// Scan byte ranges of files (tar members) in parallel, in input order. A range that runs
/// past the end of its file is `truncated` (sizes are still read when the header fits).
pub fn scan_ranges(ranges: &[Range], opts: &ScanOptions) -> Vec<ScanRecord> {
    ranges
        .par_iter()
        .map(|(path, offset, size)| scan_range(path, *offset, *size, opts))
        .collect()
}

fn scan_range(path: &Path, offset: u64, size: u64, opts: &ScanOptions) -> ScanRecord {
    let fail = |e: Error| ScanRecord {
        status: e.status(),
        error: Some(e.to_string()),
        file_size: size,
        mtime: f64::NAN,
        ..Default::default()
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return fail(Error::from_io(&e, "cannot open shard")),
    };
    let file_len = match file.metadata() {
        Ok(m) => m.len(),
        Err(e) => return fail(Error::from_io(&e, "cannot stat shard")),
    };
    let have = file_len.saturating_sub(offset).min(size);
    let reader = BufReader::with_capacity(16 * 1024, file);
    let mut w = match Window::new(reader, offset, have) {
        Ok(w) => w,
        Err(e) => return fail(Error::from_io(&e, "cannot read shard")),
    };
    let mut rec = scan_reader(&mut w, have, opts);
    rec.file_size = size;
    if have < size {
        // The header may have fit; the member is still unusable.
        rec.status = Status::Truncated;
        rec.content_hash = None;
        rec.error = Some(format!(
            "the shard ends inside this member: {have} of {size} bytes present"
        ));
    }
    rec
}

/// Scan in-memory images (Parquet byte cells) in parallel, in input order.
pub fn scan_buffers<B: AsRef<[u8]> + Sync>(bufs: &[B], opts: &ScanOptions) -> Vec<ScanRecord> {
    bufs.par_iter()
        .map(|b| {
            let b = b.as_ref();
            scan_reader(&mut io::Cursor::new(b), b.len() as u64, opts)
        })
        .collect()
}

/// [`crate::decode::hash_bytes`] of in-memory images (JPEG/PNG; others are `unsupported`), in
/// input order, with the quality statistics when `stats`.
pub fn hash_buffers<B: AsRef<[u8]> + Sync>(
    bufs: &[B],
    scale_min_side: Option<u32>,
    stats: bool,
) -> Vec<Result<crate::decode::Hashed>> {
    bufs.par_iter()
        .map(|b| crate::decode::hash_bytes(b.as_ref(), scale_min_side, stats))
        .collect()
}

#[cfg(test)]
#[path = "tar_tests.rs"]
mod tests;
