//! Where a fetch's packs are written before the engine knows whether they are worth keeping.
//!
//! A server can answer a request with objects nobody asked for. Written straight into the
//! repository, they would stay there at every attempt. So each fetch writes its packs into a
//! directory of its own inside the repository's object store (`objects/incoming-psync-<pid>-<n>`,
//! as `git receive-pack` does with its `tmp_objdir-incoming-*`): libgit2 sees it as one more
//! pack backend, ahead of the repository's own, so the fetch's packs land there and the objects
//! in them are visible to the fetch's repository handle (for negotiation, thin packs, the
//! presence check). When the fetch brought a wanted object, its packs move into `objects/pack`
//! (pack first, index last, so that no reader sees an index without its pack); otherwise the
//! directory is removed, and with it everything the server sent.
//!
//! A process that dies mid-fetch leaves its directory behind: later fetches into the same
//! repository remove the directories of processes that no longer run.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use git2::Repository;

/// The prefix of quarantine directories in `objects/`.
const PREFIX: &str = "incoming-psync-";

/// Above the repository's own backends (loose objects 1, packs 2), so that libgit2 writes the
/// fetch's packs here.
const PRIORITY: i32 = 100;

/// Numbers quarantines within the process.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// The quarantine of one fetch. Dropping it without [`keep`](Quarantine::keep) discards it.
#[derive(Debug)]
pub(crate) struct Quarantine {
    /// The repository's `objects` directory.
    objects: PathBuf,
    /// `objects/incoming-psync-<pid>-<n>`.
    dir: Option<PathBuf>,
}

impl Quarantine {
    /// Creates the directory and makes it the first pack backend of `repo`'s object database.
    pub fn open(repo: &Repository) -> Result<Quarantine, String> {
        let objects = repo.path().join("objects");
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = objects.join(name);
        std::fs::create_dir_all(dir.join("pack"))
            .map_err(|e| format!("could not create {}: {e}", dir.display()))?;
        let quarantine = Quarantine {
            objects,
            dir: Some(dir.clone()),
        };
        let odb = repo.odb().map_err(|e| e.message().to_owned())?;
        super::libgit2::add_pack_backend(&odb, &dir, PRIORITY)
            .map_err(|e| e.message().to_owned())?;
        Ok(quarantine)
    }

    /// Moves the fetch's packs into the repository's `objects/pack` and removes the quarantine.
    pub fn keep(mut self) -> std::io::Result<()> {
        let Some(dir) = self.dir.take() else {
            return Ok(());
        };
        let result = self.move_packs(&dir);
        remove(&dir);
        result
    }

    fn move_packs(&self, dir: &Path) -> std::io::Result<()> {
        let target = self.objects.join("pack");
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("pack"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                // Complete packs only: libgit2's temporary files (`pack_git2_*`) are left.
                name.is_some_and(|n| n.starts_with("pack-"))
            })
            .collect();
        // A reader finds a pack by its index: the index goes last.
        files.sort_by_key(|p| (p.extension().is_some_and(|x| x == "idx"), p.clone()));
        for file in files {
            let Some(name) = file.file_name() else {
                continue;
            };
            let to = target.join(name);
            if to.exists() {
                // The same pack (its name is its checksum) is there already.
                continue;
            }
            std::fs::rename(&file, &to)?;
        }
        Ok(())
    }
}

impl Drop for Quarantine {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            remove(&dir);
        }
    }
}

fn remove(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("could not remove {}: {e}", dir.display());
        }
    }
}

/// Removes the quarantine directories that processes which no longer run left in `objects`.
/// Returns how many it removed.
pub(crate) fn sweep(objects: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(objects) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !process_runs(pid) {
            remove(&entry.path());
            removed += 1;
        }
    }
    removed
}

/// Whether a process with this id runs (on Linux, by `/proc`; elsewhere assumed to).
pub(crate) fn process_runs(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_of_dead_processes_are_swept_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let objects = dir.path();
        // No process has this id on Linux (pid_max is at most 2^22).
        let dead = objects.join(format!("{PREFIX}{}-0", u32::MAX - 1));
        let ours = objects.join(format!("{PREFIX}{}-7", std::process::id()));
        let other = objects.join("incoming-other-1");
        for d in [&dead, &ours, &other] {
            std::fs::create_dir_all(d.join("pack")).unwrap();
            std::fs::write(d.join("pack/pack-x.pack"), b"x").unwrap();
        }
        let expected = usize::from(cfg!(target_os = "linux"));
        assert_eq!(sweep(objects), expected);
        assert_eq!(dead.exists(), !cfg!(target_os = "linux"));
        assert!(ours.exists(), "our own process's quarantine is in use");
        assert!(other.exists(), "not ours");
    }
}
