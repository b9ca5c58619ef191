//! Offsets of the kernel structures the programs walk: the file an exec loaded
//! (`linux_binprm.file`, `file.f_inode`, `inode.i_ino`, `inode.i_sb`, `super_block.s_dev`),
//! a new task's process (`task_struct.tgid`), whether a thread group is gone
//! (`task_struct.signal`, `signal_struct.live`) and the caller's effective ids
//! (`task_struct.cred`, `cred.euid`, `cred.egid`). They differ between kernel builds, and
//! aya's Rust programs have no CO-RE field relocations, so we read them from the kernel's own
//! BTF at start-up.
//!
//! The parser reads only what it needs: type records, struct/union members, and names.
//! Anonymous struct/union members (e.g. `mm_struct`'s wrapper struct) are searched through.

use std::path::Path;

use zt_common::KernelOffsets;

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF at {path}: {source} (zt needs a kernel built with CONFIG_DEBUG_INFO_BTF)")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel BTF at {path} is malformed: {what}")]
    Malformed { path: String, what: &'static str },
    #[error(
        "kernel BTF has no struct {strukt} with a member {member}: this kernel is not supported"
    )]
    MissingMember {
        strukt: &'static str,
        member: &'static str,
    },
}

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
}

struct Type {
    kind: u32,
    name_off: u32,
    /// Members of structs and unions; empty otherwise.
    members: Vec<Member>,
    /// The referenced type of modifiers/typedefs (kinds 8-11, 18).
    referenced: u32,
}

/// A parsed BTF blob.
pub struct Btf {
    types: Vec<Type>, // index = type id; id 0 is void
    strings: Vec<u8>,
}

fn u32_at(data: &[u8], off: usize) -> Option<u32> {
    data.get(off..off + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl Btf {
    pub fn from_file(path: &Path) -> Result<Btf, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Btf::parse(&data).map_err(|what| BtfError::Malformed {
            path: path.display().to_string(),
            what,
        })
    }

    pub fn parse(data: &[u8]) -> Result<Btf, &'static str> {
        if data.len() < 24 || data[0..2] != [0x9f, 0xeb] {
            return Err("bad magic (only little-endian BTF is supported)");
        }
        let hdr_len = u32_at(data, 4).ok_or("short header")? as usize;
        let type_off = u32_at(data, 8).ok_or("short header")? as usize;
        let type_len = u32_at(data, 12).ok_or("short header")? as usize;
        let str_off = u32_at(data, 16).ok_or("short header")? as usize;
        let str_len = u32_at(data, 20).ok_or("short header")? as usize;
        let types_data = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or("type section out of bounds")?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or("string section out of bounds")?
            .to_vec();

        let mut types = vec![Type {
            kind: 0,
            name_off: 0,
            members: Vec::new(),
            referenced: 0,
        }];
        let mut off = 0;
        while off < types_data.len() {
            let name_off = u32_at(types_data, off).ok_or("truncated type")?;
            let info = u32_at(types_data, off + 4).ok_or("truncated type")?;
            let size_or_type = u32_at(types_data, off + 8).ok_or("truncated type")?;
            off += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                1 => 4,  // INT
                3 => 12, // ARRAY
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = off + i * 12;
                        let offset = u32_at(types_data, m + 8).ok_or("truncated member")?;
                        members.push(Member {
                            name_off: u32_at(types_data, m).ok_or("truncated member")?,
                            type_id: u32_at(types_data, m + 4).ok_or("truncated member")?,
                            bit_offset: if kind_flag {
                                offset & 0xff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    vlen * 12
                }
                6 => vlen * 8,   // ENUM
                13 => vlen * 8,  // FUNC_PROTO
                14 => 4,         // VAR
                15 => vlen * 12, // DATASEC
                17 => 4,         // DECL_TAG
                19 => vlen * 12, // ENUM64
                2 | 7..=12 | 16 | 18 => 0,
                _ => return Err("unknown type kind"),
            };
            off += extra;
            types.push(Type {
                kind,
                name_off,
                members,
                referenced: size_or_type,
            });
        }
        Ok(Btf { types, strings })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    /// Follow typedefs and modifiers to a struct or union.
    fn composite(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..16 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_STRUCT | KIND_UNION => return Some(t),
                8..=11 | 18 => id = t.referenced,
                _ => return None,
            }
        }
        None
    }

    /// Byte offset of `member` in `t`, searching anonymous members too.
    fn member_offset_in(&self, t: &Type, member: &[u8], depth: u32) -> Option<u32> {
        for m in &t.members {
            if self.name(m.name_off) == member {
                return Some(m.bit_offset / 8);
            }
        }
        if depth > 4 {
            return None;
        }
        for m in t.members.iter().filter(|m| m.name_off == 0) {
            if let Some(inner) = self.composite(m.type_id) {
                if let Some(off) = self.member_offset_in(inner, member, depth + 1) {
                    return Some(m.bit_offset / 8 + off);
                }
            }
        }
        None
    }

    /// Byte offset of `strukt.member`.
    pub fn member_offset(
        &self,
        strukt: &'static str,
        member: &'static str,
    ) -> Result<u32, BtfError> {
        self.types
            .iter()
            .filter(|t| t.kind == KIND_STRUCT && !t.members.is_empty())
            .filter(|t| self.name(t.name_off) == strukt.as_bytes())
            .find_map(|t| self.member_offset_in(t, member.as_bytes(), 0))
            .ok_or(BtfError::MissingMember { strukt, member })
    }

    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        Ok(KernelOffsets {
            bprm_file: self.member_offset("linux_binprm", "file")?,
            file_f_inode: self.member_offset("file", "f_inode")?,
            inode_i_ino: self.member_offset("inode", "i_ino")?,
            inode_i_sb: self.member_offset("inode", "i_sb")?,
            sb_s_dev: self.member_offset("super_block", "s_dev")?,
            task_cred: self.member_offset("task_struct", "cred")?,
            cred_euid: self.member_offset("cred", "euid")?,
            cred_egid: self.member_offset("cred", "egid")?,
            task_tgid: self.member_offset("task_struct", "tgid")?,
            task_signal: self.member_offset("task_struct", "signal")?,
            signal_live: self.member_offset("signal_struct", "live")?,
            _pad: 0,
        })
    }
}

/// The running kernel's offsets.
pub fn kernel_offsets() -> Result<KernelOffsets, BtfError> {
    Btf::from_file(Path::new(VMLINUX_BTF))?.kernel_offsets()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_kernel_offsets_are_found_and_plausible() {
        let off = kernel_offsets().expect("this machine has kernel BTF");
        assert!(off.task_tgid > 0 && off.task_tgid < 16384, "{off:?}");
        assert!(off.task_signal > 0 && off.task_signal < 16384, "{off:?}");
        assert!(off.bprm_file > 0 && off.bprm_file < 4096, "{off:?}");
        assert!(off.inode_i_sb > 0 && off.inode_i_ino > 0, "{off:?}");
        assert_ne!(off.inode_i_sb, off.inode_i_ino);
        assert!(
            off.task_cred > 0 && off.cred_egid > off.cred_euid,
            "{off:?}"
        );
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(Btf::parse(b"not btf at all, really not").is_err());
    }
}
