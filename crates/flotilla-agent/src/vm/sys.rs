//! The system calls of a VM's PID 1 that std has no wrapper for: mounting, loading kernel
//! modules (`finit_module`), moving the root (`MS_MOVE`), the hostname, the network ioctls
//! (address, netmask, flags, default route), growing ext4 online and powering off.
//!
//! Unsafe code is allowed here, and only here in `vm`, because these are libc calls on
//! plain data: each wrapper checks its arguments into C strings or `repr(C)` structs it
//! owns, makes one call and turns -1 into an `io::Error`. Everything above stays safe.
#![allow(unsafe_code)]

use std::ffi::{c_ulong, CString};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use crate::supervisor::sys::cvt;

fn cstr(p: impl AsRef<std::ffi::OsStr>) -> io::Result<CString> {
    CString::new(p.as_ref().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a path"))
}

/// `mount(2)`: `source` of `fstype` on `target` with `flags` and `data`.
pub(crate) fn mount(source: &str, target: &Path, fstype: Option<&str>, flags: c_ulong, data: Option<&str>) -> io::Result<()> {
    let (source, target) = (cstr(source)?, cstr(target)?);
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.map(cstr).transpose()?;
    // SAFETY: every pointer is a NUL-terminated string that lives across the call, or null.
    cvt(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref().map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    })
    .map(drop)
}

/// `umount2(2)`.
pub(crate) fn umount(target: &Path, flags: i32) -> io::Result<()> {
    let target = cstr(target)?;
    // SAFETY: a NUL-terminated path.
    cvt(unsafe { libc::umount2(target.as_ptr(), flags) }).map(drop)
}

/// Loads the kernel module in `file` (`finit_module(2)`), a compressed one for the kernel to
/// decompress when `compressed`; `Ok(false)` when it is loaded already.
pub(crate) fn load_module(file: &std::fs::File, compressed: bool) -> io::Result<bool> {
    const MODULE_INIT_COMPRESSED_FILE: libc::c_int = 4;
    let flags = if compressed { MODULE_INIT_COMPRESSED_FILE } else { 0 };
    // SAFETY: a descriptor we borrow, an empty NUL-terminated parameter string and flags.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), c"".as_ptr(), flags) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        return Ok(false);
    }
    Err(e)
}

/// `sethostname(2)`.
pub(crate) fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: a buffer and its length.
    cvt(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

/// The hostname, as the kernel has it (`uname(2)`).
pub(crate) fn hostname() -> io::Result<String> {
    // SAFETY: uname fills the zeroed struct we own.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::uname(&mut u) })?;
    let bytes: Vec<u8> = u.nodename.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Flushes every filesystem (`sync(2)`).
pub(crate) fn sync() {
    // SAFETY: no arguments.
    unsafe { libc::sync() };
}

/// Powers the machine off (`reboot(RB_POWER_OFF)`); returns only if that failed.
pub(crate) fn power_off() -> io::Error {
    // SAFETY: no pointers; the kernel stops here when it succeeds.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    io::Error::last_os_error()
}

/// `EXT4_IOC_RESIZE_FS`: grows the ext4 filesystem open as `fd` to `blocks` blocks.
pub(crate) fn ext4_resize(fd: &std::fs::File, blocks: u64) -> io::Result<()> {
    const EXT4_IOC_RESIZE_FS: c_ulong = 0x4008_6610;
    // SAFETY: the ioctl reads one u64 we own.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), EXT4_IOC_RESIZE_FS, &blocks as *const u64) }).map(drop)
}

/// `struct ifreq` with its union as an address or as flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

fn ifreq(iface: &str) -> io::Result<IfReq> {
    let mut name = [0u8; 16];
    if iface.len() >= name.len() || iface.contains('\0') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("interface name {iface:?} is not one the kernel takes")));
    }
    name[..iface.len()].copy_from_slice(iface.as_bytes());
    Ok(IfReq { name, data: [0; 24] })
}

