use std::{collections::HashMap, sync::Arc, time::Duration};

use proptest::prelude::*;

use super::*;

fn ep(i: u8, weight: u32, tier: Tier) -> Endpoint {
    Endpoint {
        addr: SocketAddr::from(([10, 0, 0, i], 80)),
        weight,
        place: None,
        tier,
        terminating: false,
        state: Arc::new(EndpointState::default()),
    }
}

fn accrual() -> FailureAccrualConfig {
    FailureAccrualConfig { consecutive_failures: 1, ..Default::default() }
}

fn balancer(kind: BalanceKind, eps: Vec<Endpoint>) -> Balancer {
    Balancer::new(kind, eps, accrual(), 0.7)
}

/// Share of `n` picks per endpoint's last address byte.
fn shares(b: &Balancer, n: usize, key: impl Fn(usize) -> u64) -> HashMap<u8, f64> {
    let now = Instant::now();
    let mut count = HashMap::new();
    for k in 0..n {
        let p = b.pick(key(k), &[], now).expect("a pick");
        let SocketAddr::V4(a) = p.endpoint.addr else { unreachable!() };
        *count.entry(a.ip().octets()[3]).or_insert(0usize) += 1;
    }
    count.into_iter().map(|(k, c)| (k, c as f64 / n as f64)).collect()
}

fn eject(e: &Endpoint) {
    assert!(matches!(e.state.on_connect_failed(Instant::now(), &accrual()), Change::Ejected(_)));
}

#[test]
fn round_robin_is_exact_and_weights_scale_it() {
    let b =
        balancer(BalanceKind::RoundRobin, vec![ep(1, 1, Tier::Local), ep(2, 1, Tier::Local), ep(3, 2, Tier::Local)]);
    let s = shares(&b, 400, |_| 0);
    assert_eq!((s[&1], s[&2], s[&3]), (0.25, 0.25, 0.5));
}

#[test]
fn random_follows_weights_within_tolerance() {
    let b = balancer(BalanceKind::Random, vec![ep(1, 3, Tier::Local), ep(2, 1, Tier::Local)]);
    let s = shares(&b, 20_000, |_| 0);
    assert!((0.72..0.78).contains(&s[&1]), "weight 3 of 4 got {}", s[&1]);
}

#[test]
fn weighted_load_aware_policies_hold_connections_in_proportion_to_weight() {
    // p2c and least connections weigh load by weight (Envoy's weighted least request):
    // with connections held open, the weight-3 endpoint ends up with 3x as many.
    for kind in [BalanceKind::P2cEwma, BalanceKind::LeastConnections] {
        let b = balancer(kind, vec![ep(1, 3, Tier::Local), ep(2, 1, Tier::Local)]);
        let now = Instant::now();
        let held: Vec<_> = (0..400).map(|_| b.pick(0, &[], now).unwrap().endpoint.state.begin()).collect();
        let heavy = b.endpoints()[0].state.active();
        assert!((290..=310).contains(&heavy), "{kind:?}: weight 3 of 4 holds {heavy} of {}", held.len());
    }
}

#[test]
fn least_connections_picks_the_least_loaded() {
    let b = balancer(BalanceKind::LeastConnections, vec![ep(1, 1, Tier::Local), ep(2, 1, Tier::Local)]);
    let _busy = [b.endpoints()[0].state.begin(), b.endpoints()[0].state.begin()];
    let s = shares(&b, 100, |_| 0);
    assert_eq!(s[&2], 1.0);
}

#[test]
fn p2c_avoids_an_endpoint_with_many_open_connections() {
    let b = balancer(BalanceKind::P2cEwma, vec![ep(1, 1, Tier::Local), ep(2, 1, Tier::Local), ep(3, 1, Tier::Local)]);
    let _busy: Vec<_> = (0..10).map(|_| b.endpoints()[0].state.begin()).collect();
    let s = shares(&b, 3000, |_| 0);
    assert!(s.get(&1).copied().unwrap_or(0.0) < 0.01, "loaded endpoint still got {:?}", s.get(&1));
}

