//! The one vocabulary of image statuses (the manifest's `status` column).
//!
//! Rust produces them (scan, bucket assignment, decode); Python reads the names once from
//! `pycore._rust.STATUSES`, which lists them in code order, so a `status_code` column that
//! crosses the boundary as a NumPy array indexes that list. A name that is not in the
//! vocabulary is an error ([`Status::from_name`]), never a silent default.

/// An image's status. The discriminant is the code exported to Python; never reorder, only
/// append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum Status {
    /// Usable.
    #[default]
    Ok = 0,
    // From reading the file.
    /// The file is 0 bytes.
    Empty,
    /// The file ends inside the header.
    Truncated,
    /// The bytes are not an image in any format we recognise.
    NotImage,
    /// The header is present but inconsistent.
    Corrupt,
    /// A format we recognise but cannot read the size of.
    Unsupported,
    /// The header declares more pixels than the limit.
    TooLarge,
    PermissionDenied,
    NotFound,
    BrokenSymlink,
    SymlinkLoop,
    IsDirectory,
    /// A FIFO, socket or device with an image name.
    NotAFile,
    IoError,
    /// Bad arguments from the caller (a whole call fails; never a row of a scan).
    InvalidInput,
    // From bucketing (re-evaluated when a manifest is bucketed again).
    /// Shorter side below `--min-side`.
    TooSmall,
    /// Would need upscaling and the policy rejects that.
    NeedsUpscale,
    /// The crop would cut away more than `--max-crop`.
    CropTooLarge,
    // From hw dedup.
    /// The header was read but the pixels could not be decoded.
    DecodeError,
    /// Moved away as a duplicate by `hw dedup --apply move:DIR`.
    DuplicateMoved,
}

impl Status {
    /// Every status in code order.
    pub const ALL: [Status; 20] = [
        Status::Ok,
        Status::Empty,
        Status::Truncated,
        Status::NotImage,
        Status::Corrupt,
        Status::Unsupported,
        Status::TooLarge,
        Status::PermissionDenied,
        Status::NotFound,
        Status::BrokenSymlink,
        Status::SymlinkLoop,
        Status::IsDirectory,
        Status::NotAFile,
        Status::IoError,
        Status::InvalidInput,
        Status::TooSmall,
        Status::NeedsUpscale,
        Status::CropTooLarge,
        Status::DecodeError,
        Status::DuplicateMoved,
    ];

    /// The name stored in the manifest.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Empty => "empty",
            Status::Truncated => "truncated",
            Status::NotImage => "not_image",
            Status::Corrupt => "corrupt",
            Status::Unsupported => "unsupported",
            Status::TooLarge => "too_large",
            Status::PermissionDenied => "permission_denied",
            Status::NotFound => "not_found",
            Status::BrokenSymlink => "broken_symlink",
            Status::SymlinkLoop => "symlink_loop",
            Status::IsDirectory => "is_directory",
            Status::NotAFile => "not_a_file",
            Status::IoError => "io_error",
            Status::InvalidInput => "invalid_input",
            Status::TooSmall => "too_small",
            Status::NeedsUpscale => "needs_upscale",
            Status::CropTooLarge => "crop_too_large",
            Status::DecodeError => "decode_error",
            Status::DuplicateMoved => "duplicate_moved",
        }
    }

    /// The code exported to Python (index into `STATUSES`).
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The status of a name; an unknown name is an error listing the known ones.
    /// The status of a code (`None` past the last one).
    pub fn from_code(code: u8) -> Option<Status> {
        Status::ALL.get(usize::from(code)).copied()
    }

    pub fn from_name(name: &str) -> crate::error::Result<Status> {
        Status::ALL
            .iter()
            .copied()
            .find(|s| s.name() == name)
            .ok_or_else(|| {
                crate::error::Error::InvalidInput(format!(
                    "unknown image status {name:?} (known: {})",
                    Status::ALL.map(Status::name).join(", ")
                ))
            })
    }

    /// Set by bucket assignment (and so re-evaluated when a manifest is bucketed again).
    pub const fn is_bucket(self) -> bool {
        matches!(
            self,
            Status::TooSmall | Status::NeedsUpscale | Status::CropTooLarge
        )
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_positions_and_names_round_trip() {
        for (i, s) in Status::ALL.iter().enumerate() {
            assert_eq!(usize::from(s.code()), i);
            assert_eq!(Status::from_name(s.name()).unwrap(), *s);
        }
        let names: std::collections::HashSet<_> = Status::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(names.len(), Status::ALL.len());
    }

    #[test]
    fn unknown_name_is_an_error() {
        let e = Status::from_name("okay").unwrap_err();
        assert!(
            e.to_string().contains("unknown image status \"okay\""),
            "{e}"
        );
        assert_eq!(Status::default(), Status::Ok);
    }
}
