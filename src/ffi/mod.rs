//! Every `unsafe` line of the crate lives under this module.
//!
//! - [`capi`]: the C ABI (`include/purgatory_sync.h`), re-exported as `purgatory_sync::capi`.
//! - [`stream`]: the socket stream the engine registers with libgit2, so that every fetch's
//!   connections obey the engine's limits (see `crate::fetch::net`).
//! - [`set_git_timeouts`]: libgit2's process-wide socket timeouts, for sockets the engine's
//!   stream does not serve.

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
