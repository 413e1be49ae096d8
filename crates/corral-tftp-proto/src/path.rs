//! Request file names to root-relative paths.
//!
//! TFTP has no directories of its own: a file name is whatever the client sends. These rules
//! turn it into a relative path that cannot name anything outside the served root *lexically*
//! (the driver also checks the opened file, which catches symlinks):
//! * a leading `/` (or several) is stripped: PXE clients often ask for `/pxelinux.0`, meaning
//!   the file at the top of the root, and tftp-hpa's `--secure` does the same;
//! * `\` is read as `/`: Windows Deployment Services clients ask for `boot\x64\wdsnbp.com`;
//! * empty and `.` components are dropped;
//! * `..` components are refused outright (never resolved), as are control characters
//!   (NUL cannot appear: it ends the string on the wire).

use crate::error::PathError;

/// Longest file name accepted.
pub const MAX_PATH_LEN: usize = 1024;

/// Turns a requested file name into a relative path with `/` separators and no `.`, `..` or
/// empty components. See the module docs for the rules.
///
/// ```
/// use corral_tftp_proto::path::sanitize;
/// assert_eq!(sanitize("/pxelinux.0").unwrap(), "pxelinux.0");
/// assert_eq!(sanitize("boot\\x64\\wdsnbp.com").unwrap(), "boot/x64/wdsnbp.com");
/// assert!(sanitize("../../etc/passwd").is_err());
/// ```
pub fn sanitize(requested: &str) -> Result<String, PathError> {
    if requested.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong);
    }
    if requested.chars().any(|c| c.is_control()) {
        return Err(PathError::ControlCharacter);
    }
    let mut parts = Vec::new();
    for comp in requested.split(['/', '\\']) {
        match comp {
            "" | "." => {}
            ".." => {
                return Err(PathError::ParentComponent {
                    path: requested.to_owned(),
                });
            }
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Err(PathError::Empty);
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_paths_become_relative() {
        assert_eq!(sanitize("/pxelinux.0").unwrap(), "pxelinux.0");
        assert_eq!(sanitize("//boot//x/./y").unwrap(), "boot/x/y");
        assert_eq!(sanitize("/etc/passwd").unwrap(), "etc/passwd");
    }

    #[test]
    fn parent_components_are_refused() {
        for p in [
            "..",
            "../x",
            "a/../../x",
            "a/..",
            "..\\..\\windows",
            "/../etc/passwd",
        ] {
            assert!(
                matches!(sanitize(p), Err(PathError::ParentComponent { .. })),
                "{p}"
            );
        }
        // Dots inside names are fine.
        assert_eq!(sanitize("a..b/...").unwrap(), "a..b/...");
    }

    #[test]
    fn backslashes_are_separators() {
        assert_eq!(
            sanitize("boot\\x64\\wdsnbp.com").unwrap(),
            "boot/x64/wdsnbp.com"
        );
    }

    #[test]
    fn control_characters_empty_and_long_names() {
        assert_eq!(sanitize("a\nb"), Err(PathError::ControlCharacter));
        assert_eq!(sanitize("a\x7fb"), Err(PathError::ControlCharacter));
        assert_eq!(sanitize(""), Err(PathError::Empty));
        assert_eq!(sanitize("/./"), Err(PathError::Empty));
        assert_eq!(sanitize(&"a".repeat(2000)), Err(PathError::TooLong));
    }
}
