//! Every engine setting as a command-line flag. Unset flags keep the library's defaults.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use purgatory_sync::{DomainLimits, EngineBuilder};

/// A duration such as `500ms`, `30s`, `2m`, `1h 30m` (humantime syntax).
fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (examples: 500ms, 30s, 2m)"))
}

/// `HOST=CONCURRENT/PER_MINUTE[/BURST]`, such as `git.example.com=2/10/1`.
#[derive(Debug, Clone)]
pub struct DomainOverride {
    pub domain: String,
    pub limits: DomainLimits,
}

fn domain_override(s: &str) -> Result<DomainOverride, String> {
    let usage = "expected HOST=CONCURRENT/PER_MINUTE[/BURST], such as git.example.com=2/10/1";
    let (domain, limits) = s.split_once('=').ok_or_else(|| format!("`{s}`: {usage}"))?;
    let parts: Vec<&str> = limits.split('/').collect();
    let num = |i: usize, what: &str| -> Result<u32, String> {
        parts[i]
            .trim()
            .parse::<u32>()
            .map_err(|_| format!("`{s}`: {what} `{}` is not a number; {usage}", parts[i]))
    };
    if domain.trim().is_empty() || !(2..=3).contains(&parts.len()) {
        return Err(format!("`{s}`: {usage}"));
    }
    let mut limits = DomainLimits::new(num(0, "CONCURRENT")? as usize, num(1, "PER_MINUTE")?);
    if parts.len() == 3 {
        limits = limits.burst(num(2, "BURST")?);
    }
    Ok(DomainOverride {
        domain: domain.trim().to_owned(),
        limits,
    })
}

