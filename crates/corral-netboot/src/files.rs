//! Serving files from beneath a root: path confinement and HTTP byte ranges (RFC 9110 §14).
//!
//! Written here rather than taken from `tower-http`'s `ServeDir` because ServeDir follows
//! symlinks out of its root; corral must never hand out a file outside the served root.

use std::path::{Component, Path, PathBuf};

/// Why a requested path is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathRefused {
    /// `..`, `.`, an empty segment, a backslash or a NUL, or an absolute path.
    #[error("path {0:?} is not a plain relative path")]
    NotPlain(String),
    /// The path resolves (through a symlink) outside the root.
    #[error("path {0:?} leads outside the served root")]
    Escapes(String),
    /// No such file (or not a regular file).
    #[error("no file {0:?}")]
    NotFound(String),
}

/// Checks `rel` (already percent-decoded) is a plain relative path: segments that are not
/// empty, `.` or `..`, no backslash, no NUL. Pure.
pub fn plain_relative(rel: &str) -> Result<PathBuf, PathRefused> {
    let bad = || PathRefused::NotPlain(rel.to_owned());
    if rel.is_empty() || rel.contains('\0') || rel.contains('\\') || rel.starts_with('/') {
        return Err(bad());
    }
    for seg in rel.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Err(bad());
        }
    }
    let p = PathBuf::from(rel);
    if !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad());
    }
    Ok(p)
}

/// Resolves `rel` beneath `root`: a plain relative path whose canonical form (symlinks
/// resolved) stays inside the canonical root and is a regular file.
pub fn resolve_beneath(root: &Path, rel: &str) -> Result<PathBuf, PathRefused> {
    let p = plain_relative(rel)?;
    let root = root
        .canonicalize()
        .map_err(|_| PathRefused::NotFound(rel.to_owned()))?;
    let full = root
        .join(p)
        .canonicalize()
        .map_err(|_| PathRefused::NotFound(rel.to_owned()))?;
    if !full.starts_with(&root) {
        return Err(PathRefused::Escapes(rel.to_owned()));
    }
    match full.metadata() {
        Ok(m) if m.is_file() => Ok(full),
        _ => Err(PathRefused::NotFound(rel.to_owned())),
    }
}

/// A byte range to send, inclusive start, exclusive end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// What a `Range` header asks of a file of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No (usable) range: send the whole file, 200.
    Full,
    /// One satisfiable range: 206.
    Partial(ByteRange),
    /// Not satisfiable: 416 with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// Parses a `Range` header value for a file of `len` bytes. Only single `bytes=` ranges are
/// honoured; several ranges or another unit fall back to the whole file (RFC 9110 §14.2
/// lets a server ignore Range). Pure; never panics on any input.
pub fn parse_range(header: &str, len: u64) -> RangeAnswer {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let num = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (a.trim().is_empty(), num(a), num(b)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(n)) => {
            if n == 0 || len == 0 {
                RangeAnswer::Unsatisfiable
            } else {
                RangeAnswer::Partial(ByteRange {
                    start: len.saturating_sub(n),
                    end: len,
                })
            }
        }
        (false, Some(start), end) if b.trim().is_empty() || end.is_some() => {
            if start >= len {
                return RangeAnswer::Unsatisfiable;
            }
            let end = match end {
                Some(e) if e < start => return RangeAnswer::Full,
                Some(e) => e.saturating_add(1).min(len),
                None => len,
            };
            RangeAnswer::Partial(ByteRange { start, end })
        }
        _ => RangeAnswer::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_paths() {
        assert!(plain_relative("a/b.bin").is_ok());
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a/.",
            "a\\..\\b",
            "a\0b",
        ] {
            assert!(plain_relative(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn symlink_out_of_root_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        fs_err::create_dir_all(root.join("sub")).unwrap();
        fs_err::write(d.path().join("secret"), b"x").unwrap();
        fs_err::write(root.join("sub/ok"), b"y").unwrap();
        std::os::unix::fs::symlink(d.path().join("secret"), root.join("out")).unwrap();
        std::os::unix::fs::symlink("sub/ok", root.join("in")).unwrap();
        assert_eq!(
            resolve_beneath(&root, "out"),
            Err(PathRefused::Escapes("out".into()))
        );
        assert!(resolve_beneath(&root, "in").is_ok());
        assert!(resolve_beneath(&root, "sub/ok").is_ok());
        assert!(matches!(
            resolve_beneath(&root, "sub"),
            Err(PathRefused::NotFound(_))
        ));
    }

    #[test]
    fn ranges_rfc9110_14_1_2() {
        let p = |s, e| RangeAnswer::Partial(ByteRange { start: s, end: e });
        assert_eq!(parse_range("bytes=0-9", 100), p(0, 10));
        assert_eq!(parse_range("bytes=90-", 100), p(90, 100));
        assert_eq!(parse_range("bytes=-10", 100), p(90, 100));
        assert_eq!(parse_range("bytes=-1000", 100), p(0, 100));
        assert_eq!(parse_range("bytes=50-1000", 100), p(50, 100));
        assert_eq!(parse_range("bytes=100-", 100), RangeAnswer::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), RangeAnswer::Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 100), RangeAnswer::Full);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), RangeAnswer::Full);
        assert_eq!(parse_range("items=0-1", 100), RangeAnswer::Full);
        assert_eq!(parse_range("bytes=+1-2", 100), RangeAnswer::Full);
    }

    proptest! {
        #[test]
        fn range_parser_never_panics(s in ".{0,40}", len in 0u64..10_000) {
            if let RangeAnswer::Partial(r) = parse_range(&s, len) {
                prop_assert!(r.start < r.end && r.end <= len);
            }
        }
        #[test]
        fn plain_relative_never_escapes(s in "[a-z./\\\\%]{0,20}") {
            if let Ok(p) = plain_relative(&s) {
                prop_assert!(p.components().all(|c| matches!(c, Component::Normal(_))));
            }
        }
    }
}
