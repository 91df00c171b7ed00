//! Checks on everything a host submits. Each failure names the field and the value.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Config;
use crate::error::SubmitError;
use crate::{ObjectId, PendingEvent};

/// Longest event id or identifier accepted, in bytes.
pub(crate) const MAX_NAME_BYTES: usize = 256;
/// Longest clone URL accepted, in bytes.
pub(crate) const MAX_URL_BYTES: usize = 2048;

pub(crate) struct Checked {
    pub oids: Vec<ObjectId>,
    pub urls: Vec<Arc<str>>,
}

fn name(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        Err("empty")
    } else if value.len() > MAX_NAME_BYTES {
        Err("longer than 256 bytes")
    } else if value.chars().any(char::is_control) {
        Err("contains control characters")
    } else {
        Ok(())
    }
}

/// Checks the event's fields that need no I/O.
pub(crate) fn event(ev: &PendingEvent, cfg: &Config) -> Result<Checked, SubmitError> {
    name(&ev.id).map_err(|reason| SubmitError::InvalidEventId {
        value: ev.id.clone(),
        reason,
    })?;
    name(&ev.identifier).map_err(|reason| SubmitError::InvalidIdentifier {
        value: ev.identifier.clone(),
        reason,
    })?;
    if ev.oids.is_empty() {
        return Err(SubmitError::NoObjectIds);
    }
    if ev.oids.len() > cfg.max_oids_per_event {
        return Err(SubmitError::TooManyObjectIds {
            count: ev.oids.len(),
            max: cfg.max_oids_per_event,
        });
    }
    let mut oids = Vec::with_capacity(ev.oids.len());
    for (index, value) in ev.oids.iter().enumerate() {
        let oid = value
            .parse::<ObjectId>()
            .map_err(|_| SubmitError::InvalidObjectId {
                index,
                value: value.clone(),
            })?;
        oids.push(oid);
    }
    oids.sort_unstable();
    oids.dedup();
    if ev.clone_urls.len() > cfg.max_urls_per_event {
        return Err(SubmitError::TooManyCloneUrls {
            count: ev.clone_urls.len(),
            max: cfg.max_urls_per_event,
        });
    }
    let mut urls: Vec<Arc<str>> = Vec::with_capacity(ev.clone_urls.len());
    for (index, value) in ev.clone_urls.iter().enumerate() {
        let bad = |reason| SubmitError::InvalidCloneUrl {
            index,
            value: value.clone(),
            reason,
        };
        if value.is_empty() {
            return Err(bad("empty"));
        }
        if value.len() > MAX_URL_BYTES {
            return Err(bad("longer than 2048 bytes"));
        }
        if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("contains whitespace or control characters"));
        }
        if !urls.iter().any(|u| **u == **value) {
            urls.push(Arc::from(value.as_str()));
        }
    }
    Ok(Checked { oids, urls })
}

/// Checks that `path` is an existing bare git repository and returns its canonical path, so
/// that two spellings of one repository share a queue entry.
pub(crate) fn repository(path: &Path) -> Result<PathBuf, SubmitError> {
    let bad = |reason: String| SubmitError::InvalidRepository {
        path: path.to_path_buf(),
        reason,
    };
    if path.as_os_str().is_empty() {
        return Err(bad("empty path".to_owned()));
    }
    let canonical = std::fs::canonicalize(path).map_err(|e| bad(e.to_string()))?;
    crate::fetch::open_bare(&canonical).map_err(bad)?;
    Ok(canonical)
}