/// The engine's settings. Each maps to the [`EngineBuilder`] method of the same name; the
/// library checks the values when the engine is built.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Engine settings")]
pub struct EngineArgs {
    /// Fetch worker threads, the most fetches at once [default: 32]
    #[arg(long, value_name = "N", env = "PURGATORY_SYNC_WORKERS")]
    pub workers: Option<usize>,
    /// How often the scheduler wakes without a command [default: 1s]
    #[arg(long, value_parser = duration, value_name = "DURATION", env = "PURGATORY_SYNC_TICK")]
    pub tick: Option<Duration>,
    /// First-attempt delay for events a user pushed to this relay [default: 180s]
    #[arg(long, value_parser = duration, value_name = "DURATION", env = "PURGATORY_SYNC_USER_DELAY")]
    pub user_delay: Option<Duration>,
    /// First-attempt delay for events synced from other relays [default: 500ms]
    #[arg(long, value_parser = duration, value_name = "DURATION", env = "PURGATORY_SYNC_SYNC_DELAY")]
    pub sync_delay: Option<Duration>,
    /// Wait after the first incomplete attempt, doubling up to --backoff-cap [default: 20s]
    #[arg(long, value_parser = duration, value_name = "DURATION", env = "PURGATORY_SYNC_BACKOFF_BASE")]
    pub backoff_base: Option<Duration>,
    /// Longest wait between attempts [default: 2m]
    #[arg(long, value_parser = duration, value_name = "DURATION", env = "PURGATORY_SYNC_BACKOFF_CAP")]
    pub backoff_cap: Option<Duration>,
    /// How long an event waits for its objects before it expires [default: 30m]
    #[arg(long, value_parser = duration, value_name = "DURATION", env = "PURGATORY_SYNC_EVENT_LIFETIME")]
    pub event_lifetime: Option<Duration>,
    /// How long an expired event id is remembered: a synced re-submission whose data is still
    /// missing is refused meanwhile [default: 7d]
    #[arg(long, value_parser = duration, value_name = "DURATION", env = "PURGATORY_SYNC_EXPIRED_MEMORY")]
    pub expired_memory: Option<Duration>,
    /// Wall-clock limit of one fetch [default: 2m]
    #[arg(long, value_parser = duration, value_name = "DURATION", env = "PURGATORY_SYNC_FETCH_DEADLINE")]
    pub fetch_deadline: Option<Duration>,
    /// Limit for opening a connection [default: 10s]
    #[arg(long, value_parser = duration, value_name = "DURATION", env = "PURGATORY_SYNC_CONNECT_TIMEOUT")]
    pub connect_timeout: Option<Duration>,
    /// Limit for one read or write to stall [default: 30s]
    #[arg(long, value_parser = duration, value_name = "DURATION", env = "PURGATORY_SYNC_IO_TIMEOUT")]
    pub io_timeout: Option<Duration>,
    /// How long shutdown waits for fetches in flight to cancel [default: 10s]
    #[arg(long, value_parser = duration, value_name = "DURATION", env = "PURGATORY_SYNC_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<Duration>,
    /// Most bytes one fetch may receive [default: 1 GiB]
    #[arg(long, value_name = "BYTES", env = "PURGATORY_SYNC_MAX_FETCH_BYTES")]
    pub max_fetch_bytes: Option<u64>,
    /// Most memory libgit2 may hold for one fetch [default: 512 MiB]
    #[arg(long, value_name = "BYTES", env = "PURGATORY_SYNC_MAX_FETCH_MEMORY")]
    pub max_fetch_memory: Option<u64>,
    /// Most memory libgit2 may hold for all fetches together [default: 4 GiB]
    #[arg(
        long,
        value_name = "BYTES",
        env = "PURGATORY_SYNC_MAX_TOTAL_FETCH_MEMORY"
    )]
    pub max_total_fetch_memory: Option<u64>,
    /// Largest object a delta may build, process-wide [default: 100 MiB]
    #[arg(long, value_name = "BYTES", env = "PURGATORY_SYNC_MAX_OBJECT_SIZE")]
    pub max_object_size: Option<u64>,
    /// Largest ref advertisement a server may send [default: 32 MiB]
    #[arg(
        long,
        value_name = "BYTES",
        env = "PURGATORY_SYNC_MAX_ADVERTISEMENT_BYTES"
    )]
    pub max_advertisement_bytes: Option<u64>,
    /// Fetch only the last N commits of history (shallow) [default: full history]
    #[arg(long, value_name = "N", env = "PURGATORY_SYNC_FETCH_DEPTH")]
    pub fetch_depth: Option<u32>,
    /// Prefix of the engine's thread names, 1 to 8 characters [default: psync]
    #[arg(long, value_name = "PREFIX", env = "PURGATORY_SYNC_THREAD_NAME")]
    pub thread_name: Option<String>,
    /// Per-domain limit on fetches in flight [default: 5]
    #[arg(long, value_name = "N", env = "PURGATORY_SYNC_DOMAIN_CONCURRENCY")]
    pub domain_concurrency: Option<usize>,
    /// Per-domain fetch starts a minute [default: 30]
    #[arg(long, value_name = "N", env = "PURGATORY_SYNC_DOMAIN_PER_MINUTE")]
    pub domain_per_minute: Option<u32>,
    /// Per-domain burst after a quiet spell [default: 5]
    #[arg(long, value_name = "N", env = "PURGATORY_SYNC_DOMAIN_BURST")]
    pub domain_burst: Option<u32>,
    /// Limits for one domain: HOST=CONCURRENT/PER_MINUTE[/BURST] (repeatable)
    #[arg(long = "domain", value_parser = domain_override, value_name = "HOST=C/M[/B]", env = "PURGATORY_SYNC_DOMAIN")]
    pub domain_overrides: Vec<DomainOverride>,
    /// This relay's own domain, never fetched from: HOST (every port of it), HOST:PORT or
    /// [IPV6]:PORT (only that port)
    #[arg(long, value_name = "HOST[:PORT]", env = "PURGATORY_SYNC_OUR_DOMAIN")]
    pub our_domain: Option<String>,
    /// How long a domain with DNS or TLS failures is skipped [default: 12h]
    #[arg(long, value_parser = duration, value_name = "DURATION", env = "PURGATORY_SYNC_NAUGHTY_DURATION")]
    pub naughty_duration: Option<Duration>,
    /// How long an idle domain keeps its statistics and metrics series [default: 1h]
    #[arg(long, value_parser = duration, value_name = "DURATION", env = "PURGATORY_SYNC_DOMAIN_RETENTION")]
    pub domain_retention: Option<Duration>,
    /// Allow clone URLs on loopback and private addresses (off by default)
    #[arg(long, env = "PURGATORY_SYNC_ALLOW_PRIVATE_ADDRESSES")]
    pub allow_private_addresses: bool,
    /// URL schemes that may be fetched, comma-separated [default: https,http,git]
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "SCHEMES",
        env = "PURGATORY_SYNC_ALLOWED_SCHEMES"
    )]
    pub allowed_schemes: Option<Vec<String>>,
    /// Most events waiting at once [default: 1000000]
    #[arg(long, value_name = "N", env = "PURGATORY_SYNC_MAX_EVENTS")]
    pub max_events: Option<usize>,
    /// Most object ids one event may wait for [default: 1024]
    #[arg(long, value_name = "N", env = "PURGATORY_SYNC_MAX_OIDS_PER_EVENT")]
    pub max_oids_per_event: Option<usize>,
    /// Most clone URLs one event may list [default: 64]
    #[arg(long, value_name = "N", env = "PURGATORY_SYNC_MAX_URLS_PER_EVENT")]
    pub max_urls_per_event: Option<usize>,
    /// Most distinct clone URLs the waiting events of one identifier may list [default: 256]
    #[arg(long, value_name = "N", env = "PURGATORY_SYNC_MAX_URLS_PER_IDENTIFIER")]
    pub max_urls_per_identifier: Option<usize>,
    /// Most ref updates one event may carry [default: 256]
    #[arg(
        long,
        value_name = "N",
        env = "PURGATORY_SYNC_MAX_REF_UPDATES_PER_EVENT"
    )]
    pub max_ref_updates_per_event: Option<usize>,
    /// Keep the engine's state in this file: a restart resumes the waiting events
    #[arg(long, value_name = "FILE", env = "PURGATORY_SYNC_STATE_FILE")]
    pub state_file: Option<PathBuf>,
    /// How often the state file is written while running [default: 60s]
    #[arg(long, value_parser = duration, value_name = "DURATION", env = "PURGATORY_SYNC_CHECKPOINT_INTERVAL")]
    pub checkpoint_interval: Option<Duration>,
    /// Rename an unreadable state file aside and start empty (instead of failing)
    #[arg(long, env = "PURGATORY_SYNC_MOVE_UNREADABLE_STATE_ASIDE")]
    pub move_unreadable_state_aside: bool,
    /// Do not add `transfer.hideRefs = refs/purgatory-sync/` to the relay repositories'
    /// configuration: the engine's temporary refs are then advertised to their clients
    #[arg(long, env = "PURGATORY_SYNC_NO_HIDE_TEMP_REFS")]
    pub no_hide_temp_refs: bool,
}

