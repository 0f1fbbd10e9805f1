//! The per-user limits enforced at the gRPC edge: PlaceBet/CancelBet rate,
//! stream-open rate, and live streams per user and per connection
//! (`betting_config::UserLimits`; the open-bets cap and the minimum stake
//! are the betting service's, since they need the request's meaning).
//!
//! Memory stays bounded whatever the number of distinct users:
//!
//! - rate state is a token bucket per user in a fixed number of shards; a
//!   shard that grows past [`SHARD_CAPACITY`] drops its full buckets (a full
//!   bucket is the same as none), and if every bucket in it is in use it is
//!   cleared: those users get a fresh burst, so under such a flood the limit
//!   is soft for them, never a leak.
//! - stream counts hold one entry per user and per connection that has a
//!   live stream, removed when its last stream ends.
//!
//! Every refusal is a [`LimitError`] answered through `betting_api::to_status`
//! (RESOURCE_EXHAUSTED with a reason, and a RetryInfo for rate limits).

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use betting_config::UserLimits;
use betting_domain::LimitError;
use std::time::Instant;

/// Shards of each bucket table: few enough to be cheap, enough that
/// concurrent requests rarely share a lock.
const SHARDS: usize = 32;
/// Buckets a shard holds before it is swept: 32 × 8192 users active at once.
const SHARD_CAPACITY: usize = 8192;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state is counters only: a panic elsewhere leaves it usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One user's tokens, refilled continuously.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A token bucket per user: `rate` tokens a second, up to `burst`.
#[derive(Debug)]
pub(crate) struct RateLimit {
    rate: f64,
    burst: f64,
    shards: Vec<Mutex<HashMap<i64, Bucket>>>,
    hasher: std::collections::hash_map::RandomState,
}

impl RateLimit {
    /// `rate` 0 turns the limit off. A burst below one would refuse
    /// everything, so it is at least one.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Takes one of `user`'s tokens, or says how long until there is one.
    pub fn take(&self, user: i64) -> Result<(), LimitError> {
        self.take_at(user, Instant::now())
    }

    fn take_at(&self, user: i64, now: Instant) -> Result<(), LimitError> {
        if self.rate == 0.0 {
            return Ok(());
        }
        let shard = &self.shards[self.hasher.hash_one(user) as usize % SHARDS];
        let mut buckets = lock(shard);
        if buckets.len() >= SHARD_CAPACITY && !buckets.contains_key(&user) {
            self.sweep(&mut buckets, now);
        }
        let bucket = buckets.entry(user).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refilled =
            bucket.tokens + now.saturating_duration_since(bucket.at).as_secs_f64() * self.rate;
        bucket.tokens = refilled.min(self.burst);
        bucket.at = bucket.at.max(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / self.rate;
            Err(LimitError::RateLimited {
                // Whole milliseconds, rounded up, so a client that waits exactly this long gets in.
                retry_after: Duration::from_millis((wait * 1000.0).ceil() as u64),
            })
        }
    }

    /// Drops the buckets that refilled to the full burst (they say nothing a
    /// missing one would not); if none did, the whole shard.
    fn sweep(&self, buckets: &mut HashMap<i64, Bucket>, now: Instant) {
        let full_after = Duration::from_secs_f64(self.burst / self.rate);
        buckets.retain(|_, b| now.saturating_duration_since(b.at) < full_after);
        if buckets.len() >= SHARD_CAPACITY {
            tracing::warn!("rate-limit shard full of active users; cleared");
            buckets.clear();
        }
    }

    /// Buckets held, for the memory-bound test.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }
}

/// Live streams per key, with a ceiling; entries leave with their last stream.
#[derive(Debug)]
struct Counts<K> {
    max: u32,
    live: Mutex<HashMap<K, u32>>,
}

impl<K: Hash + Eq + Clone> Counts<K> {
    fn new(max: u32) -> Self {
        Self {
            max,
            live: Mutex::default(),
        }
    }

    fn acquire(&self, key: &K) -> bool {
        if self.max == 0 {
            return true;
        }
        let mut live = lock(&self.live);
        let count = live.entry(key.clone()).or_insert(0);
        // `max` > 0 here, so a refused key already had a count and an entry.
        if *count >= self.max {
            return false;
        }
        *count += 1;
        true
    }

    fn release(&self, key: &K) {
        if self.max == 0 {
            return;
        }
        let mut live = lock(&self.live);
        if let Some(count) = live.get_mut(key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                live.remove(key);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.live).len()
    }
}

