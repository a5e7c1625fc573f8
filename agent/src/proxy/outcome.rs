//! How a proxied connection ended. The connection task returns one [`Outcome`]; `finish`
//! is the single place that turns it into the connection table's entry (and so its close
//! line) and the metrics.

use crate::stats::{ConnHandle, Metrics, metrics::UnservedLabels};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both sides finished normally.
    Closed,
    /// The client closed before sending anything.
    ClientClosed,
    /// An I/O or protocol error ended it.
    Error,
    /// Its endpoint left service and the drain deadline passed.
    Drained,
    /// No original destination was recorded: nobody redirected it here.
    NotRedirected,
    /// The original destination is no service's address.
    UnknownService,
    /// No endpoint could be reached; the client was reset.
    NoEndpoint,
    /// The agent was short of descriptors, buffers, memory or ports (see `capacity`);
    /// the client was reset.
    LocalError,
}

impl Outcome {
    /// The name in `/conns`, the close line and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::ClientClosed => "client_closed",
            Outcome::Error => "error",
            Outcome::Drained => "drained",
            Outcome::NotRedirected => "not_redirected",
            Outcome::UnknownService => "unknown_service",
            Outcome::NoEndpoint => "no_endpoint",
            Outcome::LocalError => "local_error",
        }
    }

    /// The connection never reached an endpoint for a reason on our side of it.
    fn unserved(self) -> bool {
        matches!(self, Outcome::NotRedirected | Outcome::UnknownService | Outcome::NoEndpoint | Outcome::LocalError)
    }
}

/// Record how the connection ended (its close line is logged when `conn` drops).
pub fn finish(conn: &ConnHandle, metrics: &Metrics, outcome: Outcome) {
    conn.outcome(outcome.name());
    if let (Some(edge), Outcome::NoEndpoint | Outcome::LocalError) = (conn.route_edge(), outcome) {
        edge.connect_failed();
    }
    if outcome.unserved() {
        let service = conn.service_name().unwrap_or_default().to_owned();
        metrics.unserved.get_or_create(&UnservedLabels { reason: outcome.name(), service }).inc();
    }
}
