//! Token-bucket rate limiting for devices, with Firecracker's semantics:
//!
//! - A bucket holds up to `size` tokens and refills continuously at `size` per
//!   `refill_time`; it starts full. An initial `one_time_burst` is spent first and never
//!   refills.
//! - A request that needs more tokens than the bucket holds is refused, and the limiter
//!   blocks: a one-shot timer (100 ms) unblocks it, and until then every request is
//!   refused. The device leaves the request on its queue and retries when the timer fires
//!   on the event loop: no polling.
//! - A request larger than the whole bucket can never fit, so it is let through
//!   ("over-consumption"): it empties the bucket and blocks the limiter for as long as
//!   refilling the excess takes.
//! - A request needs both buckets: when the ops bucket granted its token and the bytes
//!   bucket then refuses, the op token is given back.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::config::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
use crate::snapshot::devices::{BucketState, LimiterState};

/// How long a limiter that refused a request stays blocked (Firecracker's value).
pub const REFILL_TIMER: Duration = Duration::from_millis(100);

const NS_PER_MS: u64 = 1_000_000;

/// Greatest common divisor, for keeping refill arithmetic in small exact integers.
fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// What taking tokens from a bucket did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Take {
    Granted,
    Refused,
    /// Granted beyond the bucket's size; the limiter waits this long before the next.
    Overdrawn(Duration),
}

/// One token bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    size: u64,
    initial_burst: u64,
    refill_ms: u64,
    burst: u64,
    budget: u64,
    last_refill: Instant,
    /// `size` tokens per `refill_ms` ms as the smallest ratio of tokens to nanoseconds,
    /// so a refill never loses a fraction of a token to rounding.
    tokens_per: u64,
    ns_per: u64,
}

impl TokenBucket {
    /// None when the config limits nothing (size or refill time 0) or overflows.
    pub fn new(cfg: &TokenBucketConfig) -> Option<TokenBucket> {
        if !cfg.is_active() {
            return None;
        }
        let refill_ns = cfg.refill_time.checked_mul(NS_PER_MS)?;
        let g = gcd(cfg.size, refill_ns);
        let burst = cfg.one_time_burst.unwrap_or(0);
        Some(TokenBucket {
            size: cfg.size,
            initial_burst: burst,
            refill_ms: cfg.refill_time,
            burst,
            budget: cfg.size,
            last_refill: Instant::now(),
            tokens_per: cfg.size / g,
            ns_per: refill_ns / g,
        })
    }