/// The edge's limiter, shared by the BettingService and SettlementService
/// adapters (a user's WatchBets and WatchRound streams count together).
/// Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Limiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    bets: RateLimit,
    reads: RateLimit,
    opens: RateLimit,
    user_streams: Counts<i64>,
    connection_streams: Counts<SocketAddr>,
}

impl Limiter {
    pub fn new(limits: &UserLimits) -> Self {
        Self {
            inner: Arc::new(Inner {
                bets: RateLimit::new(limits.user_bet_rate, limits.user_bet_burst),
                reads: RateLimit::new(limits.user_read_rate, limits.user_read_burst),
                opens: RateLimit::new(limits.user_stream_open_rate, limits.user_stream_open_burst),
                user_streams: Counts::new(limits.user_max_streams),
                connection_streams: Counts::new(limits.connection_max_streams),
            }),
        }
    }

    /// A PlaceBet or CancelBet of `user`.
    pub fn bet_call(&self, user: i64) -> Result<(), LimitError> {
        self.inner.bets.take(user)
    }

    /// A GetRound, GetBet or ListBets of `user`.
    pub fn read_call(&self, user: i64) -> Result<(), LimitError> {
        self.inner.reads.take(user)
    }

    /// A WatchBets or WatchRound open by `user` (None: a caller with no
    /// user, a backend; only its connection counts) over `connection`.
    /// The open costs a token before anything else, even if the stream is
    /// then refused or reset at once: each open reads a snapshot, and this
    /// is what keeps an open-and-reset flood from becoming snapshot reads.
    /// The permit keeps the stream counted until it is dropped, with the
    /// stream.
    pub fn open_stream(
        &self,
        user: Option<i64>,
        connection: Option<SocketAddr>,
    ) -> Result<StreamPermit, LimitError> {
        if let Some(user) = user {
            self.inner.opens.take(user)?;
        }
        if let Some(addr) = connection
            && !self.inner.connection_streams.acquire(&addr)
        {
            return Err(LimitError::TooManyStreams {
                limit: self.inner.connection_streams.max,
                per: "connection",
            });
        }
        // From here on, dropping the permit releases what it holds.
        let mut permit = StreamPermit {
            inner: self.inner.clone(),
            user: None,
            connection,
        };
        if let Some(user) = user {
            if !self.inner.user_streams.acquire(&user) {
                return Err(LimitError::TooManyStreams {
                    limit: self.inner.user_streams.max,
                    per: "user",
                });
            }
            permit.user = Some(user);
        }
        Ok(permit)
    }

    /// Users and connections with a live stream counted here.
    #[cfg(test)]
    fn tracked(&self) -> (usize, usize) {
        (
            self.inner.user_streams.len(),
            self.inner.connection_streams.len(),
        )
    }
}

/// A live stream's place in the counts; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct StreamPermit {
    inner: Arc<Inner>,
    user: Option<i64>,
    connection: Option<SocketAddr>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        if let Some(user) = self.user {
            self.inner.user_streams.release(&user);
        }
        if let Some(addr) = self.connection {
            self.inner.connection_streams.release(&addr);
        }
    }
}

/// A response stream that holds its [`StreamPermit`] for as long as tonic
/// holds the stream (until it ends or the client goes away).
pub(crate) struct Permitted<S> {
    stream: S,
    _permit: StreamPermit,
}

impl<S> Permitted<S> {
    pub fn new(stream: S, permit: StreamPermit) -> Self {
        Self {
            stream,
            _permit: permit,
        }
    }
}

impl<S: futures::Stream + Unpin> futures::Stream for Permitted<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.stream).poll_next(cx)
    }
}

/// The user a caller's calls are charged to: a player's own id. Other roles
/// (our services, game servers, cashiers, operators) have no per-user
/// budget; their streams count per connection only.
fn limited_user(principal: &betting_auth::Principal) -> Option<i64> {
    principal
        .user_id
        .filter(|_| principal.role == betting_auth::Role::Player)
        .map(|u| u.get())
}

/// A PlaceBet or CancelBet charged to a player's bet rate.
pub(crate) fn charge_bet(
    limiter: &Limiter,
    principal: &betting_auth::Principal,
) -> Result<(), tonic::Status> {
    limited_user(principal).map_or(Ok(()), |user| {
        limiter
            .bet_call(user)
            .map_err(|e| betting_api::to_status(&e))
    })
}

/// A read (GetRound, GetBet, ListBets) charged to a player's read rate.
pub(crate) fn charge_read(
    limiter: &Limiter,
    principal: &betting_auth::Principal,
) -> Result<(), tonic::Status> {
    limited_user(principal).map_or(Ok(()), |user| {
        limiter
            .read_call(user)
            .map_err(|e| betting_api::to_status(&e))
    })
}

