//! Pack-relative paths: the one path type allowed to name a file inside the data dir.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest accepted path, in bytes (Linux `PATH_MAX`).
const MAX_PATH_BYTES: usize = 4096;
/// Longest accepted path component, in bytes (Linux `NAME_MAX`).
const MAX_COMPONENT_BYTES: usize = 255;

/// A normalised path relative to a root: `/`-separated components, none of them empty, `.` or `..`,
/// no leading `/`, no backslash, no NUL or control character. Joining it to a directory can never
/// name anything outside that directory (links aside: packs never contain links, and the apply step
/// refuses to write through one).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelativePath(String);

/// Why a path was refused by [`sanitize_path`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Nothing left once `.` and empty components are dropped.
    #[error("path {0:?} is empty")]
    Empty(String),
    /// Starts at the filesystem root (or a Windows drive / UNC root).
    #[error("path {0:?} is absolute")]
    Absolute(String),
    /// Has a `..` component.
    #[error("path {0:?} contains a '..' component")]
    ParentDir(String),
    /// Has a backslash, NUL or another control character.
    #[error("path {0:?} contains a backslash or a control character")]
    BadCharacter(String),
    /// Longer than Linux accepts.
    #[error("path {0:?} is too long")]
    TooLong(String),
}

impl PathError {
    /// Short static category, used as log field and metric label.
    pub fn category(&self) -> &'static str {
        "unsafe-path"
    }
}

/// Checks an archive or manifest path and normalises it: drops `./` and empty components and a
/// trailing `/`; refuses `..` anywhere, absolute paths, backslashes and control characters.
pub fn sanitize_path(raw: &str) -> Result<RelativePath, PathError> {
    if raw.starts_with('/') {
        return Err(PathError::Absolute(raw.to_owned()));
    }
    if raw.chars().any(|c| c == '\\' || c.is_control()) {
        return Err(PathError::BadCharacter(raw.to_owned()));
    }
    let mut out = String::with_capacity(raw.len());
    for component in raw.split('/') {
        match component {
            "" | "." => continue,
            ".." => return Err(PathError::ParentDir(raw.to_owned())),
            _ => {}
        }
        // A first component like `C:` is a drive root on Windows; refuse it everywhere so a pack
        // means the same thing on every platform.
        if out.is_empty() && component.len() == 2 && component.ends_with(':') {
            return Err(PathError::Absolute(raw.to_owned()));
        }
        if component.len() > MAX_COMPONENT_BYTES {
            return Err(PathError::TooLong(raw.to_owned()));
        }
        if !out.is_empty() {
            out.push('/');
        }
        out.push_str(component);
    }
    if out.is_empty() {
        return Err(PathError::Empty(raw.to_owned()));
    }
    if out.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong(raw.to_owned()));
    }
    Ok(RelativePath(out))
}

/// Whether `raw` names the root itself: `.`, `./` and the like, never empty and never absolute. GNU
/// tar's `-C DIR .` and Python's `shutil.make_archive` write such a first entry for the directory
/// archived; it stands for the destination, which already exists.
pub fn names_root(raw: &str) -> bool {
    !raw.is_empty() && !raw.starts_with('/') && raw.split('/').all(|c| c.is_empty() || c == ".")
}

impl RelativePath {
    /// The normalised path, `/`-separated.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// This path under `root`.
    pub fn under(&self, root: &Path) -> PathBuf {
        root.join(&self.0)
    }

    /// The components, first to last.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The first component.
    pub fn first_component(&self) -> &str {
        self.0.split('/').next().unwrap_or(&self.0)
    }

    /// Every proper ancestor, outermost first (`a`, `a/b` for `a/b/c`).
    pub fn ancestors(&self) -> impl Iterator<Item = &str> {
        self.0.match_indices('/').map(|(i, _)| &self.0[..i])
    }
}

// Hash and Eq are derived from the one `String` field, so they agree with `str`'s.
impl std::borrow::Borrow<str> for RelativePath {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RelativePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for RelativePath {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RelativePath {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        sanitize_path(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn normalises_dots_and_slashes() {
        assert_eq!(sanitize_path("./mods//a.jar").map(|p| p.0), Ok("mods/a.jar".to_owned()));
        assert_eq!(sanitize_path("config/").map(|p| p.0), Ok("config".to_owned()));
        assert_eq!(sanitize_path("a/./b/.").map(|p| p.0), Ok("a/b".to_owned()));
    }

    #[test]
    fn rejects_escapes() {
        for bad in ["../x", "a/../../x", "a/..", "..", "/etc/passwd", "//x", "C:/x", "c:", "a\\..\\x", "a\0b"] {
            assert!(sanitize_path(bad).is_err(), "{bad:?} accepted");
        }
        for empty in ["", ".", "./", "//."] {
            assert!(matches!(sanitize_path(empty), Err(PathError::Empty(_)) | Err(PathError::Absolute(_))));
        }
    }

    #[test]
    fn the_root_is_named_by_dots_only() {
        for root in [".", "./", ".//", "./.", "./././"] {
            assert!(names_root(root), "{root:?} not the root");
            // A root is never a path a file could take.
            assert!(sanitize_path(root).is_err());
        }
        for not_root in ["", "/", "/.", "./..", "..", "./a", "a/.", ".a", "...", "./\\"] {
            assert!(!names_root(not_root), "{not_root:?} taken for the root");
        }
    }

    #[test]
    fn ancestors_outermost_first() {
        let p = sanitize_path("a/b/c").unwrap();
        assert_eq!(p.ancestors().collect::<Vec<_>>(), vec!["a", "a/b"]);
    }

    fn component() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(".".to_owned()),
            Just("..".to_owned()),
            Just(String::new()),
            "[a-zA-Z0-9_.-]{1,8}",
            "[^/]{1,4}",
        ]
    }

    proptest! {
        #[test]
        fn accepted_paths_never_escape(raw in "\\PC{0,40}") {
            if let Ok(p) = sanitize_path(&raw) {
                prop_assert!(!p.0.starts_with('/'));
                prop_assert!(p.components().all(|c| !c.is_empty() && c != "." && c != ".."));
                // Lexically resolved under a root, the path stays under it.
                let root = Path::new("/root/data");
                let joined = p.under(root);
                prop_assert!(joined.starts_with(root));
                prop_assert!(joined.components().count() > root.components().count());
                // Idempotent.
                prop_assert_eq!(sanitize_path(p.as_str()), Ok(p.clone()));
            }
        }

        #[test]
        fn built_paths_normalise_or_reject(parts in proptest::collection::vec(component(), 0..8), lead in any::<bool>()) {
            let raw = format!("{}{}", if lead { "/" } else { "" }, parts.join("/"));
            let result = sanitize_path(&raw);
            let kept: Vec<&String> = parts.iter().filter(|c| !c.is_empty() && c.as_str() != ".").collect();
            if raw.starts_with('/') {
                prop_assert_eq!(result, Err(PathError::Absolute(raw.clone())));
            } else if parts.iter().any(|c| c == "..") {
                // Refused (as `..`, or earlier for a bad character).
                prop_assert!(result.is_err());
            } else if kept.is_empty() {
                prop_assert!(result.is_err());
            } else if let Ok(p) = result {
                let expected: Vec<&str> = kept.iter().map(|s| s.as_str()).collect();
                prop_assert_eq!(p.as_str(), expected.join("/"));
            } else {
                // Only character, drive-letter or length rules may refuse an otherwise clean path.
                prop_assert!(matches!(result, Err(PathError::BadCharacter(_)) | Err(PathError::Absolute(_)) | Err(PathError::TooLong(_))));
            }
        }
    }
}