/// A `struct sockaddr_in` of `addr`, as its 16 bytes.
fn sockaddr(addr: Ipv4Addr) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    s[4..8].copy_from_slice(&addr.octets());
    s
}

/// A datagram socket, the handle the interface ioctls go through.
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain arguments; the descriptor is owned at once.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

fn ioctl(fd: &OwnedFd, request: c_ulong, arg: *mut libc::c_void) -> io::Result<()> {
    // SAFETY: `arg` points to a struct of the size the request expects, owned by the caller.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) }).map(drop)
}

const SIOCGIFFLAGS: c_ulong = 0x8913;
const SIOCSIFFLAGS: c_ulong = 0x8914;
const SIOCSIFADDR: c_ulong = 0x8916;
const SIOCSIFNETMASK: c_ulong = 0x891c;
const SIOCADDRT: c_ulong = 0x890b;

/// Gives `iface` the address `addr` with `netmask` (none for `lo`) and brings it up.
pub(crate) fn configure_interface(iface: &str, addr: Option<(Ipv4Addr, Ipv4Addr)>) -> io::Result<()> {
    let sock = control_socket()?;
    if let Some((addr, netmask)) = addr {
        let mut req = ifreq(iface)?;
        req.data[..16].copy_from_slice(&sockaddr(addr));
        ioctl(&sock, SIOCSIFADDR, (&mut req as *mut IfReq).cast())?;
        let mut req = ifreq(iface)?;
        req.data[..16].copy_from_slice(&sockaddr(netmask));
        ioctl(&sock, SIOCSIFNETMASK, (&mut req as *mut IfReq).cast())?;
    }
    let mut req = ifreq(iface)?;
    ioctl(&sock, SIOCGIFFLAGS, (&mut req as *mut IfReq).cast())?;
    let flags = i16::from_ne_bytes([req.data[0], req.data[1]]) | (libc::IFF_UP | libc::IFF_RUNNING) as i16;
    req.data[..2].copy_from_slice(&flags.to_ne_bytes());
    ioctl(&sock, SIOCSIFFLAGS, (&mut req as *mut IfReq).cast())
}

/// `struct rtentry` (x86_64 and every LP64 Linux).
#[repr(C)]
struct RtEntry {
    pad1: c_ulong,
    dst: [u8; 16],
    gateway: [u8; 16],
    genmask: [u8; 16],
    flags: u16,
    pad2: i16,
    pad3: c_ulong,
    pad4: *mut libc::c_void,
    metric: i16,
    dev: *mut libc::c_char,
    mtu: c_ulong,
    window: c_ulong,
    irtt: u16,
}

/// Adds the default route through `gateway`.
pub(crate) fn add_default_route(gateway: Ipv4Addr) -> io::Result<()> {
    let sock = control_socket()?;
    let mut rt = RtEntry {
        pad1: 0,
        dst: sockaddr(Ipv4Addr::UNSPECIFIED),
        gateway: sockaddr(gateway),
        genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
        flags: libc::RTF_UP | libc::RTF_GATEWAY,
        pad2: 0,
        pad3: 0,
        pad4: std::ptr::null_mut(),
        metric: 0,
        dev: std::ptr::null_mut(),
        mtu: 0,
        window: 0,
        irtt: 0,
    };
    ioctl(&sock, SIOCADDRT, (&mut rt as *mut RtEntry).cast())
}

/// Sends SIGTERM to this process (`raise(3)`): the agent's own stop, as its container or the
/// operator would send it. `kill` refuses pid 1; raise does not need a pid.
pub(crate) fn raise_terminate() -> io::Result<()> {
    // SAFETY: no pointers.
    if unsafe { libc::raise(libc::SIGTERM) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The block size of the filesystem holding `path` (`statvfs`).
pub(crate) fn block_size(path: &Path) -> io::Result<u64> {
    let c = cstr(path)?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out-pointer for the call's duration.
    cvt(unsafe { libc::statvfs(c.as_ptr(), &mut st) })?;
    Ok(st.f_bsize as u64)
}
