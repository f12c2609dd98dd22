//! What `mke2fs -d` (e2fsprogs 1.47.0) copies from the staged files that no build can choose:
//! their change and access times (`ctime`: when the build wrote the file; `atime`: when
//! something last read it) and their owner (the Nix build user). So after `mke2fs`, every used
//! inode gets the image's fixed time as ctime and atime and root as owner and group and, with
//! `metadata_csum`, its checksum recomputed, as e2fsprogs computes it (crc32c seeded with the
//! filesystem's UUID, then the inode number and generation).
//!
//! This edits a filesystem image file the builder made itself, by the ext4 on-disk format
//! (Documentation/filesystems/ext4 in the kernel). Nothing else of the filesystem changes:
//! `e2fsck -fn` of the result is clean (the image tests check it).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

const SUPERBLOCK: u64 = 1024;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const BG_INODE_UNINIT: u16 = 0x1;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// crc32c (Castagnoli) without the final inversion, as ext4's `ext2fs_crc32c_le`.
fn crc32c(mut crc: u32, data: &[u8]) -> u32 {
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    crc
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("the filesystem mke2fs made is not what flotilla reads: {what}"))
}

/// Sets the ctime and atime of every used inode of the ext4 image `file` to `time` (seconds,
/// no nanoseconds), its owner and group to root, and recomputes the inodes' checksums. Returns how many inodes it visited.
pub fn normalise_inodes(file: &File, time: u32) -> io::Result<u64> {
    let mut sb = [0u8; 1024];
    file.read_exact_at(&mut sb, SUPERBLOCK)?;
    if u16_at(&sb, 0x38) != 0xEF53 {
        return Err(bad("no ext4 magic in the superblock"));
    }
    let block_size = 1024u64 << u32_at(&sb, 0x18);
    let blocks = u64::from(u32_at(&sb, 0x04));
    let first_data_block = u64::from(u32_at(&sb, 0x14));
    let blocks_per_group = u64::from(u32_at(&sb, 0x20));
    let inodes_per_group = u64::from(u32_at(&sb, 0x28));
    let inode_size = u64::from(u16_at(&sb, 0x58));
    let incompat = u32_at(&sb, 0x60);
    let ro_compat = u32_at(&sb, 0x64);
    let desc_size = if incompat & INCOMPAT_64BIT != 0 { u64::from(u16_at(&sb, 0xFE)) } else { 32 };
    if blocks_per_group == 0 || inodes_per_group == 0 || inode_size < 128 || desc_size < 32 {
        return Err(bad("a zero group size or a short inode"));
    }
    let csum = ro_compat & RO_COMPAT_METADATA_CSUM != 0;
    let seed = if incompat & INCOMPAT_CSUM_SEED != 0 { u32_at(&sb, 0x270) } else { crc32c(!0, &sb[0x68..0x78]) };
    let groups = (blocks - first_data_block).div_ceil(blocks_per_group);

    let mut descs = vec![0u8; (groups * desc_size) as usize];
    file.read_exact_at(&mut descs, (first_data_block + 1) * block_size)?;
    let mut inode = vec![0u8; inode_size as usize];
    let mut visited = 0;
    for g in 0..groups {
        let d = &descs[(g * desc_size) as usize..((g + 1) * desc_size) as usize];
        if u16_at(d, 0x12) & BG_INODE_UNINIT != 0 {
            continue;
        }
        let mut table = u64::from(u32_at(d, 0x08));
        let mut unused = u64::from(u16_at(d, 0x1C));
        if desc_size >= 64 {
            table |= u64::from(u32_at(d, 0x28)) << 32;
            unused |= u64::from(u16_at(d, 0x32)) << 16;
        }
        for i in 0..inodes_per_group.saturating_sub(unused) {
            let at = table * block_size + i * inode_size;
            file.read_exact_at(&mut inode, at)?;
            // Never used: mode and links 0 and no times (a free inode mke2fs zeroed).
            if inode.iter().all(|b| *b == 0) {
                continue;
            }
            visited += 1;
            // Owner and group root: the staged files belong to the build user.
            for (at, len) in [(0x02, 2), (0x18, 2), (0x78, 2), (0x7A, 2)] {
                inode[at..at + len].fill(0);
            }
            inode[0x08..0x0C].copy_from_slice(&time.to_le_bytes());
            inode[0x0C..0x10].copy_from_slice(&time.to_le_bytes());
            let extra = if inode_size > 128 { u64::from(u16_at(&inode, 0x80)) } else { 0 };
            // i_ctime_extra and i_atime_extra (nanoseconds and epoch bits), when the inode
            // has room for them.
            if extra >= 8 {
                inode[0x84..0x88].fill(0);
            }
            if extra >= 16 {
                inode[0x8C..0x90].fill(0);
            }
            if csum {
                let number = (g * inodes_per_group + i + 1) as u32;
                let generation = u32_at(&inode, 0x64);
                let has_hi = extra >= 4;
                inode[0x7C..0x7E].fill(0);
                if has_hi {
                    inode[0x82..0x84].fill(0);
                }
                let mut c = crc32c(seed, &number.to_le_bytes());
                c = crc32c(c, &generation.to_le_bytes());
                c = crc32c(c, &inode);
                inode[0x7C..0x7E].copy_from_slice(&(c as u16).to_le_bytes());
                if has_hi {
                    inode[0x82..0x84].copy_from_slice(&((c >> 16) as u16).to_le_bytes());
                }
            }
            file.write_all_at(&inode, at)?;
        }
    }
    Ok(visited)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnoli() {
        // The standard check value of CRC-32C is 0xE3069283 for "123456789".
        assert_eq!(!crc32c(!0, b"123456789"), 0xE306_9283);
    }
}