#[test]
fn p2c_prefers_the_endpoint_with_the_lower_latency_estimate() {
    let b = balancer(BalanceKind::P2cEwma, vec![ep(1, 1, Tier::Local), ep(2, 1, Tier::Local)]);
    let now = Instant::now();
    b.endpoints()[0].state.on_connect_ok(Duration::from_millis(50), now);
    b.endpoints()[1].state.on_connect_ok(Duration::from_micros(100), now);
    assert_eq!(shares(&b, 200, |_| 0)[&2], 1.0);
}

#[test]
fn p2c_comes_back_to_an_endpoint_after_one_slow_sample() {
    // Endpoint 2's one slow connect makes it lose every pairing, so no new sample comes
    // to correct it: only the estimate's decay with time brings it back.
    let b = balancer(BalanceKind::P2cEwma, vec![ep(1, 1, Tier::Local), ep(2, 1, Tier::Local), ep(3, 1, Tier::Local)]);
    let t0 = Instant::now();
    b.endpoints()[1].state.on_connect_ok(Duration::from_millis(5), t0);
    let mut late = HashMap::new();
    for k in 0..6000u32 {
        let now = t0 + Duration::from_millis(10) * k;
        let p = b.pick(0, &[], now).expect("a pick");
        p.endpoint.state.on_connect_ok(Duration::from_micros(100), now);
        if now >= t0 + Duration::from_secs(50) {
            let SocketAddr::V4(a) = p.endpoint.addr else { unreachable!() };
            *late.entry(a.ip().octets()[3]).or_insert(0u32) += 1;
        }
    }
    let share = late.get(&2).copied().unwrap_or(0) as f64 / late.values().sum::<u32>() as f64;
    assert!(share > 0.25, "endpoint 2 in the last 10 s: {late:?}");
}

#[test]
fn ejected_endpoints_are_skipped_until_the_panic_threshold() {
    let b = balancer(
        BalanceKind::RoundRobin,
        vec![ep(1, 1, Tier::Local), ep(2, 1, Tier::Local), ep(3, 1, Tier::Local), ep(4, 1, Tier::Local)],
    );
    eject(&b.endpoints()[0]);
    let s = shares(&b, 300, |_| 0);
    assert!(!s.contains_key(&1));
    eject(&b.endpoints()[1]);
    // 2 of 4 out is exactly 50%: not past the threshold yet.
    assert_eq!(shares(&b, 300, |_| 0).len(), 2);
    eject(&b.endpoints()[2]);
    let s = shares(&b, 400, |_| 0);
    assert_eq!(s.len(), 4, "panic: health ignored, everything used: {s:?}");
    assert!(b.stats.panics.load(Ordering::Relaxed) >= 400);
}

#[test]
fn a_retry_goes_to_an_endpoint_not_yet_tried() {
    let b = balancer(BalanceKind::P2cEwma, vec![ep(1, 1, Tier::Local), ep(2, 1, Tier::Local), ep(3, 1, Tier::Local)]);
    let now = Instant::now();
    for _ in 0..100 {
        let first = b.pick(0, &[], now).unwrap().endpoint.addr;
        let second = b.pick(0, &[first], now).unwrap().endpoint.addr;
        assert_ne!(first, second);
        let third = b.pick(0, &[first, second], now).unwrap().endpoint.addr;
        assert!(third != first && third != second);
        // All tried: one of them again rather than nothing.
        assert!(b.pick(0, &[first, second, third], now).is_some());
    }
}

/// A client that has tried every healthy endpoint tries an untried one that is out
/// (ejected, or failing checks) before repeating one: in the soak, the only endpoint
/// checked in had just died while the one checked out was back, and three attempts on
/// the dead one failed a connection the other would have taken.
#[test]
fn when_every_healthy_endpoint_failed_an_untried_out_one_goes_before_a_repeat() {
    for kind in [BalanceKind::P2cEwma, BalanceKind::RoundRobin, BalanceKind::RingHash, BalanceKind::LeastConnections] {
        let b = balancer(kind, vec![ep(1, 1, Tier::Local), ep(2, 1, Tier::Local), ep(3, 1, Tier::Local)]);
        // One of three out: under the panic threshold, so health still counts.
        eject(&b.endpoints()[1]);
        let now = Instant::now();
        let (healthy, out) = (b.endpoints()[0].addr, b.endpoints()[1].addr);
        let other = b.endpoints()[2].addr;
        assert_ne!(b.pick(0, &[], now).unwrap().endpoint.addr, out, "{kind:?}: an out endpoint is skipped");
        assert_eq!(b.pick(0, &[healthy], now).unwrap().endpoint.addr, other, "{kind:?}: a healthy untried one first");
        let last = b.pick(0, &[healthy, other], now).unwrap();
        assert_eq!(last.endpoint.addr, out, "{kind:?}: then the out one, untried, before a repeat");
        assert!(!last.panic, "{kind:?}: one client's last resort is not the service's panic mode");
        // Every endpoint tried: a healthy one again (a one-endpoint service keeps its attempts).
        let again = b.pick(0, &[healthy, other, out], now).unwrap().endpoint.addr;
        assert!(again == healthy || again == other, "{kind:?}: {again}");
    }
}

