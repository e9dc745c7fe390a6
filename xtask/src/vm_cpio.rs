//! The initramfs file format: a `newc` cpio archive (what the kernel unpacks into its root
//! file system at boot). Owns the byte layout only; what goes into the archive is
//! `vm_rootfs`'s job. Written here rather than by the `cpio` tool so the archive can hold
//! root-owned device-free entries with exact modes without staging a directory tree on disk,
//! and stays uncompressed: the kernel unpacks a plain archive faster than it inflates one,
//! which matters under TCG.

use std::io::{self, Write};

/// One archive member. Paths are relative to the root (no leading `/`).
pub enum Member<'a> {
    Dir {
        path: &'a str,
        mode: u32,
    },
    File {
        path: &'a str,
        mode: u32,
        data: &'a [u8],
    },
    Symlink {
        path: &'a str,
        target: &'a str,
    },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// Writes members in order, numbering inodes, and the trailer on `finish`.
pub struct Writer<W: Write> {
    out: W,
    offset: u64,
    next_ino: u32,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            offset: 0,
            next_ino: 1,
        }
    }

    pub fn add(&mut self, member: Member<'_>) -> io::Result<()> {
        let (path, mode, data, nlink) = match member {
            Member::Dir { path, mode } => (path, S_IFDIR | mode, &[][..], 2),
            Member::File { path, mode, data } => (path, S_IFREG | mode, data, 1),
            Member::Symlink { path, target } => (path, S_IFLNK | 0o777, target.as_bytes(), 1),
        };
        let ino = self.next_ino;
        self.next_ino += 1;
        self.entry(ino, mode, nlink, path, data)
    }

    /// Writes the `TRAILER!!!` record and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(0, 0, 1, "TRAILER!!!", &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        ino: u32,
        mode: u32,
        nlink: u32,
        path: &str,
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::other(format!("{path} is larger than 4 GiB")))?;
        // c_magic, then 13 eight-digit hex fields: ino mode uid gid nlink mtime filesize
        // devmajor devminor rdevmajor rdevminor namesize check.
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            path.len() + 1,
            0
        );
        self.write(header.as_bytes())?;
        self.write(path.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Header+name and data are each padded to a multiple of four bytes.
    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - (self.offset % 4) as usize) % 4;
        self.write(&[0; 3][..pad])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_aligned_newc_records_and_a_trailer() {
        let mut w = Writer::new(Vec::new());
        w.add(Member::Dir {
            path: "etc",
            mode: 0o755,
        })
        .unwrap();
        w.add(Member::File {
            path: "etc/hosts",
            mode: 0o644,
            data: b"127.0.0.1 localhost\n",
        })
        .unwrap();
        w.add(Member::Symlink {
            path: "bin",
            target: "usr/bin",
        })
        .unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&bytes);
        // The file's header: mode 0100644, size 20, namesize 10 ("etc/hosts\0").
        assert!(text.contains(&format!("{:08x}", 0o100644)));
        assert!(text.contains("etc/hosts\0"));
        assert!(text.contains("127.0.0.1 localhost\n"));
        assert!(text.contains("TRAILER!!!\0"));
        // Every record starts 4-byte aligned: the second magic sits at a multiple of 4.
        let second = text[6..].find("070701").unwrap() + 6;
        assert_eq!(second % 4, 0);
    }
}
