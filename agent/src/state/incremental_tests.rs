//! Incremental application is exact: any sequence of service changes applied one at a
//! time ends in the same snapshot, and the same kernel entries, as building the final
//! set from scratch; and a change leaves every other service (and the live state of the
//! changed one's remaining endpoints) untouched.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::Instant,
};

use proptest::prelude::*;

use super::*;
use crate::{
    config::{EndpointConfig, Origin, Route, SplitBranch},
    redirect::KernelEntry,
};

/// Services `s0`..`s5`; `s0` and `s1` always exist, since `front` routes to them.
const NAMES: usize = 6;

#[derive(Debug, Clone)]
enum Op {
    /// (service, which of its two addresses it has, endpoints as (host, weight,
    /// terminating, zone), kernel mode)
    Upsert(usize, u8, Vec<(u8, u32, bool, bool)>, bool),
    Remove(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let endpoint = (0u8..8, 1u32..4, proptest::bool::weighted(0.2), any::<bool>());
    prop_oneof![
        4 => (0..NAMES, 1u8..4, proptest::collection::vec(endpoint, 0..5), any::<bool>())
            .prop_map(|(s, a, e, k)| Op::Upsert(s, a, e, k)),
        1 => (2..NAMES).prop_map(Op::Remove),
    ]
}

fn service(i: usize, addrs: u8, endpoints: &[(u8, u32, bool, bool)], kernel: bool) -> ServiceConfig {
    // Each service's addresses are its own, so every combination is valid.
    let mut addresses = Vec::new();
    if addrs & 1 != 0 {
        addresses.push(SocketAddr::from(([10, 96, 0, i as u8], 80)));
    }
    if addrs & 2 != 0 {
        addresses.push(format!("[fd96::{i}]:80").parse().unwrap());
    }
    let mut seen = std::collections::HashSet::new();
    let endpoints = endpoints
        .iter()
        .filter(|(h, ..)| seen.insert(*h))
        .map(|&(h, weight, terminating, zone)| EndpointConfig {
            weight,
            terminating,
            place: crate::config::Place { zone: Some(if zone { "a" } else { "b" }.into()), ..Default::default() }
                .some(),
            ..EndpointConfig::new(crate::config::Target::Addr(if h % 2 == 0 {
                SocketAddr::from(([10, 1, i as u8, h], 8080))
            } else {
                format!("[fd10::{i}:{h}]:8080").parse().unwrap()
            }))
        })
        .collect();
    ServiceConfig {
        name: format!("s{i}"),
        addresses,
        endpoints,
        origin: Origin::Kubernetes,
        mode: if kernel { ServiceMode::Kernel } else { ServiceMode::Proxy },
        ..ServiceConfig::named("")
    }
}

fn front() -> ServiceConfig {
    ServiceConfig {
        name: "front".into(),
        addresses: vec!["10.96.1.1:80".parse().unwrap()],
        route: Some(Route {
            split: vec![
                SplitBranch { service: "s0".into(), weight: 3 },
                SplitBranch { service: "s1".into(), weight: 1 },
            ],
            failover: Vec::new(),
        }),
        ..ServiceConfig::named("")
    }
}

fn agent() -> crate::config::AgentConfig {
    crate::config::AgentConfig { zone: Some("a".into()), ..Default::default() }
}

/// What the kernel holds, by address: (service name, kernel mode, table).
type Kernel = BTreeMap<SocketAddr, (String, bool, Vec<(SocketAddr, u64, bool)>)>;

fn record(kernel: &mut Kernel, snap: &Snapshot, entries: Vec<KernelEntry>) {
    for e in entries {
        match e.service {
            Some(s) => {
                let table = e.table.unwrap_or_default();
                let table = table.iter().map(|w| (w.addr, (w.share * 1e9).round() as u64, w.trial)).collect();
                kernel.insert(e.addr, (snap.service(s.id as usize).name.to_string(), s.kernel, table));
            }
            None => {
                kernel.remove(&e.addr);
            }
        }
    }
}

/// A snapshot by name, independent of slots: each service's config, endpoints (as the
/// balancer holds them), and route branches by target name.
fn by_name(snap: &Snapshot) -> BTreeMap<String, (ServiceConfig, Vec<String>, Vec<String>)> {
    snap.services()
        .map(|(i, s)| {
            let eps = s
                .balancer
                .endpoints()
                .iter()
                .map(|e| format!("{} w{} {:?} t{}", e.addr, e.weight, e.tier, e.terminating))
                .collect();
            let branches = snap.branches(i).iter().map(|b| snap.service(b.target).name.to_string()).collect();
            (s.name.to_string(), (s.full_config(), eps, branches))
        })
        .collect()
}

fn states(snap: &Snapshot) -> HashMap<(String, SocketAddr), (Arc<Service>, Arc<EndpointState>)> {
    snap.services()
        .flat_map(|(_, s)| {
            s.balancer
                .endpoints()
                .iter()
                .map(move |e| ((s.name.to_string(), e.addr), (Arc::clone(s), Arc::clone(&e.state))))
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn changes_applied_one_by_one_equal_the_final_state_built_from_scratch(ops in proptest::collection::vec(op(), 1..40)) {
        let resolved = Resolved::new();
        let now = Instant::now();
        let mut wanted: BTreeMap<String, ServiceConfig> = BTreeMap::new();
        for s in [service(0, 1, &[(0, 1, false, true)], false), service(1, 1, &[(2, 1, false, false)], false), front()] {
            wanted.insert(s.name.clone(), s);
        }
        let start = Config { agent: agent(), services: wanted.values().cloned().collect() };
        let mut snap = Snapshot::build(&start, &resolved, None);
        let mut kernel = Kernel::new();
        record(&mut kernel, &snap, snap.kernel_entries(snap.service_addresses().map(|s| s.addr), now));

        for op in &ops {
            let before = states(&snap);
            let (next, changes) = match op {
                Op::Upsert(i, a, e, k) => {
                    let s = service(*i, *a, e, *k);
                    wanted.insert(s.name.clone(), s.clone());
                    snap.changed(std::slice::from_ref(&s), &[], &resolved)
                }
                Op::Remove(i) => {
                    wanted.remove(&format!("s{i}"));
                    snap.changed(&[], &[format!("s{i}")], &resolved)
                }
            };
            record(&mut kernel, &next, next.kernel_entries(next.touched_addresses(&changes), now));
            // Untouched services are the same objects; a changed one keeps the state of
            // the endpoints it still has.
            let touched: Vec<&str> = changes.iter().filter_map(|c| c.old.as_ref().map(|o| &*o.name)).collect();
            for ((name, addr), (svc, state)) in &before {
                let Some(now_svc) = next.service_named(name) else { continue };
                if !touched.contains(&name.as_str()) {
                    prop_assert!(Arc::ptr_eq(svc, now_svc), "{name} was rebuilt by a change elsewhere");
                } else if let Some(e) = now_svc.balancer.endpoints().iter().find(|e| e.addr == *addr) {
                    prop_assert!(Arc::ptr_eq(state, &e.state), "{name} {addr} lost its state");
                }
            }
            snap = next;
        }

        let scratch = Snapshot::build(&Config { agent: agent(), services: wanted.values().cloned().collect() }, &resolved, None);
        prop_assert_eq!(by_name(&snap), by_name(&scratch));
        for (name, config) in &wanted {
            prop_assert_eq!(&snap.service_named(name).unwrap().full_config(), config, "the config, whole again");
        }
        for i in 0..NAMES as u8 {
            for addr in [SocketAddr::from(([10, 96, 0, i], 80)), format!("[fd96::{i}]:80").parse().unwrap()] {
                prop_assert_eq!(
                    snap.service_for(addr).map(|s| s.name.clone()),
                    scratch.service_for(addr).map(|s| s.name.clone())
                );
            }
        }
        let mut from_scratch = Kernel::new();
        record(&mut from_scratch, &scratch, scratch.kernel_entries(scratch.service_addresses().map(|s| s.addr), now));
        prop_assert_eq!(kernel, from_scratch);
    }
}