#[test]
fn terminating_endpoints_get_no_new_connections() {
    let mut eps = vec![ep(1, 1, Tier::Local), ep(2, 1, Tier::Local)];
    eps[0].terminating = true;
    let b = balancer(BalanceKind::RoundRobin, eps);
    assert_eq!(shares(&b, 50, |_| 0)[&2], 1.0);
    let mut only = vec![ep(1, 1, Tier::Local)];
    only[0].terminating = true;
    assert!(balancer(BalanceKind::RoundRobin, only).pick(0, &[], Instant::now()).is_none());
}

#[test]
fn locality_keeps_traffic_local_spills_in_proportion_and_returns() {
    let b = balancer(
        BalanceKind::RoundRobin,
        vec![ep(1, 1, Tier::Local), ep(2, 1, Tier::Local), ep(3, 1, Tier::Local), ep(9, 1, Tier::Region)],
    );
    let s = shares(&b, 3000, |_| 0);
    assert!(!s.contains_key(&9), "healthy local tier keeps everything: {s:?}");
    // 2 of 3 local healthy = 0.67 < 0.7: about 1 - 0.67/0.7 = 5% spills.
    eject(&b.endpoints()[0]);
    let spilled = shares(&b, 20_000, |_| 0).get(&9).copied().unwrap_or(0.0);
    assert!((0.03..0.07).contains(&spilled), "spilled share {spilled}");
    eject(&b.endpoints()[1]);
    eject(&b.endpoints()[2]);
    // All local out (3 of 4 = 75% > 50% would be panic), so raise the cap for this check.
    let b2 = Balancer::new(
        BalanceKind::RoundRobin,
        b.endpoints().to_vec(),
        FailureAccrualConfig { max_ejected_percent: 100, ..accrual() },
        0.7,
    );
    assert_eq!(shares(&b2, 100, |_| 0)[&9], 1.0, "local tier dead: all spill");
    for e in &b2.endpoints()[..3] {
        e.state.on_connect_ok(Duration::from_micros(100), Instant::now());
    }
    assert!(!shares(&b2, 300, |_| 0).contains_key(&9), "local tier back: traffic returns");
    assert!(b2.stats.by_tier[Tier::Region as usize].load(Ordering::Relaxed) >= 100);
}

#[test]
fn ring_hash_keeps_clients_on_their_endpoint_and_moves_only_those_of_a_lost_one() {
    let b = balancer(BalanceKind::RingHash, (1..=4).map(|i| ep(i, 1, Tier::Local)).collect());
    let now = Instant::now();
    let owner = |c: u64| b.pick(hash(c), &[], now).unwrap().endpoint.addr;
    let before: Vec<_> = (0..500).map(owner).collect();
    assert_eq!(before, (0..500).map(owner).collect::<Vec<_>>(), "stable");
    let lost = b.endpoints()[1].addr;
    eject(&b.endpoints()[1]);
    for (c, was) in before.iter().enumerate() {
        let now_on = owner(c as u64);
        if *was == lost {
            assert_ne!(now_on, lost);
        } else {
            assert_eq!(now_on, *was, "client {c} moved although its endpoint is healthy");
        }
    }
}

#[test]
fn an_endpoint_past_its_back_off_gets_one_trial_then_full_return() {
    let b =
        balancer(BalanceKind::RoundRobin, vec![ep(1, 1, Tier::Local), ep(2, 1, Tier::Local), ep(3, 1, Tier::Local)]);
    let e = &b.endpoints()[0];
    eject(e);
    let later = Instant::now() + Duration::from_secs(5);
    let picks: Vec<_> = (0..30).map(|_| b.pick(0, &[], later).unwrap().endpoint.addr).collect();
    assert_eq!(picks.iter().filter(|&&a| a == e.addr).count(), 1, "exactly one trial while it is in flight");
    e.state.on_connect_ok(Duration::from_micros(100), later);
    let picks: Vec<_> = (0..30).map(|_| b.pick(0, &[], later).unwrap().endpoint.addr).collect();
    assert_eq!(picks.iter().filter(|&&a| a == e.addr).count(), 10, "back in the rotation");
}

