//! The wall clock the plugin sees.
//!
//! Replaying a captured callback needs the plugin to believe it is the moment the callback was
//! sent (signatures carry timestamps that go stale). The clock therefore starts at an injected
//! instant and then advances in real time, so timeouts and token expiry still behave.

use std::time::{Duration, Instant, SystemTime};
use wasmtime_wasi::HostWallClock;

#[derive(Clone, Copy, Debug)]
pub struct ReplayClock {
    start: Duration,
    origin: Instant,
}

impl ReplayClock {
    /// A clock that reads `unix_secs` now.
    pub fn starting_at(unix_secs: u64) -> ReplayClock {
        ReplayClock {
            start: Duration::from_secs(unix_secs),
            origin: Instant::now(),
        }
    }

    pub fn now(&self) -> Duration {
        self.start + self.origin.elapsed()
    }
}

impl HostWallClock for ReplayClock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }

    fn now(&self) -> Duration {
        ReplayClock::now(self)
    }
}

/// The real time as a Unix duration; a clock before 1970 reads as 0 rather than failing.
pub fn system_now() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_the_injected_instant_and_advances() {
        let clock = ReplayClock::starting_at(1_700_000_000);
        let a = clock.now();
        assert!(a >= Duration::from_secs(1_700_000_000));
        assert!(a < Duration::from_secs(1_700_000_001));
        std::thread::sleep(Duration::from_millis(5));
        assert!(clock.now() > a);
    }
}
