//! Load balancing over a pool's backends. Every algorithm honours weights and
//! skips backends that cannot take new requests (disabled or draining).
//!
//! - `round_robin`: smooth weighted round-robin (nginx's algorithm): with weights
//!   5:1:1 the order is a a b a c a a, never five a's in a row.
//! - `random`: weighted random.
//! - `least_request`: power of two choices: two weighted-random candidates, the one
//!   with fewer requests in flight per unit of weight wins (as Envoy and
//!   linkerd do).
//! - `consistent_hash`: a ring with 160 points per unit of weight (Ketama-style).
//!   Removing one of N backends remaps only the keys that were on it, about 1/N.

use crate::health::{Circuit, CircuitState, Transition};
use rampart_config::Outlier;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// Runtime state of one backend, kept across reloads by (pool, url).
#[derive(Debug)]
pub struct BackendState {
    in_flight: AtomicUsize,
    admin: AtomicU8,
    /// Result of active checks (true until a check says otherwise).
    active_healthy: AtomicBool,
    /// Passive state for the fast path: 0 closed, 1 open, 2 half-open.
    circuit_flag: AtomicU8,
    /// While open: until when, in ms since [`epoch`].
    open_until_ms: AtomicU64,
    circuit: Mutex<Option<Circuit>>,
    /// When it last became healthy again, in ms since [`epoch`] (0: never down).
    recovered_at_ms: AtomicU64,
}

impl Default for BackendState {
    fn default() -> Self {
        BackendState {
            in_flight: AtomicUsize::new(0),
            admin: AtomicU8::new(0),
            active_healthy: AtomicBool::new(true),
            circuit_flag: AtomicU8::new(0),
            open_until_ms: AtomicU64::new(0),
            circuit: Mutex::new(None),
            recovered_at_ms: AtomicU64::new(0),
        }
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn ms_since_epoch(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch()).as_millis()).unwrap_or(u64::MAX)
}

/// Operator state of a backend (admin API).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminState {
    Enabled,
    /// Takes no new requests (nor new sessions); in-flight requests finish.
    Draining,
    /// Takes nothing new.
    Disabled,
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Enabled => "enabled",
            AdminState::Draining => "draining",
            AdminState::Disabled => "disabled",
        }
    }
}

impl BackendState {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn admin(&self) -> AdminState {
        match self.admin.load(Ordering::Relaxed) {
            1 => AdminState::Draining,
            2 => AdminState::Disabled,
            _ => AdminState::Enabled,
        }
    }

    pub fn set_admin(&self, s: AdminState) {
        let v = match s {
            AdminState::Enabled => 0,
            AdminState::Draining => 1,
            AdminState::Disabled => 2,
        };
        self.admin.store(v, Ordering::Relaxed);
    }

    /// Whether the operator lets this backend take new requests.
    pub fn available(&self) -> bool {
        self.admin() == AdminState::Enabled
    }

    pub fn active_healthy(&self) -> bool {
        self.active_healthy.load(Ordering::Relaxed)
    }

    pub fn set_active_healthy(&self, v: bool) {
        self.active_healthy.store(v, Ordering::Relaxed);
    }

    /// Healthy by both layers: active checks pass and the circuit is not open (an
    /// open circuit whose ejection time has passed counts as half-open).
    pub fn considered_healthy(&self) -> bool {
        self.active_healthy() && self.circuit_allows(usize::MAX)
    }

    fn circuit_allows(&self, half_open_max: usize) -> bool {
        match self.circuit_flag.load(Ordering::Relaxed) {
            0 => true,
            1 => {
                ms_since_epoch(Instant::now()) >= self.open_until_ms.load(Ordering::Relaxed)
                    && self.in_flight() < half_open_max
            }
            _ => self.in_flight() < half_open_max,
        }
    }

    /// Whether the balancer may send a new request here outside panic mode.
    pub fn usable(&self, half_open_max: usize) -> bool {
        self.available() && self.active_healthy() && self.circuit_allows(half_open_max)
    }

