//! The HTTP rules beside the attempt engine: after a failed attempt, whether another
//! may follow (by what failed, the method, whether the body can be sent again, and the
//! service's retry budget). The engine (`proxy::attempt`) owns the count, the deadline and
//! the picks; this owns only the HTTP judgement. See docs/http.md, "Retries".

use std::time::Instant;

use hyper::Method;
use tracing::debug;

use super::headers::is_idempotent;
use crate::{
    config::RetryConfig,
    state::Service,
    stats::{Metrics, metrics::RetryReason},
};

/// How an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection to the endpoint: the request never reached a server.
    Connect,
    /// A pooled connection the server had closed gave the request back unsent.
    Closed,
    /// No response headers within the attempt's time.
    Timeout,
    /// The connection broke after the request went out.
    Broke,
    /// A response with a status (or gRPC status) the policy retries.
    Status,
    /// The agent could not open a connection for want of its own resources (see
    /// `capacity`): another endpoint would fail the same way.
    Local,
}

pub struct Retry<'a> {
    policy: &'a RetryConfig,
    idempotent: bool,
}

impl<'a> Retry<'a> {
    pub fn new(policy: &'a RetryConfig, method: &Method) -> Self {
        Self { policy, idempotent: is_idempotent(method) }
    }

    /// Attempts in all, the first included.
    pub fn attempts(&self) -> u32 {
        self.policy.attempts
    }

    /// Whether a failure of this kind may be tried again: always when the request never
    /// reached a server or the status says so; after a timeout or a broken connection
    /// only for idempotent methods (the server may have acted on it).
    pub fn after(&self, failure: Failure) -> Option<RetryReason> {
        match failure {
            Failure::Connect => Some(RetryReason::Connect),
            Failure::Closed => Some(RetryReason::Closed),
            Failure::Status => Some(RetryReason::Status),
            Failure::Local => None,
            Failure::Timeout => self.idempotent.then_some(RetryReason::Timeout),
            Failure::Broke => self.idempotent.then_some(RetryReason::Error),
        }
    }

    /// Before another attempt: the body must be there to send again (`sendable`), and
    /// the service's budget must allow one more retry (taken from it if so).
    pub fn may_send_again(&self, service: &Service, sendable: bool, metrics: &Metrics, now: Instant) -> bool {
        if !sendable {
            return false;
        }
        if !service.budget.withdraw(now) {
            service.metrics.budget_exhausted(metrics);
            debug!(service = %service.name, "retry budget spent; not retrying");
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_idempotent_requests_are_retried_once_they_may_have_reached_the_server() {
        let policy = RetryConfig::default();
        let post = Retry::new(&policy, &Method::POST);
        let get = Retry::new(&policy, &Method::GET);
        for failure in [Failure::Connect, Failure::Closed, Failure::Status] {
            assert!(post.after(failure).is_some(), "{failure:?}: never reached a server, or the status says so");
        }
        for failure in [Failure::Timeout, Failure::Broke] {
            assert_eq!(post.after(failure), None, "{failure:?} on a POST");
            assert!(get.after(failure).is_some(), "{failure:?} on a GET");
        }
    }
}
