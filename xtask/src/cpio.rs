//! A writer for the `newc` cpio format, the only archive format the Linux kernel unpacks as an initramfs.
//!
//! Writing it here (instead of calling `cpio`) removes a host tool and lets an unprivileged user create device
//! nodes such as `/dev/console` inside the archive.

use std::io::{self, Write};

/// The magic of a `newc` header (no checksums).
const NEWC_MAGIC: &str = "070701";
/// Size of the fixed part of a header: magic plus 13 eight-digit hex fields.
const HEADER_LEN: usize = 6 + 13 * 8;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

/// Streams entries into a `newc` archive; call [`Archive::finish`] to write the trailer.
///
/// ```ignore
/// let mut archive = Archive::new(Vec::new());
/// archive.directory("dev", 0o755)?;
/// archive.char_device("dev/console", 0o600, 5, 1)?;
/// archive.file("init", 0o755, b"#!/bin/sh\n")?;
/// let bytes = archive.finish()?;
/// ```
#[derive(Debug)]
pub struct Archive<W: Write> {
    out: W,
    written: usize,
    next_inode: u32,
}

/// The metadata of one archive entry besides its name and contents.
#[derive(Debug, Clone, Copy)]
struct Entry {
    mode: u32,
    rdev_major: u32,
    rdev_minor: u32,
}

impl<W: Write> Archive<W> {
    /// Starts an empty archive that writes into `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_inode: 1,
        }
    }

    /// Adds a directory; parents must be added first.
    pub fn directory(&mut self, name: &str, permissions: u32) -> io::Result<()> {
        self.entry(name, entry(S_IFDIR | permissions), &[])
    }

    /// Adds a regular file with the given contents.
    pub fn file(&mut self, name: &str, permissions: u32, contents: &[u8]) -> io::Result<()> {
        self.entry(name, entry(S_IFREG | permissions), contents)
    }

    /// Adds a character device node.
    pub fn char_device(
        &mut self,
        name: &str,
        permissions: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()> {
        let meta = Entry {
            mode: S_IFCHR | permissions,
            rdev_major: major,
            rdev_minor: minor,
        };
        self.entry(name, meta, &[])
    }

    /// Writes the trailer entry and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.next_inode = 0;
        self.entry("TRAILER!!!", entry(0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(&mut self, name: &str, meta: Entry, contents: &[u8]) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        let size = u32::try_from(contents.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: too large for cpio"),
            )
        })?;
        let name_len = u32::try_from(name.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry name too long"))?;
        let inode = self.next_inode;
        self.next_inode = self.next_inode.wrapping_add(1);
        let nlink = if meta.mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        let fields = [
            inode,
            meta.mode,
            0, // uid: root
            0, // gid: root
            nlink,
            0, // mtime: fixed, so identical inputs give identical archives
            size,
            0, // dev major
            0, // dev minor
            meta.rdev_major,
            meta.rdev_minor,
            name_len,
            0, // checksum, unused by newc
        ];
        let mut header = String::with_capacity(HEADER_LEN);
        header.push_str(NEWC_MAGIC);
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(contents)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len();
        Ok(())
    }

    /// newc aligns both the name and the file data to four bytes.
    fn pad(&mut self) -> io::Result<()> {
        let padding = (4 - self.written % 4) % 4;
        self.write(&[0; 3][..padding])
    }
}

fn entry(mode: u32) -> Entry {
    Entry {
        mode,
        rdev_major: 0,
        rdev_minor: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal reader, enough to check what the writer produced.
    fn parse(bytes: &[u8]) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut at = 0;
        loop {
            assert_eq!(at % 4, 0, "header not aligned");
            let header = std::str::from_utf8(&bytes[at..at + HEADER_LEN]).unwrap();
            assert_eq!(&header[..6], NEWC_MAGIC);
            let field = |i: usize| u32::from_str_radix(&header[6 + i * 8..14 + i * 8], 16).unwrap();
            let (mode, size, rmaj, rmin, name_len) =
                (field(1), field(6), field(9), field(10), field(11));
            let name_start = at + HEADER_LEN;
            let name = std::str::from_utf8(&bytes[name_start..name_start + name_len as usize - 1])
                .unwrap()
                .to_owned();
            assert_eq!(bytes[name_start + name_len as usize - 1], 0);
            let data_start = (name_start + name_len as usize).next_multiple_of(4);
            let data = bytes[data_start..data_start + size as usize].to_vec();
            at = (data_start + size as usize).next_multiple_of(4);
            if name == "TRAILER!!!" {
                assert_eq!(at, bytes.len(), "bytes after the trailer");
                return entries;
            }
            entries.push((name, mode, rmaj, rmin, data));
        }
    }

    #[test]
    fn archive_round_trips_every_entry_kind() {
        let mut archive = Archive::new(Vec::new());
        archive.directory("/dev", 0o755).unwrap();
        archive.char_device("dev/console", 0o600, 5, 1).unwrap();
        archive
            .file("init", 0o755, b"#!/bin/sh\necho hi\n")
            .unwrap();
        archive.file("empty", 0o644, b"").unwrap();
        let bytes = archive.finish().unwrap();

        let entries = parse(&bytes);
        let names: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "init", "empty"]);
        assert_eq!(entries[0].1, 0o040_755);
        assert_eq!(
            (entries[1].1, entries[1].2, entries[1].3),
            (0o020_600, 5, 1)
        );
        assert_eq!(entries[2].1, 0o100_755);
        assert_eq!(entries[2].4, b"#!/bin/sh\necho hi\n");
        assert_eq!(entries[3].1, 0o100_644);
        assert!(entries[3].4.is_empty());
    }

    #[test]
    fn identical_inputs_give_identical_archives() {
        let build = || {
            let mut archive = Archive::new(Vec::new());
            archive.file("a", 0o644, b"xyz").unwrap();
            archive.finish().unwrap()
        };
        assert_eq!(build(), build());
    }

    #[test]
    fn archive_is_accepted_by_gnu_cpio_when_installed() {
        // The kernel's unpacker and GNU cpio read the same format; cross-check against the tool when it exists.
        let Ok(status) = std::process::Command::new("cpio").arg("--version").output() else {
            return;
        };
        if !status.status.success() {
            return;
        }
        let mut archive = Archive::new(Vec::new());
        archive.directory("d", 0o755).unwrap();
        archive.file("d/f", 0o644, b"hello").unwrap();
        let bytes = archive.finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-i", "--quiet", "-d"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(std::fs::read(dir.path().join("d/f")).unwrap(), b"hello");
    }
}