    /// The tokens now in the bucket (the burst aside).
    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Adds what has trickled in since the last refill. The clock only moves on by the
    /// time the whole tokens added stand for, so fractions accumulate instead of vanishing.
    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.last_refill).as_nanos();
        if elapsed >= u128::from(self.refill_ms) * u128::from(NS_PER_MS) {
            self.budget = self.size;
            self.last_refill = now;
            return;
        }
        let tokens = elapsed * u128::from(self.tokens_per) / u128::from(self.ns_per);
        // The time those tokens took, rounded up, is never more than `elapsed`.
        let used_ns = (tokens * u128::from(self.ns_per)).div_ceil(u128::from(self.tokens_per));
        self.last_refill += Duration::from_nanos(u64::try_from(used_ns).unwrap_or(u64::MAX));
        let tokens = u64::try_from(tokens).unwrap_or(u64::MAX);
        self.budget = self.budget.saturating_add(tokens).min(self.size);
    }

    /// The bucket's level, for a snapshot.
    pub fn save(&self) -> BucketState {
        let elapsed = Instant::now().saturating_duration_since(self.last_refill);
        BucketState {
            budget: self.budget,
            one_time_burst: self.burst,
            elapsed_ns: u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
        }
    }

    /// Puts a saved level back on a bucket built from the same configuration. A level
    /// this bucket could never reach (more than its size or burst) is refused; the time
    /// since the last refill counts on from where it was (at most a whole refill time,
    /// which already refills the bucket completely).
    pub fn restore(&mut self, s: &BucketState) -> Result<(), String> {
        if s.budget > self.size || s.one_time_burst > self.initial_burst {
            return Err(format!(
                "a token bucket with {} tokens and {} of burst left, where its size is {} and its burst {}",
                s.budget, s.one_time_burst, self.size, self.initial_burst
            ));
        }
        let max = self.refill_ms.saturating_mul(NS_PER_MS);
        let elapsed = Duration::from_nanos(s.elapsed_ns.min(max));
        let now = Instant::now();
        self.budget = s.budget;
        self.burst = s.one_time_burst;
        self.last_refill = now.checked_sub(elapsed).unwrap_or(now);
        Ok(())
    }

    /// Takes `tokens`: from the one-time burst first, then from the budget.
    pub fn take(&mut self, mut tokens: u64) -> Take {
        if self.burst > 0 {
            if self.burst >= tokens {
                self.burst -= tokens;
                self.last_refill = Instant::now();
                return Take::Granted;
            }
            tokens -= self.burst;
            self.burst = 0;
        }
        if tokens > self.budget {
            self.refill();
            if tokens > self.size {
                // It can never fit: let it through and make the device wait the time the
                // excess takes to refill.
                let excess = tokens - self.budget;
                self.budget = 0;
                let ms = u128::from(excess) * u128::from(self.refill_ms) / u128::from(self.size);
                return Take::Overdrawn(Duration::from_millis(
                    u64::try_from(ms).unwrap_or(u64::MAX),
                ));
            }
            if tokens > self.budget {
                return Take::Refused;
            }
        }
        self.budget -= tokens;
        Take::Granted
    }

    /// Gives back tokens a request took but did not use.
    pub fn give_back(&mut self, tokens: u64) {
        if self.burst > 0 {
            self.burst = self.burst.saturating_add(tokens).min(self.initial_burst);
        } else {
            self.budget = self.budget.saturating_add(tokens).min(self.size);
        }
    }
}

/// A one-shot CLOCK_MONOTONIC timerfd, non-blocking so a late or spurious read cannot
/// stall the event loop.
#[derive(Debug)]
pub struct Timer(OwnedFd);