    pub fn circuit_name(&self) -> &'static str {
        match self.circuit_flag.load(Ordering::Relaxed) {
            0 => "closed",
            1 if ms_since_epoch(Instant::now()) < self.open_until_ms.load(Ordering::Relaxed) => "open",
            _ => "half_open",
        }
    }

    pub fn is_ejected(&self) -> bool {
        self.circuit_flag.load(Ordering::Relaxed) == 1
            && ms_since_epoch(Instant::now()) < self.open_until_ms.load(Ordering::Relaxed)
    }

    /// Close the circuit (the backend recovered); true if it was not closed.
    pub fn reset_circuit(&self) -> bool {
        let mut guard = crate::lock(&self.circuit);
        let changed = guard.as_mut().is_some_and(|c| c.reset(Instant::now()));
        self.circuit_flag.store(0, Ordering::Relaxed);
        self.open_until_ms.store(0, Ordering::Relaxed);
        changed
    }

    /// Record a proxied exchange for passive health.
    /// `now` is when the exchange ended (the caller has read the clock already).
    pub fn record_result(&self, ok: bool, cfg: &Outlier, may_eject: bool, now: Instant) -> Option<Transition> {
        let mut guard = crate::lock(&self.circuit);
        let circuit = guard.get_or_insert_with(|| Circuit::new(cfg, now));
        let t = circuit.record(ok, cfg, now, may_eject);
        let (flag, until) = match circuit.state {
            CircuitState::Closed => (0, 0),
            CircuitState::Open { until } => (1, ms_since_epoch(until)),
            CircuitState::HalfOpen { .. } => (2, 0),
        };
        self.open_until_ms.store(until, Ordering::Relaxed);
        self.circuit_flag.store(flag, Ordering::Relaxed);
        t
    }

    /// Note that the backend just became healthy again (for slow start).
    pub fn mark_recovered(&self) {
        self.recovered_at_ms
            .store(ms_since_epoch(Instant::now()).max(1), Ordering::Relaxed);
    }

    /// Share of its weight a recovering backend gets: 10% rising to 100% over
    /// `slow_start`, then 100% (also when it never went down).
    pub fn ramp(&self, slow_start: std::time::Duration) -> f64 {
        let at = self.recovered_at_ms.load(Ordering::Relaxed);
        if at == 0 || slow_start.is_zero() {
            return 1.0;
        }
        let since = ms_since_epoch(Instant::now()).saturating_sub(at) as f64;
        (since / slow_start.as_millis().max(1) as f64).clamp(0.1, 1.0)
    }

    /// Count a request in flight until the guard is dropped.
    pub fn start(self: &std::sync::Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// One request in flight on a backend.
pub struct InFlight(std::sync::Arc<BackendState>);

impl InFlight {
    pub fn state(&self) -> &BackendState {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a backend looks like to the balancer.
pub trait Candidate {
    /// Current weight (may ramp up during slow start).
    fn weight(&self) -> u32;
    /// Configured weight, for the hash ring (which must not move while weights ramp).
    fn base_weight(&self) -> u32 {
        self.weight()
    }
    fn state(&self) -> &BackendState;
    /// Stable identity for the hash ring (the backend URL).
    fn key(&self) -> &str;
}

pub enum Balancer {
    RoundRobin(Mutex<Vec<i64>>),
    Random,
    LeastRequest,
    ConsistentHash(Ring),
}

impl Balancer {
    pub fn round_robin(n: usize) -> Balancer {
        Balancer::RoundRobin(Mutex::new(vec![0; n]))
    }

    pub fn consistent_hash<C: Candidate>(backends: &[C]) -> Balancer {
        Balancer::ConsistentHash(Ring::new(backends))
    }

    /// Choose a backend index among those `ok` accepts. `hash` is the request's key
    /// for consistent hashing.
    pub fn pick<C: Candidate>(&self, backends: &[C], hash: Option<u64>, ok: &dyn Fn(&C) -> bool) -> Option<usize> {
        // One backend: every algorithm picks it if it may be picked at all (and the
        // round-robin state, a lock away, has nothing to decide).
        if let [only] = backends {
            return ok(only).then_some(0);
        }
        match self {
            Balancer::RoundRobin(cur) => smooth_wrr(cur, backends, ok),
            Balancer::Random => weighted_random(backends, None, ok),
            Balancer::LeastRequest => least_request(backends, ok),
            Balancer::ConsistentHash(ring) => match hash {
                Some(h) => ring.pick(backends, h, ok),
                None => weighted_random(backends, None, ok),
            },
        }
    }
}

fn smooth_wrr<C: Candidate>(cur: &Mutex<Vec<i64>>, backends: &[C], ok: &dyn Fn(&C) -> bool) -> Option<usize> {
    let mut cur = crate::lock(cur);
    if cur.len() != backends.len() {
        cur.resize(backends.len(), 0);
    }
    let mut total = 0i64;
    let mut best: Option<usize> = None;
    for (i, b) in backends.iter().enumerate() {
        if !ok(b) {
            continue;
        }
        let w = i64::from(b.weight());
        cur[i] += w;
        total += w;
        if best.is_none_or(|j| cur[i] > cur[j]) {
            best = Some(i);
        }
    }
    let i = best?;
    cur[i] -= total;
    Some(i)
}

fn weighted_random<C: Candidate>(backends: &[C], exclude: Option<usize>, ok: &dyn Fn(&C) -> bool) -> Option<usize> {
    let eligible = |i: usize, b: &C| ok(b) && Some(i) != exclude;
    let total: u64 = backends
        .iter()
        .enumerate()
        .filter(|(i, b)| eligible(*i, b))
        .map(|(_, b)| u64::from(b.weight()))
        .sum();
    if total == 0 {
        return None;
    }
    let mut r = fastrand::u64(..total);
    for (i, b) in backends.iter().enumerate() {
        if !eligible(i, b) {
            continue;
        }
        let w = u64::from(b.weight());
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

fn least_request<C: Candidate>(backends: &[C], ok: &dyn Fn(&C) -> bool) -> Option<usize> {
    let a = weighted_random(backends, None, ok)?;
    let Some(b) = weighted_random(backends, Some(a), ok) else {
        return Some(a);
    };
    // Fewer in flight per unit of weight wins: compare in_flight/weight without division.
    let (wa, wb) = (u128::from(backends[a].weight()), u128::from(backends[b].weight()));
    let (la, lb) = (
        backends[a].state().in_flight() as u128,
        backends[b].state().in_flight() as u128,
    );
    Some(if la * wb <= lb * wa { a } else { b })
}

/// A consistent-hash ring: sorted (point, backend index).
pub struct Ring {
    points: Vec<(u64, usize)>,
}

const POINTS_PER_WEIGHT: u32 = 160;

impl Ring {
    pub fn new<C: Candidate>(backends: &[C]) -> Ring {
        let mut points = Vec::new();
        for (i, b) in backends.iter().enumerate() {
            for p in 0..b.base_weight().saturating_mul(POINTS_PER_WEIGHT).min(160_000) {
                points.push((hash_bytes(format!("{}#{p}", b.key()).as_bytes()), i));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    /// The first available backend clockwise from the key's point.
    pub fn pick<C: Candidate>(&self, backends: &[C], h: u64, ok: &dyn Fn(&C) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|(p, _)| *p < h);
        let n = self.points.len();
        // Walk until an available backend; bounded by the ring size.
        (0..n)
            .map(|k| self.points[(start + k) % n].1)
            .find(|i| ok(&backends[*i]))
    }
}

/// The hash of a client address (for ip keys and ip affinity).
pub fn hash_ip(ip: std::net::IpAddr) -> u64 {
    match ip {
        std::net::IpAddr::V4(v4) => hash_bytes(&v4.octets()),
        std::net::IpAddr::V6(v6) => hash_bytes(&v6.octets()),
    }
}

/// FNV-1a with a murmur3 finaliser: stable across runs and builds, well spread.
pub fn hash_bytes(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in b {
        h ^= u64::from(*x);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    struct B {
        w: u32,
        s: Arc<BackendState>,
        k: String,
    }
    impl Candidate for B {
        fn weight(&self) -> u32 {
            self.w
        }
        fn state(&self) -> &BackendState {
            &self.s
        }
        fn key(&self) -> &str {
            &self.k
        }
    }
    fn pool(weights: &[u32]) -> Vec<B> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| B {
                w: *w,
                s: Arc::new(BackendState::default()),
                k: format!("http://10.0.0.{i}:80"),
            })
            .collect()
    }
    fn avail(b: &B) -> bool {
        b.state().available()
    }
    fn counts(bal: &Balancer, p: &[B], n: usize) -> Vec<usize> {
        let mut c = vec![0; p.len()];
        for i in 0..n {
            if let Some(x) = bal.pick(p, Some(hash_bytes(&(i as u64).to_be_bytes())), &avail) {
                c[x] += 1;
            }
        }
        c
    }

    #[test]
    fn smooth_round_robin_is_exact_and_interleaved() {
        let p = pool(&[5, 1, 1]);
        let b = Balancer::round_robin(p.len());
        let seq: Vec<usize> = (0..7).filter_map(|_| b.pick(&p, None, &avail)).collect();
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0], "nginx's smooth sequence for 5:1:1");
        assert_eq!(counts(&b, &p, 7000), vec![5000, 1000, 1000]);
    }

    #[test]
    fn a_single_backend_is_picked_by_every_algorithm_when_it_may_be() {
        let p = pool(&[3]);
        for b in [Balancer::round_robin(1), Balancer::Random, Balancer::LeastRequest] {
            assert_eq!(b.pick(&p, None, &avail), Some(0));
            assert_eq!(b.pick(&p, None, &|_: &B| false), None);
        }
    }

    #[test]
    fn random_honours_weights() {
        let p = pool(&[1, 3]);
        let c = counts(&Balancer::Random, &p, 40_000);
        let share = c[1] as f64 / 40_000.0;
        assert!((0.72..0.78).contains(&share), "{c:?}");
    }

    #[test]
    fn least_request_prefers_the_idle_backend() {
        let p = pool(&[1, 1, 1]);
        let _busy: Vec<InFlight> = (0..10).map(|_| p[0].s.start()).collect();
        let c = counts(&Balancer::LeastRequest, &p, 3000);
        assert_eq!(c[0], 0, "a busy backend never beats an idle one in P2C: {c:?}");
        assert!(c[1] > 1200 && c[2] > 1200, "{c:?}");
        // Equal load: weights decide.
        let p = pool(&[1, 3]);
        let c = counts(&Balancer::LeastRequest, &p, 40_000);
        assert!(c[1] > c[0] * 2, "{c:?}");
    }

    #[test]
    fn slow_start_ramps_from_a_tenth() {
        let s = BackendState::default();
        let ramp = std::time::Duration::from_secs(3600);
        assert_eq!(s.ramp(ramp), 1.0, "never down: full weight");
        s.mark_recovered();
        let r = s.ramp(ramp);
        assert!((0.1..0.11).contains(&r), "just recovered: {r}");
        assert_eq!(s.ramp(std::time::Duration::ZERO), 1.0, "slow start off");
    }

    #[test]
    fn in_flight_guard_counts() {
        let s = Arc::new(BackendState::default());
        let a = s.start();
        let b = s.start();
        assert_eq!(s.in_flight(), 2);
        drop(a);
        drop(b);
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn consistent_hash_is_stable_and_spread() {
        let p = pool(&[1; 10]);
        let b = Balancer::consistent_hash(&p);
        let c = counts(&b, &p, 100_000);
        for x in &c {
            assert!((7_000..13_000).contains(x), "uneven ring: {c:?}");
        }
        let h = hash_bytes(b"user-42");
        assert_eq!(b.pick(&p, Some(h), &avail), b.pick(&p, Some(h), &avail));
    }

    #[test]
    fn removing_one_of_n_remaps_about_one_nth() {
        let n = 10;
        let full = pool(&vec![1; n]);
        let ring_full = Balancer::consistent_hash(&full);
        // The same backends without the last one (same keys, so the same points).
        let fewer: Vec<B> = full
            .iter()
            .take(n - 1)
            .map(|b| B {
                w: b.w,
                s: Arc::new(BackendState::default()),
                k: b.k.clone(),
            })
            .collect();
        let ring_fewer = Balancer::consistent_hash(&fewer);
        let keys = 50_000u64;
        let mut moved = 0;
        for k in 0..keys {
            let h = hash_bytes(&k.to_be_bytes());
            let (a, b) = (
                ring_full.pick(&full, Some(h), &avail),
                ring_fewer.pick(&fewer, Some(h), &avail),
            );
            if a != b {
                moved += 1;
                assert_eq!(a, Some(n - 1), "only keys of the removed backend move");
            }
        }
        let frac = moved as f64 / keys as f64;
        assert!(frac < 1.5 / n as f64, "moved {frac}");
        assert!(frac > 0.5 / n as f64, "moved {frac}");
    }

    #[test]
    fn unavailable_backends_are_skipped_by_every_algorithm() {
        let p = pool(&[1, 1, 1]);
        p[1].s.set_admin(AdminState::Draining);
        p[2].s.set_admin(AdminState::Disabled);
        for b in [
            Balancer::round_robin(3),
            Balancer::Random,
            Balancer::LeastRequest,
            Balancer::consistent_hash(&p),
        ] {
            assert_eq!(counts(&b, &p, 300), vec![300, 0, 0]);
        }
        p[0].s.set_admin(AdminState::Disabled);
        assert_eq!(Balancer::round_robin(3).pick(&p, None, &avail), None);
        assert_eq!(Balancer::consistent_hash(&p).pick(&p, Some(1), &avail), None);
    }
}
