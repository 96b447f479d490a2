//! [`Src`]: the file being probed, seen as a length-aware reader with lazy seeking.
//!
//! * The first [`HEAD_LEN`] bytes are read once up front for signature sniffing; later reads
//!   of that range are served from memory, so parsers can re-read the start without a seek.
//! * `skip`/`seek_to` only move a logical position. The real reader catches up on the next
//!   read: short forward gaps are read through (cheap on a `BufReader`, no syscall), longer
//!   gaps and backward moves use `Seek`.
//! * Every read and move is checked against the file length first, so a length field that
//!   points past the end becomes `Truncated` without touching the reader, and no buffer is
//!   ever sized from the file beyond the cap the caller passes to [`Src::read_vec`].

use crate::error::{Error, IoResultExt, Result};
use std::io::{self, Read, Seek, SeekFrom};

/// Bytes read up front for sniffing; every fixed-size header we parse from it fits.
pub(super) const HEAD_LEN: usize = 64;

/// Forward gaps up to this size are read and discarded instead of seeking.
const READ_THROUGH: u64 = 8 * 1024;

pub(super) struct Src<'a, R> {
    r: &'a mut R,
    /// File length in bytes (trusted, except that a short head lowers it).
    len: u64,
    head: [u8; HEAD_LEN],
    head_len: usize,
    /// Logical position, relative to where the reader was when we started.
    pos: u64,
    /// Where the underlying reader actually is.
    rpos: u64,
    /// Set after a failed read or seek: the reader's position is unknown from then on.
    broken: bool,
}

impl<'a, R: Read + Seek> Src<'a, R> {
    /// Read the head of the file. `len` is the file size as reported by the caller.
    pub(super) fn open(r: &'a mut R, len: u64) -> Result<Self> {
        let mut head = [0u8; HEAD_LEN];
        let want = usize::try_from(len).map_or(HEAD_LEN, |l| l.min(HEAD_LEN));
        let got = read_up_to(r, head.get_mut(..want).unwrap_or_default()).ctx("file header")?;
        // A file shorter than it claimed to be: believe the bytes.
        let len = if got < want { got as u64 } else { len };
        Ok(Src {
            r,
            len,
            head,
            head_len: got,
            pos: 0,
            rpos: got as u64,
            broken: false,
        })
    }

    /// The first bytes of the file (up to [`HEAD_LEN`]).
    pub(super) fn head(&self) -> &[u8] {
        self.head.get(..self.head_len).unwrap_or_default()
    }

    pub(super) fn file_len(&self) -> u64 {
        self.len
    }

    pub(super) fn pos(&self) -> u64 {
        self.pos
    }

    /// Bytes between the position and the end of the file.
    pub(super) fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// Move to absolute offset `abs` (which may be behind us).
    pub(super) fn seek_to(&mut self, abs: u64, what: &str) -> Result<()> {
        if abs > self.len {
            return Err(Error::truncated(what));
        }
        self.pos = abs;
        Ok(())
    }

