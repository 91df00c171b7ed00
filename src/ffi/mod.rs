//! Every `unsafe` line of the crate lives under this module.
//!
//! - [`capi`]: the C ABI (`include/purgatory_sync.h`), re-exported as `purgatory_sync::capi`.
//! - [`stream`]: the socket stream the engine registers with libgit2, so that every fetch's
//!   connections obey the engine's limits (see `crate::fetch::net`).
//! - [`set_git_timeouts`]: libgit2's process-wide socket timeouts, for sockets the engine's
//!   stream does not serve.
//! - [`try_lock_exclusive`]: `flock` on the state file's lock file (`crate::persist::lock`).

#![allow(unsafe_code)]

pub(crate) mod capi;
pub(crate) mod stream;

use std::time::Duration;

/// Sets libgit2's process-wide connect and read timeouts. Both are set together: setting only
/// the connect timeout breaks fetches ("Resource temporarily unavailable").
pub(crate) fn set_git_timeouts(connect: Duration, io: Duration) -> Result<(), git2::Error> {
    let ms = |d: Duration| i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: libgit2 reads these globals without synchronisation. The caller runs this once
    // per process (behind a `Once`) from `EngineBuilder::build`, before the engine's threads
    // exist and so before any fetch of ours can read them.
    unsafe {
        git2::opts::set_server_connect_timeout_in_milliseconds(ms(connect))?;
        git2::opts::set_server_timeout_in_milliseconds(ms(io))
    }
}

/// Takes an exclusive advisory lock on `file` without waiting (`flock(LOCK_EX | LOCK_NB)`).
/// `Ok(false)`: another open file description holds it, in this process or another. The lock
/// lasts until this open file is closed (dropped), and the kernel drops it when the process
/// dies, so a crash never leaves it behind.
#[cfg(unix)]
pub(crate) fn try_lock_exclusive(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    loop {
        // SAFETY: `flock` takes a descriptor and flags and touches no memory of ours; `file`
        // keeps the descriptor open for the length of the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::WouldBlock => return Ok(false),
            std::io::ErrorKind::Interrupted => continue,
            _ => return Err(e),
        }
    }
}
