//! `cargo bench -p sluice-vmm`: tiny-guest VM create-to-first-exit, port
//! exit round trip, virtqueue throughput with 1 MiB buffers, and snapshot
//! restore: restore-to-running next to a fresh create-and-boot of the same
//! guest, clones per second and memory per idle clone
//! (`SLUICE_BENCH_CLONES`, default 1000, of a `SLUICE_BENCH_MEM_MIB`,
//! default 128, MiB guest; `SLUICE_BENCH_RESTORE_SAMPLES`, default 200).
//! Needs /dev/kvm for all but the virtqueue.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice_vmm::bench;

fn kvm() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("*** /dev/kvm unavailable: skipping the VM benchmarks ***");
    }
    ok
}

fn vm(c: &mut Criterion) {
    if kvm() {
        let mut g = c.benchmark_group("vm");
        g.sample_size(20);
        g.bench_function("create_to_first_exit", |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| bench::create_to_first_exit().expect("VM"))
                    .sum::<Duration>()
            })
        });
        g.bench_function("port_exit_round_trip", |b| {
            b.iter_custom(|iters| {
                bench::port_exit_round_trip(iters.max(2) as u32).expect("VM") * iters as u32
            })
        });
        g.bench_function("pause_resume", |b| {
            b.iter_custom(|iters| {
                bench::pause_resume(iters.max(1) as u32).expect("VM") * iters as u32
            })
        });
        g.finish();
        snapshot(c);
    }
    let mut g = c.benchmark_group("virtqueue");
    g.throughput(Throughput::Bytes(64 << 20));
    g.sample_size(10);
    g.bench_function("tx_1MiB_buffers_64MiB", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let bps = bench::virtqueue_throughput(1 << 20, 64 << 20).expect("virtqueue");
                    Duration::from_secs_f64((64 << 20) as f64 / bps)
                })
                .sum::<Duration>()
        })
    });
    g.finish();
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn snapshot(c: &mut Criterion) {
    let mem_mib = env_or("SLUICE_BENCH_MEM_MIB", 128);
    let clones = env_or("SLUICE_BENCH_CLONES", 1000) as usize;
    let samples = env_or("SLUICE_BENCH_RESTORE_SAMPLES", 200) as usize;
    let dir = tempfile::tempdir().expect("temporary directory");
    // The full report first: percentiles of restore and fresh boot in the
    // same run, clones per second, memory per idle clone.
    let report = bench::snapshot_restore(dir.path(), mem_mib, samples, clones).expect("snapshot");
    println!("snapshot/restore: {}", report.summary());
    // Then criterion's own view of the two latencies, from one snapshot.
    let (rb, _) = bench::RestoreBench::new(dir.path(), mem_mib).expect("snapshot");
    let mut g = c.benchmark_group("snapshot");
    g.sample_size(50);
    g.bench_function("restore_to_running", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|i| rb.restore_to_running("crit-restore", i).expect("restore").1)
                .sum::<Duration>()
        })
    });
    g.bench_function("fresh_create_and_boot", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| rb.fresh_to_running().expect("boot").1)
                .sum::<Duration>()
        })
    });
    g.finish();
}

criterion_group!(benches, vm);
criterion_main!(benches);
