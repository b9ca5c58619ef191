//! Diagnostics: every problem found in a policy is reported as `path:line:column: message`
//! (1-based, pointing at the offending key or value), so that editors and CI logs can jump
//! to it. This module owns that format and the byte-offset → line/column conversion.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// How bad a [`Diagnostic`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// The policy cannot be loaded.
    Error,
    /// The policy loads, but probably not as the operator meant.
    Warning,
}

/// One problem in a policy, located at a file, line and column (both 1-based).
///
/// Problems about a whole file or directory (unreadable, no `.toml` files) point at 1:1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    pub severity: Severity,
    pub message: String,
}

impl Diagnostic {
    pub fn error(path: &Path, loc: Loc, message: impl Into<String>) -> Diagnostic {
        Diagnostic::new(path, loc, Severity::Error, message)
    }

    pub fn warning(path: &Path, loc: Loc, message: impl Into<String>) -> Diagnostic {
        Diagnostic::new(path, loc, Severity::Warning, message)
    }

    fn new(path: &Path, loc: Loc, severity: Severity, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            path: path.to_path_buf(),
            line: loc.line,
            column: loc.column,
            severity,
            message: message.into(),
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.path.display(), self.line, self.column)?;
        if self.severity == Severity::Warning {
            f.write_str("warning: ")?;
        }
        f.write_str(&self.message)
    }
}

/// A 1-based position in a policy file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Loc {
    pub line: usize,
    pub column: usize,
}

impl Loc {
    /// The start of a file: where whole-file problems are reported.
    pub const START: Loc = Loc { line: 1, column: 1 };
}

/// Converts byte offsets of one source text into 1-based line and column (in characters).
pub(crate) struct LineIndex<'a> {
    text: &'a str,
    /// Byte offset of the start of every line.
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    pub(crate) fn new(text: &'a str) -> LineIndex<'a> {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineIndex { text, starts }
    }

    pub(crate) fn loc(&self, offset: usize) -> Loc {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        let start = self.starts[line - 1];
        let column = self.text[start..offset].chars().count() + 1;
        Loc { line, column }
    }

    pub(crate) fn span(&self, span: &Range<usize>) -> Loc {
        self.loc(span.start)
    }
}

/// The candidate closest to `word` (by edit distance, at most 2 edits), for "did you mean".
pub(crate) fn closest<'c>(
    word: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Option<&'c str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= 2 && *d < c.chars().count().max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().flat_map(char::to_lowercase).collect();
    let b: Vec<char> = b.chars().flat_map(char::to_lowercase).collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let subst = prev[j] + usize::from(ca != cb);
            cur[j + 1] = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based_characters() {
        let idx = LineIndex::new("ab\nçd = 1\n\nx");
        assert_eq!(idx.loc(0), Loc { line: 1, column: 1 });
        assert_eq!(idx.loc(1), Loc { line: 1, column: 2 });
        assert_eq!(idx.loc(3), Loc { line: 2, column: 1 });
        // "ç" is two bytes, one column.
        assert_eq!(idx.loc(5), Loc { line: 2, column: 2 });
        assert_eq!(idx.loc(12), Loc { line: 4, column: 1 });
        assert_eq!(idx.loc(999), Loc { line: 4, column: 2 });
    }

    #[test]
    fn display_format() {
        let e = Diagnostic::error(Path::new("p.toml"), Loc { line: 3, column: 7 }, "bad");
        assert_eq!(e.to_string(), "p.toml:3:7: bad");
        let w = Diagnostic::warning(Path::new("p.toml"), Loc::START, "hmm");
        assert_eq!(w.to_string(), "p.toml:1:1: warning: hmm");
    }

    #[test]
    fn suggestions() {
        assert_eq!(closest("port", ["ports", "proto", "peer"]), Some("ports"));
        assert_eq!(
            closest("identiy", ["identity", "network"]),
            Some("identity")
        );
        assert_eq!(closest("zzzzzz", ["ports", "proto"]), None);
    }
}