    /// Move forward by `n` bytes.
    pub(super) fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        let abs = self
            .pos
            .checked_add(n)
            .ok_or_else(|| Error::truncated(what))?;
        self.seek_to(abs, what)
    }

    /// Fill `buf` from the current position.
    pub(super) fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        if (buf.len() as u64) > self.remaining() {
            return Err(Error::truncated(what));
        }
        let from_head = self.copy_from_head(buf);
        let rest = buf.get_mut(from_head..).unwrap_or_default();
        if rest.is_empty() {
            return Ok(());
        }
        self.sync(what)?;
        if let Err(e) = self.r.read_exact(rest) {
            self.broken = true;
            return Err(e).ctx(what);
        }
        self.pos += rest.len() as u64;
        self.rpos = self.pos;
        Ok(())
    }

    /// Read `N` bytes into an array.
    pub(super) fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        self.read_exact(&mut a, what)?;
        Ok(a)
    }

    pub(super) fn u8(&mut self, what: &str) -> Result<u8> {
        let [b] = self.array::<1>(what)?;
        Ok(b)
    }

    pub(super) fn be16(&mut self, what: &str) -> Result<u16> {
        self.array(what).map(u16::from_be_bytes)
    }

    /// Read an `n`-byte payload if it is at most `cap` bytes; a larger one is skipped and
    /// gives `None`. A payload running past the end of the file is `Truncated` either way.
    pub(super) fn read_vec(&mut self, n: u64, cap: usize, what: &str) -> Result<Option<Vec<u8>>> {
        if n > self.remaining() {
            return Err(Error::truncated(what));
        }
        match usize::try_from(n) {
            Ok(size) if size <= cap => {
                let mut v = vec![0u8; size];
                self.read_exact(&mut v, what)?;
                Ok(Some(v))
            }
            _ => self.skip(n, what).map(|()| None),
        }
    }

    /// Copy what we can of `buf` from the cached head; returns the number of bytes copied.
    fn copy_from_head(&mut self, buf: &mut [u8]) -> usize {
        let Ok(start) = usize::try_from(self.pos) else {
            return 0;
        };
        let avail = self.head.get(start..self.head_len).unwrap_or_default();
        let n = avail.len().min(buf.len());
        if let (Some(dst), Some(src)) = (buf.get_mut(..n), avail.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.pos += n as u64;
        n
    }

    /// Bring the underlying reader to the logical position.
    fn sync(&mut self, what: &str) -> Result<()> {
        if self.broken {
            return Err(Error::truncated(what));
        }
        if self.pos == self.rpos {
            return Ok(());
        }
        let moved = if self.pos > self.rpos && self.pos - self.rpos <= READ_THROUGH {
            let gap = self.pos - self.rpos;
            io::copy(&mut self.r.by_ref().take(gap), &mut io::sink()).and_then(|n| {
                if n == gap {
                    Ok(())
                } else {
                    Err(io::Error::from(io::ErrorKind::UnexpectedEof))
                }
            })
        } else {
            let delta = i128::from(self.pos) - i128::from(self.rpos);
            let delta = i64::try_from(delta).map_err(|_| Error::truncated(what))?;
            self.r.seek(SeekFrom::Current(delta)).map(|_| ())
        };
        if let Err(e) = moved {
            self.broken = true;
            return Err(e).ctx(what);
        }
        self.rpos = self.pos;
        Ok(())
    }
}

/// Read until `buf` is full or the reader is exhausted; returns the count read.
fn read_up_to<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while let Some(rest) = buf.get_mut(got..) {
        if rest.is_empty() {
            break;
        }
        match r.read(rest) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn reads_across_head_and_reader() {
        let d = data(20_000);
        let mut c = Cursor::new(d.clone());
        let mut s = Src::open(&mut c, d.len() as u64).unwrap();
        assert_eq!(s.head(), &d[..HEAD_LEN]);
        s.seek_to(60, "x").unwrap();
        let a: [u8; 8] = s.array("x").unwrap();
        assert_eq!(&a, &d[60..68]);
        // Forward read-through, long forward seek, and backward seek.
        s.seek_to(100, "x").unwrap();
        assert_eq!(s.u8("x").unwrap(), d[100]);
        s.seek_to(19_000, "x").unwrap();
        assert_eq!(
            s.be16("x").unwrap(),
            u16::from_be_bytes([d[19_000], d[19_001]])
        );
        s.seek_to(10, "x").unwrap();
        assert_eq!(s.u8("x").unwrap(), d[10]);
        s.seek_to(5_000, "x").unwrap();
        assert_eq!(s.u8("x").unwrap(), d[5_000]);
    }

    #[test]
    fn bounds_are_checked_against_len() {
        let d = data(100);
        let mut c = Cursor::new(d);
        let mut s = Src::open(&mut c, 100).unwrap();
        assert!(matches!(s.skip(101, "x"), Err(Error::Truncated(_))));
        assert!(matches!(s.skip(u64::MAX, "x"), Err(Error::Truncated(_))));
        s.seek_to(98, "x").unwrap();
        assert!(matches!(s.array::<4>("x"), Err(Error::Truncated(_))));
        s.seek_to(0, "x").unwrap();
        assert!(matches!(
            s.read_vec(1 << 40, 16, "x"),
            Err(Error::Truncated(_))
        ));
        assert_eq!(s.read_vec(50, 16, "x").unwrap(), None);
        assert_eq!(s.pos(), 50);
        assert_eq!(s.read_vec(4, 16, "x").unwrap(), Some(vec![50, 51, 52, 53]));
    }

    #[test]
    fn short_file_lowers_len() {
        let mut c = Cursor::new(vec![1u8, 2, 3]);
        let s = Src::open(&mut c, 1000).unwrap();
        assert_eq!(s.file_len(), 3);
        assert_eq!(s.head(), &[1, 2, 3]);
    }

    #[test]
    fn file_shorter_than_len_past_head_is_truncated() {
        let d = data(200);
        let mut c = Cursor::new(d);
        let mut s = Src::open(&mut c, 10_000).unwrap();
        s.seek_to(5_000, "x").unwrap();
        assert!(matches!(s.u8("x"), Err(Error::Truncated(_))));
    }
}
