//! Recursive directory walk that finds candidate image files by extension.
//!
//! Files are candidates when their extension (case-insensitive) is in the caller's set; every
//! other file is counted as skipped by extension, never silently ignored. Symlinked directories
//! are followed once each: a directory reached twice (a link loop, or two links to one place)
//! is reported, not walked again (the first reached, in breadth-first name order, is walked).
//! Entries are sorted by their raw name bytes so the result is
//! deterministic; names are kept as raw bytes (Unix) so non-UTF-8 names survive losslessly.

use crate::error::{Error, Result};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What a walk found.
#[derive(Debug, Default)]
pub struct WalkResult {
    /// Candidate image files (by extension), sorted by path bytes. May include broken links.
    pub files: Vec<PathBuf>,
    /// Files that are not candidates, counted by lower-cased extension ("" for none).
    pub skipped: BTreeMap<String, u64>,
    /// Directories that could not be read or were reached twice, with the reason.
    pub problems: Vec<(PathBuf, String)>,
}

/// Lower-cased extension of a path, as a string ("" when absent or not UTF-8).
pub fn extension_of(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default()
}

/// One directory's entries, read in parallel with its siblings.
#[derive(Default)]
struct DirScan {
    files: Vec<PathBuf>,
    skipped: BTreeMap<String, u64>,
    problems: Vec<(PathBuf, String)>,
    /// Subdirectories (or links to directories) with their (device, inode) identity.
    subdirs: Vec<(PathBuf, (u64, u64))>,
}

fn scan_dir(dir: &Path, extensions: &HashSet<String>) -> DirScan {
    let mut out = DirScan::default();
    let mut entries: Vec<fs::DirEntry> = match fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).collect(),
        Err(e) => {
            out.problems
                .push((dir.to_path_buf(), format!("cannot read directory: {e}")));
            return out;
        }
    };
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let Ok(ft) = entry.file_type() else {
            out.problems
                .push((path, "cannot read entry type".to_string()));
            continue;
        };
        if ft.is_dir() || (ft.is_symlink() && is_dir_target(&path)) {
            match fs::metadata(&path) {
                Ok(m) => out.subdirs.push((path, (m.dev(), m.ino()))),
                Err(e) => out
                    .problems
                    .push((path, format!("cannot read directory: {e}"))),
            }
            continue;
        }
        let ext = extension_of(&path);
        if extensions.contains(&ext) {
            out.files.push(path);
        } else {
            *out.skipped.entry(ext).or_insert(0) += 1;
        }
    }
    out
}

/// Walk `root` recursively, reading the directories of each level in parallel (in the
/// current rayon pool). `root` itself must be a readable directory. The result does not
/// depend on the thread count.
pub fn walk(root: &Path, extensions: &HashSet<String>) -> Result<WalkResult> {
    let meta = fs::metadata(root).map_err(|e| Error::from_io(&e, &root.display().to_string()))?;
    if !meta.is_dir() {
        return Err(Error::InvalidInput(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let mut out = WalkResult::default();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    seen.insert((meta.dev(), meta.ino()));
    let mut level: Vec<PathBuf> = vec![root.to_path_buf()];
    while !level.is_empty() {
        let scans: Vec<DirScan> = level.par_iter().map(|d| scan_dir(d, extensions)).collect();
        let mut next = Vec::new();
        for scan in scans {
            out.files.extend(scan.files);
            out.problems.extend(scan.problems);
            for (ext, n) in scan.skipped {
                *out.skipped.entry(ext).or_insert(0) += n;
            }
            for (sub, id) in scan.subdirs {
                if seen.insert(id) {
                    next.push(sub);
                } else {
                    out.problems.push((
                        sub,
                        "directory already visited (symlink loop or duplicate link); not walked again".into(),
                    ));
                }
            }
        }
        level = next;
    }
    out.files.sort_by(|a, b| a.as_os_str().cmp(b.as_os_str()));
    Ok(out)
}

/// A symlink whose target is a directory (following the whole chain). Broken links and loops
/// are not directories; they stay candidates if their name looks like an image.
fn is_dir_target(path: &Path) -> bool {
    fs::metadata(path).map(|m| m.is_dir()).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn exts() -> HashSet<String> {
        ["jpg", "png"].iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn finds_candidates_and_counts_skipped() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("sub")).unwrap();
        fs::write(d.path().join("b.JPG"), b"x").unwrap();
        fs::write(d.path().join("a.png"), b"x").unwrap();
        fs::write(d.path().join("sub/c.jpg"), b"x").unwrap();
        fs::write(d.path().join("sub/c.txt"), b"x").unwrap();
        fs::write(d.path().join("noext"), b"x").unwrap();
        let r = walk(d.path(), &exts()).unwrap();
        let names: Vec<_> = r
            .files
            .iter()
            .map(|p| p.strip_prefix(d.path()).unwrap().to_path_buf())
            .collect();
        assert_eq!(
            names,
            vec![
                PathBuf::from("a.png"),
                PathBuf::from("b.JPG"),
                PathBuf::from("sub/c.jpg")
            ]
        );
        assert_eq!(r.skipped.get("txt"), Some(&1));
        assert_eq!(r.skipped.get(""), Some(&1));
    }

    #[test]
    fn symlink_loops_terminate_and_are_reported() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("a")).unwrap();
        fs::write(d.path().join("a/x.jpg"), b"x").unwrap();
        symlink(d.path(), d.path().join("a/loop")).unwrap();
        symlink(d.path().join("nowhere.jpg"), d.path().join("broken.jpg")).unwrap();
        symlink("self.jpg", d.path().join("self.jpg")).unwrap();
        let r = walk(d.path(), &exts()).unwrap();
        assert_eq!(r.files.len(), 3, "{:?}", r.files);
        assert_eq!(r.problems.len(), 1);
    }

    #[test]
    fn root_must_be_a_directory() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("f"), b"x").unwrap();
        assert!(walk(&d.path().join("f"), &exts()).is_err());
        assert_eq!(
            walk(&d.path().join("missing"), &exts()).unwrap_err().kind(),
            "not_found"
        );
    }
}
