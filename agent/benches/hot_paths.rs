//! The per-connection pure work: finding the service for an original destination and
//! picking an endpoint, for each policy. `cargo bench -p switchyard`.

use std::{hint::black_box, path::Path, time::Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use switchyard::{
    config::Config,
    state::{Resolved, Snapshot},
};

/// 200 services of 10 endpoints each, under the given balancer.
fn snapshot(balance: &str) -> Snapshot {
    let mut yaml = String::from("services:\n");
    for s in 0..200u32 {
        let eps: Vec<String> = (0..10u32).map(|e| format!("\"10.{}.{}.{}:8080\"", s / 250, s % 250, e + 1)).collect();
        yaml.push_str(&format!(
            "  - {{ name: svc{s}, addresses: [\"10.96.{}.{}:80\"], endpoints: [{}], balance: {balance} }}\n",
            s / 250,
            s % 250,
            eps.join(", ")
        ));
    }
    Snapshot::build(&Config::parse(&yaml, Path::new("bench.yaml")).unwrap(), &Resolved::new(), None)
}

fn bench(c: &mut Criterion) {
    let snap = snapshot("p2c-ewma");
    let dst = "10.96.0.123:80".parse().unwrap();
    c.bench_function("snapshot lookup (200 services)", |b| b.iter(|| black_box(snap.service_for(black_box(dst)))));
    for balance in ["p2c-ewma", "least-connections", "round-robin", "random", "ring-hash"] {
        let snap = snapshot(balance);
        let svc = snap.service_for(dst).unwrap();
        let now = Instant::now();
        c.bench_function(&format!("pick {balance} (10 endpoints)"), |b| {
            b.iter(|| black_box(svc.balancer.pick(black_box(42), &[], now).map(|p| p.endpoint.addr)))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
