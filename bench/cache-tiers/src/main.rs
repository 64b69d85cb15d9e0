//! Memory-tier candidates for Rampart's HTTP cache, on the same workload:
//! a skewed (Zipf-like) stream of GETs over many objects of mixed sizes, with a
//! byte budget smaller than the working set. Prints hit ratio and throughput.
//!
//! cargo run --release -- [operations] [objects] [budget MiB] [threads]

use std::sync::Arc;
use std::time::Instant;

type Value = Arc<Vec<u8>>;

fn size_of(key: u64) -> usize {
    // 1 KiB to 64 KiB, smaller objects more common.
    let r = (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) % 100;
    match r {
        0..=59 => 1024,
        60..=84 => 8 * 1024,
        85..=96 => 32 * 1024,
        _ => 64 * 1024,
    }
}

/// Zipf-like keys: a few are very hot, a long tail is cold.
fn key(rng: &mut fastrand::Rng, objects: u64) -> u64 {
    let u = rng.f64();
    ((u.powf(3.0)) * objects as f64) as u64
}

trait Tier: Send + Sync {
    fn get(&self, k: u64) -> Option<Value>;
    fn put(&self, k: u64, v: Value);
}

struct Moka(moka::sync::Cache<u64, Value>);
impl Tier for Moka {
    fn get(&self, k: u64) -> Option<Value> {
        self.0.get(&k)
    }
    fn put(&self, k: u64, v: Value) {
        self.0.insert(k, v);
    }
}

#[derive(Clone)]
struct Bytes;
impl quick_cache::Weighter<u64, Value> for Bytes {
    fn weight(&self, _k: &u64, v: &Value) -> u64 {
        v.len() as u64
    }
}
struct Quick(quick_cache::sync::Cache<u64, Value, Bytes>);
impl Tier for Quick {
    fn get(&self, k: u64) -> Option<Value> {
        self.0.get(&k)
    }
    fn put(&self, k: u64, v: Value) {
        self.0.insert(k, v);
    }
}

fn run(name: &str, tier: Arc<dyn Tier>, ops: u64, objects: u64, threads: u64) {
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let tier = tier.clone();
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(42 + t);
                let mut hits = 0u64;
                for _ in 0..ops / threads {
                    let k = key(&mut rng, objects);
                    if tier.get(k).is_some() {
                        hits += 1;
                    } else {
                        tier.put(k, Arc::new(vec![0u8; size_of(k)]));
                    }
                }
                hits
            })
        })
        .collect();
    let hits: u64 = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{name:<12} hit ratio {:>6.2} %   {:>10.0} ops/s   ({threads} thread(s))",
        100.0 * hits as f64 / ops as f64,
        ops as f64 / secs
    );
}

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let ops = *args.first().unwrap_or(&2_000_000);
    let objects = *args.get(1).unwrap_or(&200_000);
    let budget = args.get(2).unwrap_or(&256) * 1024 * 1024;
    let threads = *args.get(3).unwrap_or(&1);
    let avg: f64 = (0..10_000u64).map(|k| size_of(k) as f64).sum::<f64>() / 10_000.0;
    println!(
        "{ops} GETs over {objects} objects (~{:.0} MiB in all), budget {} MiB",
        objects as f64 * avg / 1048576.0,
        budget / 1048576
    );
    for round in 0..2 {
        println!("round {}", round + 1);
        let moka: Arc<dyn Tier> = Arc::new(Moka(
            moka::sync::Cache::builder()
                .max_capacity(budget)
                .weigher(|_k: &u64, v: &Value| u32::try_from(v.len()).unwrap_or(u32::MAX))
                .build(),
        ));
        run("moka", moka, ops, objects, threads);
        let quick: Arc<dyn Tier> = Arc::new(Quick(quick_cache::sync::Cache::with_weighter(
            objects as usize,
            budget,
            Bytes,
        )));
        run("quick_cache", quick, ops, objects, threads);
    }
}