/// Table shares per endpoint's last address byte.
fn table(b: &Balancer, now: Instant) -> HashMap<u8, f64> {
    let out: HashMap<u8, f64> = b
        .shares(now)
        .iter()
        .map(|s| {
            let SocketAddr::V4(a) = b.endpoints()[s.index].addr else { unreachable!() };
            (a.ip().octets()[3], s.share)
        })
        .collect();
    let sum: f64 = out.values().sum();
    assert!(out.is_empty() || (sum - 1.0).abs() < 1e-9, "shares sum to {sum}");
    out
}

#[test]
fn table_shares_follow_weights_health_locality_and_panic_as_picks_do() {
    let b = balancer(
        BalanceKind::Random,
        vec![ep(1, 3, Tier::Local), ep(2, 1, Tier::Local), ep(3, 1, Tier::Local), ep(9, 1, Tier::Region)],
    );
    let now = Instant::now();
    let t = table(&b, now);
    assert_eq!(t.len(), 3, "a healthy local tier keeps everything: {t:?}");
    assert!((t[&1] - 0.6).abs() < 1e-9 && (t[&2] - 0.2).abs() < 1e-9, "by weight: {t:?}");
    // One local of three out: 2/3 healthy < 0.7 spills 1 - (2/3)/0.7 of the total, as a
    // pick's draw does.
    eject(&b.endpoints()[1]);
    let t = table(&b, now);
    let spill = 1.0 - (2.0 / 3.0) / 0.7;
    assert!((t[&9] - spill).abs() < 1e-9, "spilled {t:?}");
    assert!(!t.contains_key(&2), "the ejected endpoint has no share");
    let picked = shares(&b, 40_000, |_| 0);
    for (k, v) in &t {
        assert!((picked[k] - v).abs() < 0.015, "table {t:?} vs picks {picked:?}");
    }
    // Past its back-off it is flagged a trial.
    let later = now + Duration::from_secs(5);
    let trial: Vec<bool> = b.shares(later).iter().filter(|s| s.index == 1).map(|s| s.trial).collect();
    assert_eq!(trial, [true]);
    // Three of four out is past max_ejected_percent (50%): health is ignored, by weight.
    eject(&b.endpoints()[0]);
    eject(&b.endpoints()[2]);
    let t = table(&b, now);
    assert_eq!(t.len(), 4, "panic: every live endpoint: {t:?}");
    assert!((t[&1] - 0.5).abs() < 1e-9);
    // Terminating endpoints never have a share; no live endpoint, no table.
    let gone = balancer(BalanceKind::Random, vec![Endpoint { terminating: true, ..ep(1, 1, Tier::Local) }]);
    assert!(gone.shares(now).is_empty());
}

proptest! {
    /// Whatever the health, weights and exclusions: a pick is never a terminating
    /// endpoint, and never an excluded one while a healthy untried endpoint exists.
    #[test]
    fn picks_respect_terminating_and_exclusions(
        spec in prop::collection::vec((1u32..5, any::<bool>(), any::<bool>(), any::<bool>(), 0usize..3), 1..8),
        kind in prop::sample::select(vec![
            BalanceKind::P2cEwma, BalanceKind::LeastConnections, BalanceKind::RoundRobin,
            BalanceKind::Random, BalanceKind::RingHash,
        ]),
        key in any::<u64>(),
    ) {
        let eps: Vec<Endpoint> = spec.iter().enumerate().map(|(i, &(w, term, ejected, _, tier))| {
            let mut e = ep(i as u8 + 1, w, Tier::ALL[tier]);
            e.terminating = term;
            if ejected { eject(&e); }
            e
        }).collect();
        let exclude: Vec<SocketAddr> = eps.iter().zip(&spec).filter(|(_, s)| s.3).map(|(e, _)| e.addr).collect();
        let b = Balancer::new(kind, eps.clone(), accrual(), 0.7);
        let now = Instant::now();
        match b.pick(key, &exclude, now) {
            None => prop_assert!(eps.iter().all(|e| e.terminating)
                || eps.iter().filter(|e| !e.terminating).all(|e| e.state.availability(now) == Avail::Out)),
            Some(p) => {
                prop_assert!(!p.endpoint.terminating);
                let healthy_untried = eps.iter().any(|e| !e.terminating && !exclude.contains(&e.addr)
                    && e.state.availability(now) != Avail::Out);
                if healthy_untried && !p.panic {
                    prop_assert!(!exclude.contains(&p.endpoint.addr));
                }
            }
        }
    }
}

