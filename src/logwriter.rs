//! The daemon's log writer: a line that cannot be written is dropped and counted, never an
//! error.
//!
//! tracing-subscriber reports a failed write with `eprintln!`, which panics when stderr is
//! what failed (a background daemon's stderr is `CACHE/owsfs.log`, on the cache's file
//! system). A panic in a FUSE worker then runs the unwinding of fuser's reply, whose drop logs
//! again and panics again, and the daemon aborts: a full cache disk killed the mount. With
//! this writer the daemon loses log lines on a full disk, and says how many once it can
//! write again.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};

/// Lines dropped, and how many of them the log has been told about.
pub struct Dropped {
    lines: AtomicU64,
    reported: AtomicU64,
}

impl Dropped {
    pub const fn new() -> Dropped {
        Dropped {
            lines: AtomicU64::new(0),
            reported: AtomicU64::new(0),
        }
    }

    /// Lines that could not be written so far.
    pub fn lines(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }
}

/// The daemon's count, for `owsfs status`.
pub static DROPPED: Dropped = Dropped::new();

/// Log lines the daemon could not write since it started (e.g. its log's file system is
/// full).
pub fn dropped_lines() -> u64 {
    DROPPED.lines()
}

/// stderr for `tracing_subscriber::fmt().with_writer(..)`, counting into [`DROPPED`].
#[derive(Clone, Copy, Debug, Default)]
pub struct LossyStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LossyStderr {
    type Writer = LossyStderr;

    fn make_writer(&'a self) -> LossyStderr {
        LossyStderr
    }
}

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        write_or_drop(&mut io::stderr().lock(), buf, &DROPPED);
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        write_or_drop(&mut io::stderr().lock(), buf, &DROPPED);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes one formatted line to `out`, first noting lines dropped since the last note. A
/// failure drops the line (and counts it); it is never returned.
pub fn write_or_drop(out: &mut impl Write, line: &[u8], dropped: &Dropped) {
    let lost = dropped.lines.load(Ordering::Relaxed);
    let reported = dropped.reported.load(Ordering::Relaxed);
    if lost > reported {
        let note = format!(
            "owsfs: {} log line(s) could not be written (is the log's file system full?)\n",
            lost - reported
        );
        if out.write_all(note.as_bytes()).is_err() {
            dropped.lines.fetch_add(1, Ordering::Relaxed);
            return;
        }
        dropped.reported.fetch_max(lost, Ordering::Relaxed);
    }
    if out.write_all(line).is_err() {
        dropped.lines.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails with ENOSPC while `full`, else keeps what it is given.
    struct Disk {
        full: bool,
        data: Vec<u8>,
    }

    impl Write for Disk {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.full {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.data.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn failed_lines_are_dropped_counted_and_reported_once_space_is_back() {
        let dropped = Dropped::new();
        let mut disk = Disk {
            full: false,
            data: Vec::new(),
        };
        write_or_drop(&mut disk, b"one\n", &dropped);
        disk.full = true;
        write_or_drop(&mut disk, b"two\n", &dropped);
        write_or_drop(&mut disk, b"three\n", &dropped);
        assert_eq!(dropped.lines(), 2);
        disk.full = false;
        write_or_drop(&mut disk, b"four\n", &dropped);
        write_or_drop(&mut disk, b"five\n", &dropped);
        assert_eq!(
            String::from_utf8(disk.data).unwrap(),
            "one\nowsfs: 2 log line(s) could not be written (is the log's file system full?)\n\
             four\nfive\n"
        );
        assert_eq!(dropped.lines(), 2);
    }

    /// The writer as tracing-subscriber uses it never reports an error, whatever stderr does.
    #[test]
    fn the_writer_never_fails() {
        let mut w = LossyStderr;
        assert!(w.write_all(b"").is_ok());
        assert_eq!(w.write(b"").unwrap(), 0);
        assert!(w.flush().is_ok());
    }
}
