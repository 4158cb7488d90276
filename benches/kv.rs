//! Actor KV store through its worker: durable puts of one 100-byte value, submitted in bursts
//! of 1, 16 and 256 jobs. Each burst is waited for, so ops/s shows what group commit (one
//! transaction and one fsync per drained queue) buys over a commit per put.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use torpor::kv::{self, KvLimits};
use torpor::protocol::{KvPutRequest, KvRequestData, KvResponseData};

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("torpor-kv-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let handle = kv::spawn(&dir.join("kv.redb"), KvLimits::default()).expect("open kv store");
    let next_key = AtomicU64::new(0);
    let value = vec![0x5Au8; 100];

    let mut g = c.benchmark_group("kv_put_100B");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for burst in [1usize, 16, 256] {
        g.throughput(Throughput::Elements(burst as u64));
        let before = handle.stats();
        g.bench_with_input(BenchmarkId::from_parameter(burst), &burst, |b, &burst| {
            b.iter(|| {
                let (tx, rx) = crossbeam_channel::bounded::<()>(1);
                let left = Arc::new(AtomicU64::new(burst as u64));
                for _ in 0..burst {
                    let key = next_key
                        .fetch_add(1, Ordering::Relaxed)
                        .to_be_bytes()
                        .to_vec();
                    let req = KvRequestData::Put(KvPutRequest {
                        keys: vec![key],
                        values: vec![value.clone()],
                    });
                    let left = left.clone();
                    let tx = tx.clone();
                    handle
                        .kv("bench-actor", req, move |r| {
                            assert_eq!(r, KvResponseData::Put);
                            if left.fetch_sub(1, Ordering::AcqRel) == 1 {
                                let _ = tx.send(());
                            }
                        })
                        .expect("store running");
                }
                rx.recv().expect("burst answered");
            })
        });
        let s = handle.stats();
        let (puts, commits) = (s.puts - before.puts, s.commits - before.commits);
        eprintln!(
            "burst {burst}: {puts} puts in {commits} commits ({:.1} puts/commit), \
             mean write txn {:.3} ms",
            puts as f64 / commits.max(1) as f64,
            (s.commit_nanos - before.commit_nanos) as f64 / commits.max(1) as f64 / 1e6
        );
    }
    g.finish();
    handle.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