/// A balancer with session affinity over endpoints 10.0.0.1..=n.
fn sticky(kind: BalanceKind, n: u8, affinity: Affinity) -> Balancer {
    balancer(kind, (1..=n).map(|i| ep(i, 1, Tier::Local)).collect()).with_affinity(Some(affinity))
}

/// The last address byte of the endpoint `b` picks for `key`.
fn pick_at(b: &Balancer, key: u64, exclude: &[SocketAddr], now: Instant) -> u8 {
    let SocketAddr::V4(a) = b.pick(key, exclude, now).expect("a pick").endpoint.addr else { unreachable!() };
    a.ip().octets()[3]
}

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i], 80))
}

const MS: Duration = Duration::from_millis(1);

#[test]
fn affinity_keeps_each_client_on_one_endpoint_where_round_robin_would_rotate() {
    let now = Instant::now();
    let plain = balancer(BalanceKind::RoundRobin, (1..=3).map(|i| ep(i, 1, Tier::Local)).collect());
    assert!(plain.affinity().is_none());
    assert_eq!((0..3).map(|_| pick_at(&plain, 7, &[], now)).collect::<Vec<_>>(), [1, 2, 3], "without: rotates");

    let b = sticky(BalanceKind::RoundRobin, 3, Affinity::new(Duration::from_secs(10), None));
    let picks: Vec<u8> = (0..200).map(|_| pick_at(&b, 7, &[], now)).collect();
    assert!(picks.iter().all(|&p| p == 1), "one client, one endpoint: {picks:?}");
    // New clients are balanced by the policy (round robin goes on where it was: one pick
    // so far), each then keeps its endpoint.
    let first: Vec<u8> = (1000..1300).map(|k| pick_at(&b, k, &[], now)).collect();
    let count = |e: u8| first.iter().filter(|&&p| p == e).count();
    assert_eq!((count(1), count(2), count(3)), (100, 100, 100), "different clients spread");
    let again: Vec<u8> = (1000..1300).rev().map(|k| pick_at(&b, k, &[], now)).collect();
    assert_eq!(again.into_iter().rev().collect::<Vec<_>>(), first, "and stick");
    assert_eq!(b.affinity().unwrap().clients(now), 301);
    assert_eq!(b.stats.by_tier[Tier::Local as usize].load(Ordering::Relaxed), 800, "hits count as picks");
}

#[test]
fn affinity_expires_after_the_timeout_and_each_connection_restarts_it() {
    let t = Duration::from_secs(10);
    let t0 = Instant::now();
    let b = sticky(BalanceKind::RoundRobin, 3, Affinity::new(t, None));
    assert_eq!(pick_at(&b, 1, &[], t0), 1);
    assert_eq!(pick_at(&b, 1, &[], t0 + t + MS), 2, "expired: round robin's next");

    let b = sticky(BalanceKind::RoundRobin, 3, Affinity::new(t, None));
    assert_eq!(pick_at(&b, 1, &[], t0), 1);
    assert_eq!(pick_at(&b, 1, &[], t0 + t - MS), 1, "just in time; the timer restarts");
    assert_eq!(pick_at(&b, 1, &[], t0 + 2 * t - 2 * MS), 1, "within the timeout of the last pick");
    let a = b.affinity().unwrap();
    assert_eq!(a.clients(t0 + 3 * t - 3 * MS), 1);
    assert_eq!(a.clients(t0 + 3 * t - 2 * MS), 0, "expired exactly a timeout after the last pick");
    assert_eq!(pick_at(&b, 1, &[], t0 + 3 * t), 2, "expired: moved, and remembered anew");
    assert_eq!(pick_at(&b, 1, &[], t0 + 3 * t + MS), 2);
}

