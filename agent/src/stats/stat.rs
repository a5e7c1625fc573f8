//! `/stat` and `/edges`: the golden signals of [`Edges`] as rows, grouped the way an
//! operator asks (`linkerd viz stat`): by service, by client workload, by route (client
//! workload -> service) or by endpoint, over a window of up to a minute.

use std::{collections::BTreeMap, time::Duration, time::Instant};

use serde::Serialize;

use super::signals::{Edges, Window};

/// How rows are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    Service,
    Workload,
    Route,
    Endpoint,
}

impl By {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "service" | "services" | "svc" => Some(By::Service),
            "workload" | "workloads" => Some(By::Workload),
            "route" | "routes" => Some(By::Route),
            "endpoint" | "endpoints" => Some(By::Endpoint),
            _ => None,
        }
    }
}

/// What to keep: a service, a client workload (`namespace/kind/name` or `kind/name`).
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub service: Option<String>,
    pub workload: Option<String>,
}

/// One row of `/stat`.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The client workload, when rows are by workload or route.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(flatten)]
    pub signals: Window,
}

/// The rows of `edges` grouped `by`, with `filter`, over `window` ending `now`.
pub fn rows(edges: &Edges, by: By, filter: &Filter, window: Duration, now: Instant) -> Vec<Row> {
    let keep_service = |s: &str| filter.service.as_deref().is_none_or(|f| f == s);
    if by == By::Endpoint {
        return edges
            .endpoints()
            .into_iter()
            .filter(|((service, _), _)| keep_service(service))
            .map(|((service, endpoint), s)| Row {
                workload: None,
                service: Some(service),
                endpoint: Some(endpoint.to_string()),
                signals: s.over(window, now),
            })
            .collect();
    }
    let mut grouped: BTreeMap<(Option<String>, Option<String>), Window> = BTreeMap::new();
    for (key, s) in edges.routes() {
        let workload = key.client.display();
        let keep_workload = filter.workload.as_deref().is_none_or(|w| w == workload || w == key.client.label());
        if !keep_service(&key.service) || !keep_workload {
            continue;
        }
        let group = match by {
            By::Service => (None, Some(key.service)),
            By::Workload => (Some(workload), None),
            _ => (Some(workload), Some(key.service)),
        };
        grouped.entry(group).or_default().add(&s.over(window, now));
    }
    grouped
        .into_iter()
        .map(|((workload, service), signals)| Row { workload, service, endpoint: None, signals })
        .collect()
}

/// `/edges`: who talks to whom right now, as the graph the service map draws: client
/// workload -> service, and service -> endpoint, each active in the window (traffic in
/// it, or connections open).
#[derive(Debug, Serialize)]
pub struct Graph {
    pub window_secs: f64,
    pub routes: Vec<Row>,
    pub endpoints: Vec<Row>,
}

pub fn graph(edges: &Edges, window: Duration, now: Instant) -> Graph {
    let all = Filter::default();
    let active = |rows: Vec<Row>| rows.into_iter().filter(|r| !r.signals.is_idle()).collect();
    Graph {
        window_secs: window.as_secs_f64(),
        routes: active(rows(edges, By::Route, &all, window, now)),
        endpoints: active(rows(edges, By::Endpoint, &all, window, now)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::workload::Workload;

    #[test]
    fn rows_group_routes_by_service_workload_and_route() {
        let edges = Edges::default();
        let w = |n: &str| Arc::new(Workload { namespace: Some("shop".into()), kind: "deployment", name: n.into() });
        let (web, cart) = (w("web"), w("cart"));
        for _ in 0..3 {
            edges.route(&web, "shop/db").response(true, Duration::from_millis(1));
        }
        edges.route(&cart, "shop/db").response(false, Duration::from_millis(1));
        edges.route(&web, "shop/cache").opened();
        let now = Instant::now();
        let all = Filter::default();
        let by_service = rows(&edges, By::Service, &all, Duration::from_secs(60), now);
        let db = by_service.iter().find(|r| r.service.as_deref() == Some("shop/db")).unwrap();
        assert_eq!((db.signals.requests, db.signals.failures), (4, 1));
        let by_workload = rows(&edges, By::Workload, &all, Duration::from_secs(60), now);
        let names: Vec<_> = by_workload.iter().map(|r| r.workload.clone().unwrap()).collect();
        assert_eq!(names, ["shop/deployment/cart", "shop/deployment/web"]);
        assert_eq!(by_workload[1].signals.requests, 3);
        assert_eq!(by_workload[1].signals.open, 1);
        let only = Filter { service: Some("shop/db".into()), workload: Some("deployment/web".into()) };
        let routes = rows(&edges, By::Route, &only, Duration::from_secs(60), now);
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].signals.requests, 3);
    }
}
