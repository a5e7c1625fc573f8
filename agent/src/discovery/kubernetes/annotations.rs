//! Per-service policy from a Service's annotations: `switchyard.io/<field>` sets that
//! field of each of the Service's switchyard services, in the config file's YAML
//! (`switchyard.io/connect: "{timeout: 500ms, attempts: 2}"`), the way Cilium reads
//! `service.cilium.io/*`.
//!
//! Each annotation stands alone: one that does not parse, or that makes the service's
//! policy invalid, is reported (naming the Service and the annotation) and left out, and
//! the Service keeps the default for that field and everything else it asked for.

use std::{collections::BTreeMap, time::Duration};

use serde::de::DeserializeOwned;

use crate::config::ServiceConfig;

/// The annotations read start with this; others are not kept.
pub const PREFIX: &str = "switchyard.io/";

type Setter = fn(&mut ServiceConfig, &str) -> Result<(), String>;

/// Every annotation, in the order applied (later ones are checked together with the
/// earlier ones that held).
const FIELDS: &[(&str, Setter)] = &[
    ("mode", |s, v| yaml(v).map(|x| s.mode = x)),
    ("protocol", |s, v| yaml(v).map(|x| s.protocol = x)),
    ("balance", |s, v| yaml(v).map(|x| s.balance = x)),
    ("connect", |s, v| yaml(v).map(|x| s.connect = x)),
    ("failure-accrual", |s, v| yaml(v).map(|x| s.failure_accrual = x)),
    ("health-check", |s, v| yaml(v).map(|x| s.health_check = x)),
    ("locality", |s, v| yaml(v).map(|x| s.locality = x)),
    ("drain-timeout", |s, v| duration(v).map(|x| s.drain_timeout = x)),
    ("http", |s, v| yaml(v).map(|x| s.http = x)),
];

fn yaml<T: DeserializeOwned>(value: &str) -> Result<T, String> {
    serde_yaml_ng::from_str(value).map_err(|e| e.to_string())
}

fn duration(value: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(value.trim()).map_err(|e| format!("`{value}`: {e}"))
}

/// What [`apply`] did: the fields it set, and one problem per annotation left out.
pub struct Applied {
    pub set: Vec<&'static str>,
    pub problems: Vec<String>,
}

/// Apply the Service's annotations (ours only, by full key) to `svc`. `object` names the
/// Service (`Service shop/web`).
pub fn apply(annotations: &BTreeMap<String, String>, svc: &mut ServiceConfig, object: &str) -> Applied {
    let (mut problems, mut set) = (Vec::new(), Vec::new());
    let known = |key: &String| FIELDS.iter().any(|(name, _)| key.strip_prefix(PREFIX) == Some(*name));
    for key in annotations.keys().filter(|k| !known(k)) {
        let known: Vec<String> = FIELDS.iter().map(|(name, _)| format!("{PREFIX}{name}")).collect();
        problems.push(format!("{object}: annotation {key} is not one Switchyard reads ({})", known.join(", ")));
    }
    for (name, setter) in FIELDS {
        let key = format!("{PREFIX}{name}");
        let Some(value) = annotations.get(&key) else { continue };
        let before = svc.clone();
        let mut why = setter(svc, value).err().into_iter().collect::<Vec<_>>();
        if why.is_empty() {
            svc.policy_problems("", &mut |field, message| {
                why.push(format!("{}: {message}", field.trim_start_matches('.')))
            });
        }
        if why.is_empty() {
            set.push(*name);
        } else {
            *svc = before;
            problems.push(format!("{object}: annotation {key}: {}; the default is used", why.join("; ")));
        }
    }
    Applied { set, problems }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BalanceKind, Protocol, ServiceMode};

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (format!("{PREFIX}{k}"), (*v).to_owned())).collect()
    }

    #[test]
    fn every_field_is_set_from_its_annotation() {
        let mut s = ServiceConfig::named("x");
        let Applied { problems, set } = apply(
            &annotations(&[
                ("mode", "kernel"),
                ("protocol", "tcp"),
                ("balance", "round-robin"),
                ("connect", "{timeout: 250ms, attempts: 2}"),
                ("failure-accrual", "{consecutive_failures: 5}"),
                ("health-check", "{kind: tcp, interval: 2s}"),
                ("locality", "{enabled: false}"),
                ("drain-timeout", "45s"),
                ("http", "{request_timeout: 3s, retry: {attempts: 2}}"),
            ]),
            &mut s,
            "Service a/x",
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(set.len(), FIELDS.len());
        assert_eq!((s.mode, s.protocol, s.balance), (ServiceMode::Kernel, Protocol::Tcp, BalanceKind::RoundRobin));
        assert_eq!((s.connect.timeout, s.connect.attempts), (Duration::from_millis(250), 2));
        assert_eq!(s.failure_accrual.consecutive_failures, 5);
        assert_eq!(s.health_check.as_ref().map(|h| h.interval), Some(Duration::from_secs(2)));
        assert!(!s.locality.enabled);
        assert_eq!(s.drain_timeout, Duration::from_secs(45));
        assert_eq!((s.http.request_timeout, s.http.retry.attempts), (Some(Duration::from_secs(3)), 2));
    }

    #[test]
    fn a_bad_annotation_is_named_and_only_it_is_left_out() {
        let mut s = ServiceConfig::named("x");
        let problems = apply(
            &annotations(&[
                ("balance", "fastest"),
                ("connect", "{attempts: 0}"),
                ("http", "{request_timeout: 2s}"),
                ("drain-timeout", "soon"),
                ("retries", "3"),
            ]),
            &mut s,
            "Service a/x",
        )
        .problems;
        let defaults = ServiceConfig::named("x");
        assert_eq!((s.balance, s.connect.attempts), (defaults.balance, defaults.connect.attempts));
        assert_eq!(s.drain_timeout, defaults.drain_timeout);
        assert_eq!(s.http.request_timeout, Some(Duration::from_secs(2)), "the good annotation holds");
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].starts_with("Service a/x: annotation switchyard.io/retries is not one Switchyard reads"));
        assert!(problems[1].starts_with("Service a/x: annotation switchyard.io/balance: unknown variant `fastest`"));
        assert_eq!(
            problems[2],
            "Service a/x: annotation switchyard.io/connect: connect.attempts: 0 is not between 1 and 10; the default is used"
        );
        assert!(problems[3].starts_with("Service a/x: annotation switchyard.io/drain-timeout: `soon`"), "{problems:?}");
    }

    #[test]
    fn annotations_are_checked_together() {
        // Kernel mode cannot balance requests: protocol http2 on top of it is refused.
        let mut s = ServiceConfig::named("x");
        let problems =
            apply(&annotations(&[("mode", "kernel"), ("protocol", "http2")]), &mut s, "Service a/x").problems;
        assert_eq!((s.mode, s.protocol), (ServiceMode::Kernel, Protocol::Auto));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("annotation switchyard.io/protocol: mode: `kernel`"), "{problems:?}");
    }
}