#[test]
fn affinity_replaces_an_excluded_ejected_terminating_or_removed_endpoint_and_remembers_the_new_one() {
    let t = Duration::from_secs(60);
    let now = Instant::now();
    let b = sticky(BalanceKind::RoundRobin, 3, Affinity::new(t, None));
    assert_eq!(pick_at(&b, 1, &[], now), 1);
    // Tried by this connection already (a failed connect): the policy picks among the
    // rest, and the client moves there.
    let moved = pick_at(&b, 1, &[addr(1)], now);
    assert_ne!(moved, 1);
    assert_eq!(pick_at(&b, 1, &[], now), moved, "the retry's endpoint is remembered");
    // Ejected: moved again, for good.
    eject(&b.endpoints()[moved as usize - 1]);
    let again = pick_at(&b, 1, &[], now);
    assert_ne!(again, moved);
    assert!((0..20).all(|_| pick_at(&b, 1, &[], now) == again));

    // A rebuild (an edit, new endpoints) hands the table on: endpoints found by address.
    let rebuilt =
        |eps: Vec<Endpoint>| balancer(BalanceKind::RoundRobin, eps).with_affinity(Some(Affinity::new(t, b.affinity())));
    let mut reordered: Vec<Endpoint> = b.endpoints().iter().rev().cloned().collect();
    reordered.insert(0, ep(9, 1, Tier::Local));
    let b2 = rebuilt(reordered.clone());
    assert!(b2.affinity().unwrap().shares_table_with(b.affinity().unwrap()));
    assert_eq!(pick_at(&b2, 1, &[], now), again, "kept across a rebuild");
    for e in reordered.iter_mut().filter(|e| e.addr == addr(again)) {
        e.terminating = true;
    }
    let b3 = rebuilt(reordered);
    let on_terminating = pick_at(&b3, 1, &[], now);
    assert_ne!(on_terminating, again, "terminating: moved");
    let b4 = rebuilt(b3.endpoints().iter().filter(|e| e.addr != addr(on_terminating)).cloned().collect());
    assert_ne!(pick_at(&b4, 1, &[], now), on_terminating, "removed: moved");
}

#[test]
fn the_affinity_table_is_capped_and_makes_room_from_expired_clients_only() {
    let t = Duration::from_secs(10);
    let t0 = Instant::now();
    let b = sticky(BalanceKind::RoundRobin, 3, Affinity::with_cap(t, 16));
    let a = b.affinity().unwrap();
    for k in 0..200 {
        b.pick(k, &[], t0);
    }
    assert_eq!((a.clients(t0), a.held()), (16, 16), "at the cap");
    // Remembered clients stick; the others are balanced per connection (round robin
    // rotates them), since no entry has expired to make room.
    let sticks = |k: u64, now: Instant| pick_at(&b, k, &[], now) == pick_at(&b, k, &[], now);
    assert_eq!((0..200).filter(|&k| sticks(k, t0 + MS)).count(), 16);
    assert_eq!(a.held(), 16);
    // Once they have expired, new clients take their places.
    let t1 = t0 + t + 2 * MS;
    for k in 1000..1200 {
        b.pick(k, &[], t1);
    }
    assert_eq!((a.clients(t1), a.held()), (16, 16), "expired entries were swept, not kept");
    assert_eq!((1000..1200).filter(|&k| sticks(k, t1)).count(), 16);
    assert_eq!((0..200).filter(|&k| sticks(k, t1)).count(), 0, "the old ones are gone");
}

#[test]
fn an_affinity_table_below_the_cap_is_swept_as_it_grows() {
    let t = Duration::from_secs(10);
    let t0 = Instant::now();
    let b = sticky(BalanceKind::Random, 2, Affinity::new(t, None));
    let a = b.affinity().unwrap();
    for k in 0..1000 {
        b.pick(k, &[], t0);
    }
    assert_eq!(a.held(), 1000);
    // A new generation of clients after the first expired: held entries stay within
    // twice the live ones (plus each shard's minimum), not the sum of both.
    let t1 = t0 + t;
    for k in 10_000..11_000 {
        b.pick(k, &[], t1);
    }
    assert_eq!(a.clients(t1), 1000);
    assert!(a.held() < 2000, "expired clients swept lazily: {} held", a.held());
}
