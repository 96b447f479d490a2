//! The one error type of the Rust core.
//!
//! Every failure carries a [`Status`] (`status()`, name `kind()`) that becomes the manifest's
//! `status` column and a human message that becomes its `error` column. The bindings convert the same type into a
//! Python exception (OSError for files, ValueError for bad input) when a whole call fails.

pub use crate::status::Status;
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system failure (open, read, stat) on one path.
    #[error("{msg}")]
    Io { kind: Status, msg: String },
    /// The bytes are not an image in any format we recognise.
    #[error("{0}")]
    NotImage(String),
    /// The file ends before the header is complete.
    #[error("{0}")]
    Truncated(String),
    /// The header is present but inconsistent (bad marker, zero size, ...).
    #[error("{0}")]
    Corrupt(String),
    /// A format we recognise but cannot read the size of.
    #[error("{0}")]
    Unsupported(String),
    /// The header declares more pixels than the configured limit.
    #[error("{0}")]
    TooLarge(String),
    /// Bad arguments from the caller (a whole call fails, not one row).
    #[error("{0}")]
    InvalidInput(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The status stored in the manifest's `status` column.
    pub fn status(&self) -> Status {
        match self {
            Error::Io { kind, .. } => *kind,
            Error::NotImage(_) => Status::NotImage,
            Error::Truncated(_) => Status::Truncated,
            Error::Corrupt(_) => Status::Corrupt,
            Error::Unsupported(_) => Status::Unsupported,
            Error::TooLarge(_) => Status::TooLarge,
            Error::InvalidInput(_) => Status::InvalidInput,
        }
    }

    /// The status's name.
    pub fn kind(&self) -> &'static str {
        self.status().name()
    }

    pub fn truncated(what: &str) -> Error {
        Error::Truncated(format!("file ends inside the {what}"))
    }

    /// Classify an I/O error met while opening or reading `what`.
    pub fn from_io(err: &io::Error, what: &str) -> Error {
        let kind = match err.kind() {
            io::ErrorKind::PermissionDenied => Status::PermissionDenied,
            io::ErrorKind::NotFound => Status::NotFound,
            io::ErrorKind::UnexpectedEof => {
                return Error::truncated(what);
            }
            _ if err.raw_os_error() == Some(40) => Status::SymlinkLoop, // ELOOP on Linux
            _ if err.raw_os_error() == Some(21) => Status::IsDirectory, // EISDIR
            _ => Status::IoError,
        };
        Error::Io {
            kind,
            msg: format!("{what}: {err}"),
        }
    }
}

/// Reading past the end of a header is the common case of a truncated file; map it once.
pub trait IoResultExt<T> {
    fn ctx(self, what: &str) -> Result<T>;
}

impl<T> IoResultExt<T> for io::Result<T> {
    fn ctx(self, what: &str) -> Result<T> {
        self.map_err(|e| Error::from_io(&e, what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_kinds() {
        let e = io::Error::from(io::ErrorKind::PermissionDenied);
        assert_eq!(Error::from_io(&e, "x").kind(), "permission_denied");
        let e = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert_eq!(Error::from_io(&e, "JPEG header").kind(), "truncated");
        let e = io::Error::from_raw_os_error(40);
        assert_eq!(Error::from_io(&e, "x").kind(), "symlink_loop");
    }
}