/// A WatchBets or WatchRound open, as the adapters check it: a player is
/// limited per user and per connection; any other role per connection only.
pub(crate) fn open_stream(
    limiter: &Limiter,
    principal: &betting_auth::Principal,
    remote: Option<SocketAddr>,
) -> Result<StreamPermit, tonic::Status> {
    limiter
        .open_stream(limited_user(principal), remote)
        .map_err(|e| betting_api::to_status(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> UserLimits {
        UserLimits {
            user_bet_rate: 10,
            user_bet_burst: 3,
            user_stream_open_rate: 1,
            user_stream_open_burst: 100,
            user_max_streams: 2,
            connection_max_streams: 3,
            ..UserLimits::off()
        }
    }

    #[test]
    fn a_burst_then_the_rate_then_a_refusal_with_a_retry_delay() {
        let limiter = Limiter::new(&limits());
        let bets = &limiter.inner.bets;
        let start = Instant::now();
        for _ in 0..3 {
            bets.take_at(7, start).expect("within the burst");
        }
        let Err(LimitError::RateLimited { retry_after }) = bets.take_at(7, start) else {
            panic!("the fourth call at once is over the burst");
        };
        assert_eq!(retry_after, Duration::from_millis(100));
        // Another user is not affected.
        bets.take_at(8, start).expect("own bucket");
        let later = start + retry_after;
        bets.take_at(7, later).expect("refilled one token");
        assert!(bets.take_at(7, later).is_err());
    }

    #[test]
    fn zero_turns_every_limit_off() {
        let limiter = Limiter::new(&UserLimits::off());
        let mut permits = Vec::new();
        for _ in 0..10_000 {
            limiter.bet_call(7).expect("unlimited");
            permits.push(
                limiter
                    .open_stream(Some(7), Some("127.0.0.1:1".parse().expect("addr")))
                    .expect("unlimited"),
            );
        }
        assert_eq!(limiter.tracked(), (0, 0));
    }

    #[test]
    fn streams_are_counted_per_user_and_per_connection_until_dropped() {
        let limiter = Limiter::new(&limits());
        let a: SocketAddr = "10.0.0.1:1000".parse().expect("addr");
        let b: SocketAddr = "10.0.0.1:1001".parse().expect("addr");
        let first = limiter.open_stream(Some(1), Some(a)).expect("first");
        let _second = limiter.open_stream(Some(1), Some(a)).expect("second");
        assert_eq!(
            limiter.open_stream(Some(1), Some(b)).err(),
            Some(LimitError::TooManyStreams {
                limit: 2,
                per: "user"
            })
        );
        // The refused open held nothing on connection b.
        assert_eq!(limiter.tracked(), (1, 1));
        let _third = limiter.open_stream(Some(2), Some(a)).expect("another user");
        assert_eq!(
            limiter.open_stream(Some(3), Some(a)).err(),
            Some(LimitError::TooManyStreams {
                limit: 3,
                per: "connection"
            })
        );
        drop(first);
        limiter
            .open_stream(Some(1), Some(b))
            .expect("a place was freed");
        drop(_second);
        drop(_third);
        assert_eq!(
            limiter.tracked(),
            (0, 0),
            "entries leave with their last stream"
        );
    }

    #[test]
    fn every_open_costs_a_token_even_a_refused_one() {
        let limiter = Limiter::new(&UserLimits {
            user_stream_open_rate: 1,
            user_stream_open_burst: 2,
            user_max_streams: 1,
            ..UserLimits::off()
        });
        let _live = limiter.open_stream(Some(1), None).expect("first");
        assert!(matches!(
            limiter.open_stream(Some(1), None),
            Err(LimitError::TooManyStreams { .. })
        ));
        assert!(matches!(
            limiter.open_stream(Some(1), None),
            Err(LimitError::RateLimited { .. })
        ));
    }

    #[test]
    fn millions_of_users_cannot_grow_the_buckets_for_ever() {
        let rate = RateLimit::new(1, 5);
        let start = Instant::now();
        for user in 0..(SHARDS * SHARD_CAPACITY * 3) as i64 {
            let _ = rate.take_at(user, start);
        }
        assert!(rate.len() <= SHARDS * SHARD_CAPACITY);
        // Idle users' buckets refill and are swept as new users come.
        let later = start + Duration::from_secs(6);
        for user in 0..(SHARDS * SHARD_CAPACITY) as i64 {
            let _ = rate.take_at(-1 - user, later);
        }
        assert!(rate.len() <= SHARDS * SHARD_CAPACITY);
    }
}