impl Timer {
    pub fn new() -> std::io::Result<Timer> {
        // SAFETY: timerfd_create takes no pointers; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nothing else owns.
        Ok(Timer(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Fires once after `after` (a zero duration is rounded up: zero would disarm).
    pub fn arm(&self, after: Duration) -> std::io::Result<()> {
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: libc::time_t::try_from(after.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: libc::c_long::from(after.subsec_nanos().min(999_999_999) as i32),
            },
        };
        // SAFETY: a valid itimerspec on our timerfd; no old value is asked for.
        let r =
            unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Consumes an expiry; false if the timer had not fired.
    pub fn expired(&self) -> bool {
        let mut n = 0u64;
        // SAFETY: reads at most 8 bytes into `n` from our non-blocking timerfd.
        let r = unsafe { libc::read(self.0.as_raw_fd(), (&raw mut n).cast(), 8) };
        r == 8
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Which bucket a request draws on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tokens {
    Bytes,
    Ops,
}

/// A device's limiter: a bytes bucket, an ops bucket, and the timer that ends a block.
/// With neither bucket it lets everything through (and its timer is never armed).
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: Timer,
    blocked: bool,
}

impl RateLimiter {
    pub fn new(cfg: Option<&RateLimiterConfig>) -> std::io::Result<RateLimiter> {
        let mut rl = RateLimiter {
            bandwidth: None,
            ops: None,
            timer: Timer::new()?,
            blocked: false,
        };
        if let Some(cfg) = cfg {
            rl.set(cfg);
        }
        Ok(rl)
    }

    /// Replaces both buckets (each starts full, as a new bucket does in Firecracker).
    pub fn set(&mut self, cfg: &RateLimiterConfig) {
        self.bandwidth = cfg.bandwidth.as_ref().and_then(TokenBucket::new);
        self.ops = cfg.ops.as_ref().and_then(TokenBucket::new);
    }

    pub fn is_active(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }

    /// Whether the limiter waits for its timer (every request is refused meanwhile).
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    fn block_for(&mut self, d: Duration) {
        match self.timer.arm(d) {
            Ok(()) => self.blocked = true,
            // Without a timer nothing would unblock the device: let traffic through.
            Err(e) => log::error!("rate limiter: cannot arm its timer: {e}"),
        }
    }

    fn bucket(&mut self, kind: Tokens) -> Option<&mut TokenBucket> {
        match kind {
            Tokens::Bytes => self.bandwidth.as_mut(),
            Tokens::Ops => self.ops.as_mut(),
        }
    }

    /// Takes `n` tokens of `kind`; false (and blocked until the timer fires) if the
    /// bucket cannot give them now.
    pub fn consume(&mut self, n: u64, kind: Tokens) -> bool {
        if self.blocked {
            return false;
        }
        let Some(bucket) = self.bucket(kind) else {
            return true;
        };
        match bucket.take(n) {
            Take::Granted => true,
            Take::Refused => {
                self.block_for(REFILL_TIMER);
                false
            }
            Take::Overdrawn(wait) => {
                self.block_for(wait);
                true
            }
        }
    }

    /// One request of `bytes` bytes: an op token and `bytes` byte tokens, or neither.
    pub fn consume_request(&mut self, bytes: u64) -> bool {
        if !self.consume(1, Tokens::Ops) {
            return false;
        }
        if bytes > 0 && !self.consume(bytes, Tokens::Bytes) {
            if let Some(b) = self.bucket(Tokens::Ops) {
                b.give_back(1);
            }
            return false;
        }
        true
    }

    /// Gives back tokens taken for work that did not happen.
    pub fn give_back(&mut self, n: u64, kind: Tokens) {
        if let Some(b) = self.bucket(kind) {
            b.give_back(n);
        }
    }

    /// The timer fired (event loop): the limiter accepts requests again. False for a
    /// spurious wakeup.
    pub fn timer_fired(&mut self) -> bool {
        if self.timer.expired() {
            self.blocked = false;
            true
        } else {
            false
        }
    }

    /// Both buckets' levels, for a snapshot. Whether the limiter was blocked is not
    /// kept: a restored device retries its queues at once, and a bucket still short of
    /// tokens blocks it again.
    pub fn save(&self) -> LimiterState {
        LimiterState {
            bandwidth: self.bandwidth.as_ref().map(TokenBucket::save),
            ops: self.ops.as_ref().map(TokenBucket::save),
        }
    }

    /// Puts saved levels back on a limiter built from the same configuration: each bucket
    /// the configuration has must have a level, and no other.
    pub fn restore(&mut self, s: &LimiterState) -> Result<(), String> {
        fn one(
            name: &str,
            bucket: Option<&mut TokenBucket>,
            saved: Option<&BucketState>,
        ) -> Result<(), String> {
            match (bucket, saved) {
                (None, None) => Ok(()),
                (Some(b), Some(s)) => b.restore(s).map_err(|e| format!("{name}: {e}")),
                (Some(_), None) => Err(format!("no level for the {name} bucket")),
                (None, Some(_)) => Err(format!(
                    "a level for a {name} bucket the configuration does not have"
                )),
            }
        }
        one("bandwidth", self.bandwidth.as_mut(), s.bandwidth.as_ref())?;
        one("ops", self.ops.as_mut(), s.ops.as_ref())
    }

    /// The timer's fd, for the event loop.
    pub fn fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tb(size: u64, burst: u64, refill: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst: (burst > 0).then_some(burst),
            refill_time: refill,
        }
    }

    #[test]
    fn bucket_refills_at_its_rate() {
        assert!(TokenBucket::new(&tb(0, 0, 100)).is_none());
        assert!(TokenBucket::new(&tb(10, 0, 0)).is_none());
        assert!(TokenBucket::new(&tb(10, 0, u64::MAX)).is_none());
        let mut b = TokenBucket::new(&tb(1000, 0, 100)).unwrap();
        assert_eq!(b.take(1000), Take::Granted);
        assert_eq!(b.take(1), Take::Refused);
        std::thread::sleep(Duration::from_millis(50));
        // About 500 tokens came back in 50 ms (the machine may be slow: at least that).
        assert_eq!(b.take(400), Take::Granted);
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(b.take(1000), Take::Granted);
        assert_eq!(b.budget(), 0);
    }

    #[test]
    fn burst_first_then_budget_and_overdraw() {
        let mut b = TokenBucket::new(&tb(100, 50, 1000)).unwrap();
        assert_eq!(b.take(30), Take::Granted);
        assert_eq!(b.burst(), 20);
        // 20 from the burst, 30 from the budget.
        assert_eq!(b.take(50), Take::Granted);
        assert_eq!((b.burst(), b.budget()), (0, 70));
        b.give_back(10);
        assert_eq!(b.budget(), 80);
        // 280 tokens from a bucket of 100: granted, 200 short, 2 s of refill to wait.
        match b.take(280) {
            Take::Overdrawn(d) => assert!(d >= Duration::from_millis(1990), "{d:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(b.budget(), 0);
    }

    #[test]
    fn limiter_blocks_until_its_timer_fires() {
        let cfg = RateLimiterConfig {
            bandwidth: Some(tb(1000, 0, 100)),
            ops: Some(tb(10, 0, 1000)),
        };
        let mut rl = RateLimiter::new(Some(&cfg)).unwrap();
        assert!(rl.consume_request(600));
        // Bytes refused: the op token goes back, and the limiter blocks.
        assert!(!rl.consume_request(600));
        assert!(rl.is_blocked());
        assert_eq!(rl.ops.as_ref().unwrap().budget(), 9);
        assert!(!rl.consume_request(1));
        assert!(!rl.timer_fired());
        let mut p = libc::pollfd {
            fd: rl.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 1000) }, 1);
        assert!(rl.timer_fired());
        assert!(!rl.is_blocked());
        assert!(rl.consume_request(600));

        // No buckets: nothing is limited, the timer is never armed.
        let mut free = RateLimiter::new(None).unwrap();
        assert!(!free.is_active());
        for _ in 0..1000 {
            assert!(free.consume_request(1 << 20));
        }
        // PATCH switches a bucket on.
        free.set(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(tb(1, 0, 1000)),
        });
        assert!(free.consume_request(4096));
        assert!(!free.consume_request(4096));
    }

    /// A snapshot keeps each bucket's level: a limiter restored from it refuses what the
    /// saved one would have, and a level the configuration cannot hold is refused.
    #[test]
    fn levels_survive_save_and_restore() {
        let cfg = RateLimiterConfig {
            // Slow refills (200 bytes take 20 s): a loaded machine cannot blur the levels.
            bandwidth: Some(tb(1000, 500, 100_000)),
            ops: Some(tb(10, 0, 100_000)),
        };
        let mut rl = RateLimiter::new(Some(&cfg)).unwrap();
        assert!(rl.consume_request(700));
        assert!(rl.consume_request(100));
        let saved = rl.save();
        let bw = saved.bandwidth.unwrap();
        // The burst went first (500 of the 700), the rest from the budget.
        assert_eq!((bw.budget, bw.one_time_burst), (700, 0));
        assert_eq!(saved.ops.unwrap().budget, 8);

        let mut back = RateLimiter::new(Some(&cfg)).unwrap();
        back.restore(&saved).unwrap();
        assert_eq!(back.save().bandwidth.unwrap().budget, 700);
        // 900 bytes do not fit the 700 left (a fresh limiter would grant them).
        assert!(!back.consume_request(900));
        assert!(RateLimiter::new(Some(&cfg)).unwrap().consume_request(900));

        // Levels the configuration cannot hold, or buckets it does not have.
        let mut bad = saved;
        bad.ops.as_mut().unwrap().budget = 11;
        assert!(back.restore(&bad).unwrap_err().contains("ops"));
        let mut bad = saved;
        bad.bandwidth.as_mut().unwrap().one_time_burst = 501;
        assert!(back.restore(&bad).is_err());
        let mut bad = saved;
        bad.ops = None;
        assert!(back.restore(&bad).unwrap_err().contains("no level"));
        let mut none = RateLimiter::new(None).unwrap();
        assert!(none.restore(&saved).is_err());
        none.restore(&LimiterState::default()).unwrap();
        // A huge elapsed time is only a full refill.
        let mut long = saved;
        long.ops.as_mut().unwrap().elapsed_ns = u64::MAX;
        back.restore(&long).unwrap();
    }
}
