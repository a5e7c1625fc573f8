//! Every background task the agent starts (health checks, drain deadlines, discovery
//! watchers, DNS refreshes), on one tracker with one stop signal, so shutdown stops them
//! all and knows when they are gone. Groups that are replaced as a whole (the health
//! checks of one snapshot) get a child whose stop does not touch the rest. Connection
//! tasks have their own tracker in `app`, drained differently (see docs/lifecycle.md).

use std::{future::Future, time::Duration};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

#[derive(Clone, Default)]
pub struct Background {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Background {
    /// Run `task` until it ends or this group (or its parent) is stopped.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                () = task => {}
            }
        });
    }

    /// A group on the same tracker that can be stopped on its own.
    pub fn child(&self) -> Background {
        Background { tracker: self.tracker.clone(), stop: self.stop.child_token() }
    }

    /// Stop the tasks of this group (and its children).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Tasks still running, in every group.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Stop everything and wait (at most `limit`) for the tasks to end; false if some
    /// did not in time.
    pub async fn shutdown(&self, limit: Duration) -> bool {
        self.stop.cancel();
        self.tracker.close();
        tokio::time::timeout(limit, self.tracker.wait()).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stopping_a_child_leaves_the_rest_and_shutdown_ends_all() {
        let all = Background::default();
        let checks = all.child();
        for group in [&all, &checks] {
            group.spawn(std::future::pending());
        }
        assert_eq!(all.len(), 2);
        checks.stop();
        tokio::time::timeout(Duration::from_secs(5), async {
            while all.len() != 1 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the child's task ends");
        assert!(all.shutdown(Duration::from_secs(5)).await, "every task ends on shutdown");
        assert!(all.is_empty());
    }
}
