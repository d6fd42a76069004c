//! `cargo bench -p sluice-vmm`: tiny-guest VM create-to-first-exit, port
//! exit round trip, virtqueue throughput with 1 MiB buffers. Needs /dev/kvm
//! for the first two.

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

criterion_group!(benches, vm);
criterion_main!(benches);