impl EngineArgs {
    /// Applies the flags that were given to `b`.
    pub fn apply(&self, mut b: EngineBuilder) -> EngineBuilder {
        macro_rules! set {
            ($($field:ident),* $(,)?) => {
                $(if let Some(v) = self.$field.clone() {
                    b = b.$field(v);
                })*
            };
        }
        set!(
            workers,
            tick,
            user_delay,
            sync_delay,
            backoff_base,
            backoff_cap,
            event_lifetime,
            expired_memory,
            fetch_deadline,
            connect_timeout,
            io_timeout,
            shutdown_timeout,
            max_fetch_bytes,
            max_fetch_memory,
            max_total_fetch_memory,
            max_object_size,
            max_advertisement_bytes,
            thread_name,
            domain_burst,
            naughty_duration,
            domain_retention,
            max_events,
            max_oids_per_event,
            max_urls_per_event,
            max_urls_per_identifier,
            max_ref_updates_per_event,
            state_file,
            checkpoint_interval,
            allowed_schemes,
        );
        if let Some(depth) = self.fetch_depth {
            b = b.fetch_depth(Some(depth));
        }
        if self.domain_concurrency.is_some() || self.domain_per_minute.is_some() {
            let defaults = DomainLimits::default();
            b = b.domain_limits(
                self.domain_concurrency.unwrap_or(defaults.max_concurrent),
                self.domain_per_minute.unwrap_or(defaults.per_minute),
            );
        }
        for o in &self.domain_overrides {
            b = b.domain_override(&o.domain, o.limits);
        }
        if let Some(domain) = &self.our_domain {
            b = b.our_domain(domain);
        }
        if self.allow_private_addresses {
            b = b.allow_private_addresses(true);
        }
        if self.move_unreadable_state_aside {
            b = b.move_unreadable_state_aside(true);
        }
        if self.no_hide_temp_refs {
            b = b.hide_temp_refs(false);
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_override_parses_and_names_what_is_wrong() {
        let o = domain_override("git.example.com=2/10/1").unwrap();
        assert_eq!(o.domain, "git.example.com");
        assert_eq!(o.limits.max_concurrent, 2);
        assert_eq!(o.limits.per_minute, 10);
        assert_eq!(o.limits.burst, 1);
        assert!(domain_override("git.example.com")
            .unwrap_err()
            .contains("HOST=CONCURRENT"));
        assert!(domain_override("h=2/x")
            .unwrap_err()
            .contains("PER_MINUTE `x`"));
        assert!(domain_override("=2/3").is_err());
        assert!(domain_override("h=1/2/3/4").is_err());
    }

    #[test]
    fn durations_use_humantime() {
        assert_eq!(duration("1m 30s").unwrap(), Duration::from_secs(90));
        assert_eq!(duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(duration("soon").unwrap_err().contains("soon"));
    }
}
