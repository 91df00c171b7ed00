//! NIP-34 events in.
