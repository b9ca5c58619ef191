//! A minimal writer of the kernel's initramfs format (cpio "newc", uncompressed): files,
//! directories and symlinks owned by root, so that building the guest's root needs neither
//! `cpio` nor root privileges, and the guest spends no emulated time decompressing it.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

/// What one path of the guest's root is.
#[derive(Debug)]
enum Node {
    Dir,
    /// A copy of a host file (symlinks followed), with this mode.
    File(PathBuf, u32),
    Data(Vec<u8>, u32),
    Symlink(String),
}

/// The guest's root, path by path (absolute guest paths without the leading `/`).
#[derive(Debug, Default)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

fn key(guest: &str) -> Result<String> {
    let k = guest.trim_start_matches('/').trim_end_matches('/');
    if k.is_empty() || k.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        bail!("not a clean absolute guest path: {guest:?}");
    }
    Ok(k.to_string())
}

impl Tree {
    fn insert(&mut self, guest: &str, node: Node) -> Result<()> {
        let k = key(guest)?;
        let comps: Vec<&str> = k.split('/').collect();
        for i in 1..comps.len() {
            let parent = comps[..i].join("/");
            match self.nodes.get(&parent) {
                None => {
                    self.nodes.insert(parent, Node::Dir);
                }
                Some(Node::Dir) => {}
                Some(other) => bail!("{parent} is already {other:?}, not a directory"),
            }
        }
        self.nodes.insert(k, node);
        Ok(())
    }

    pub fn dir(&mut self, guest: &str) -> Result<()> {
        self.insert(guest, Node::Dir)
    }

    /// A copy of host file `host` at `guest`, keeping its permission bits.
    pub fn file(&mut self, guest: &str, host: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = std::fs::metadata(host).with_context(|| format!("{}", host.display()))?;
        if !meta.is_file() {
            bail!("{} is not a regular file", host.display());
        }
        let mode = meta.permissions().mode() & 0o7777;
        self.insert(guest, Node::File(host.to_path_buf(), mode))
    }

    /// A host file at the same path in the guest.
    pub fn same(&mut self, host: &Path) -> Result<()> {
        let guest = host
            .to_str()
            .with_context(|| format!("{} is not UTF-8", host.display()))?
            .to_string();
        self.file(&guest, host)
    }

    pub fn data(&mut self, guest: &str, data: impl Into<Vec<u8>>, mode: u32) -> Result<()> {
        self.insert(guest, Node::Data(data.into(), mode))
    }

    pub fn symlink(&mut self, guest: &str, target: &str) -> Result<()> {
        self.insert(guest, Node::Symlink(target.to_string()))
    }

    pub fn contains(&self, guest: &str) -> bool {
        key(guest)
            .map(|k| self.nodes.contains_key(&k))
            .unwrap_or(false)
    }

    /// Write the archive; returns its size in bytes.
    pub fn write(&self, out: &Path) -> Result<u64> {
        let file =
            std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut w = Writer {
            out: std::io::BufWriter::new(file),
            pos: 0,
            ino: 1,
        };
        // BTreeMap order puts every directory before what it contains.
        for (path, node) in &self.nodes {
            match node {
                Node::Dir => w.entry(path, 0o040_755, &[])?,
                Node::File(host, mode) => {
                    let data = std::fs::read(host)
                        .with_context(|| format!("reading {}", host.display()))?;
                    w.entry(path, 0o100_000 | mode, &data)?;
                }
                Node::Data(data, mode) => w.entry(path, 0o100_000 | mode, data)?,
                Node::Symlink(target) => w.entry(path, 0o120_777, target.as_bytes())?,
            }
        }
        w.entry("TRAILER!!!", 0, &[])?;
        w.out.flush()?;
        Ok(w.pos)
    }
}

struct Writer<W: Write> {
    out: W,
    pos: u64,
    ino: u32,
}

impl<W: Write> Writer<W> {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let n = (4 - (self.pos % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<()> {
        let size = u32::try_from(data.len()).context("a file over 4 GiB")?;
        let namesize = name.len() as u32 + 1;
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, namesize, 0
        );
        self.ino += 1;
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_come_first_and_entries_are_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tree::default();
        t.data("/a/b/c", b"hello".to_vec(), 0o755).unwrap();
        t.symlink("/bin/sh", "busybox").unwrap();
        assert!(t.data("/a/b/c/d", b"x".to_vec(), 0o644).is_err());
        assert!(t.dir("/a/../b").is_err());
        let out = dir.path().join("x.cpio");
        let size = t.write(&out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(size as usize, bytes.len());
        assert_eq!(size % 4, 0);
        let text = String::from_utf8_lossy(&bytes);
        let order: Vec<usize> = [
            "a\0",
            "a/b\0",
            "a/b/c\0",
            "bin\0",
            "bin/sh\0",
            "TRAILER!!!\0",
        ]
        .iter()
        .map(|n| text.find(n).unwrap())
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        assert!(text.starts_with("070701"));
    }
}
