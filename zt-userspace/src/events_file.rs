//! `--events-file PATH`: every decision event as one JSON line (the same object as
//! `--log-format json` prints), in a file rotated by size for a log shipper (Vector, Fluent
//! Bit, Filebeat) to tail. Rotation keeps `PATH.1` (newest) … `PATH.N`; a line is never
//! split across files, and a file never grows past the limit unless one line alone does.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
};

use file_rotate::{compression::Compression, suffix::AppendCount, ContentLimit, FileRotate};

/// Default size limit of the events file before it is rotated.
pub const DEFAULT_MAX_BYTES: u64 = 100 * 1024 * 1024;
/// Default number of rotated files kept besides the live one.
pub const DEFAULT_KEEP: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum EventsFileError {
    #[error("{}: cannot open the events file: {source}; check that the directory exists and is writable", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--events-file-max-bytes must be at least 1")]
    ZeroLimit,
}

/// A size-rotated file of JSON lines.
pub struct EventsFile {
    file: FileRotate<AppendCount>,
    path: PathBuf,
    max_bytes: u64,
    /// Bytes in the live file.
    size: u64,
    /// The last write failed (reported once until a write succeeds again).
    failing: bool,
}

impl EventsFile {
    /// Open (append to) `path`, keeping `keep` rotated files of at most `max_bytes` each.
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> Result<EventsFile, EventsFileError> {
        if max_bytes == 0 {
            return Err(EventsFileError::ZeroLimit);
        }
        let open_err = |source| EventsFileError::Open {
            path: path.to_path_buf(),
            source,
        };
        // Fail now, with a clear message, rather than on the first event.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(open_err)?;
        let size = std::fs::metadata(path).map_err(open_err)?.len();
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true);
        let file = FileRotate::new(
            path,
            AppendCount::new(keep),
            ContentLimit::None,
            Compression::None,
            Some(options),
        );
        Ok(EventsFile {
            file,
            path: path.to_path_buf(),
            max_bytes,
            size,
            failing: false,
        })
    }

    /// Append one line (a newline is added), rotating first if it would not fit.
    pub fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.max_bytes {
            self.file.rotate()?;
            self.size = 0;
        }
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.file.write_all(&buf)?;
        self.file.flush()?;
        self.size += len;
        Ok(())
    }
}

static EVENTS_FILE: OnceLock<Mutex<EventsFile>> = OnceLock::new();

/// Set the daemon's events file (once, at start-up).
pub fn install(file: EventsFile) {
    let _ = EVENTS_FILE.set(Mutex::new(file));
}

/// Whether an events file is set.
pub fn enabled() -> bool {
    EVENTS_FILE.get().is_some()
}

/// Write one line to the daemon's events file, if any. A failure is reported on stderr
/// once (until writing works again) and never stops the daemon.
pub fn write(line: &str) {
    let Some(file) = EVENTS_FILE.get() else {
        return;
    };
    let Ok(mut f) = file.lock() else { return };
    match f.write_line(line) {
        Ok(()) => f.failing = false,
        Err(e) => {
            if !std::mem::replace(&mut f.failing, true) {
                eprintln!(
                    "ztd: cannot write the events file {}: {e}; events are still kept for `ztctl events`",
                    f.path.display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .map(|t| t.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    #[test]
    fn rotates_by_size_without_splitting_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        // Each line is 10 bytes with its newline: three fit in 30 bytes.
        let mut f = EventsFile::open(&path, 30, 2).expect("open");
        for i in 0..10 {
            f.write_line(&format!("{{\"n\":{i:03}}}")).expect("write");
        }
        let live = lines(&path);
        let one = lines(&dir.path().join("events.jsonl.1"));
        let two = lines(&dir.path().join("events.jsonl.2"));
        assert_eq!(live, ["{\"n\":009}"]);
        assert_eq!(one, ["{\"n\":006}", "{\"n\":007}", "{\"n\":008}"]);
        assert_eq!(two, ["{\"n\":003}", "{\"n\":004}", "{\"n\":005}"]);
        assert!(
            !dir.path().join("events.jsonl.3").exists(),
            "only `keep` rotated files are kept"
        );
        for p in [&path, &dir.path().join("events.jsonl.1")] {
            assert!(std::fs::metadata(p).expect("stat").len() <= 30);
        }
    }

    #[test]
    fn appends_to_an_existing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("e.jsonl");
        std::fs::write(&path, "old line\n").expect("write");
        let mut f = EventsFile::open(&path, 1000, 1).expect("open");
        f.write_line("new").expect("write");
        assert_eq!(lines(&path), ["old line", "new"]);
    }

    #[test]
    fn unusable_paths_are_clear_errors() {
        let e = EventsFile::open(Path::new("/nonexistent-dir/e.jsonl"), 10, 1)
            .err()
            .expect("error");
        assert!(e.to_string().contains("/nonexistent-dir/e.jsonl"), "{e}");
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            EventsFile::open(&dir.path().join("x"), 0, 1),
            Err(EventsFileError::ZeroLimit)
        ));
    }
}
