//! The outcomes waiting to be taken, and a readiness descriptor for event loops.
//!
//! A forwarding thread moves each outcome from the engine's channel into the outbox as it is
//! sent. The outbox keeps a pipe whose read end is readable exactly while an outcome waits, or
//! once the engine is shut down and every outcome was taken (so that a host waiting in
//! `poll(2)`, epoll or Go's netpoller wakes to see `PSYNC_DISCONNECTED`): a byte is written
//! when the outbox stops being empty and read back when the last outcome is taken, both under
//! the outbox's lock, so the descriptor never says "ready" over an empty outbox for longer than
//! a take, nor "empty" over a waiting outcome.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use parking_lot::{Condvar, Mutex};
use purgatory_sync::Outcome;

/// Why nothing was taken.
pub(crate) enum Empty {
    /// Nothing within the timeout.
    Timeout,
    /// The engine is shut down and every outcome was taken.
    Disconnected,
}

struct State {
    items: VecDeque<Outcome>,
    disconnected: bool,
    /// A byte is in the pipe.
    signalled: bool,
}

pub(crate) struct Outbox {
    state: Mutex<State>,
    changed: Condvar,
    read: OwnedFd,
    write: OwnedFd,
}

/// A pipe, both ends non-blocking and closed on exec.
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is valid for two descriptors; on success both are new and ours.
    #[cfg(target_os = "linux")]
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    #[cfg(not(target_os = "linux"))]
    let rc = unsafe { libc::pipe(fds.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: two descriptors just created, owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    #[cfg(not(target_os = "linux"))]
    for fd in [&read, &write] {
        // SAFETY: a valid descriptor; only flag bits change.
        unsafe {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
    Ok((read, write))
}

impl Outbox {
    pub(crate) fn new() -> std::io::Result<Outbox> {
        let (read, write) = pipe()?;
        Ok(Outbox {
            state: Mutex::new(State {
                items: VecDeque::new(),
                disconnected: false,
                signalled: false,
            }),
            changed: Condvar::new(),
            read,
            write,
        })
    }

    /// Moves every outcome of `outcomes` here until the engine drops its sender; runs on the
    /// forwarding thread.
    pub(crate) fn forward(&self, outcomes: Receiver<Outcome>) {
        for outcome in outcomes {
            let mut state = self.state.lock();
            state.items.push_back(outcome);
            self.signal(&mut state);
            drop(state);
            self.changed.notify_one();
        }
        let mut state = self.state.lock();
        state.disconnected = true;
        self.signal(&mut state);
        drop(state);
        self.changed.notify_all();
    }

    fn signal(&self, state: &mut State) {
        if !state.signalled {
            // SAFETY: a valid descriptor of ours; one byte from a valid buffer. A full pipe
            // cannot happen (at most one byte is ever in it).
            unsafe { libc::write(self.write.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
            state.signalled = true;
        }
    }

    fn clear(&self, state: &mut State) {
        if state.signalled {
            let mut byte = 0u8;
            // SAFETY: a valid descriptor of ours, non-blocking; one byte into a valid buffer.
            unsafe { libc::read(self.read.as_raw_fd(), (&mut byte as *mut u8).cast(), 1) };
            state.signalled = false;
        }
    }

    /// The next outcome, waiting up to `timeout`.
    pub(crate) fn take(&self, timeout: Duration) -> Result<Outcome, Empty> {
        let deadline = Instant::now().checked_add(timeout);
        let mut state = self.state.lock();
        loop {
            if let Some(outcome) = state.items.pop_front() {
                if state.items.is_empty() && !state.disconnected {
                    self.clear(&mut state);
                }
                return Ok(outcome);
            }
            if state.disconnected {
                return Err(Empty::Disconnected);
            }
            match deadline {
                Some(d) if Instant::now() < d => {
                    self.changed.wait_until(&mut state, d);
                }
                Some(_) => return Err(Empty::Timeout),
                // A timeout too long to add to now: wait without one.
                None => self.changed.wait(&mut state),
            }
        }
    }

    /// The read end: readable while an outcome waits or after the last one of a shut-down
    /// engine was taken.
    pub(crate) fn ready_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }
}
