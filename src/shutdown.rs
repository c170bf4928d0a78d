//! One stop signal for every task of a node. SIGTERM/SIGINT move it to
//! [`Phase::Leaving`]: `/readyz` fails while everything else goes on, for
//! `smtp.drain_delay`, so that load balancers stop sending new clients.
//! Then [`Phase::Draining`]: listeners close, a session goes on while its
//! client keeps talking and gets `421 4.3.0` once it waits for a command
//! for [`DRAIN_IDLE`], delivery leases nothing new.
//! After the grace period it moves to [`Phase::Closing`]: a session still
//! receiving a message is cut, while a commit in progress always runs to
//! its reply (cutting it would leave the client without its 250, and its
//! retry would queue a second copy). Once every session and delivery has
//! ended it moves to [`Phase::Stopped`]: the domain refresher and the admin
//! listener (which answered `/readyz` 503 meanwhile) end last.

use std::time::Duration;

use tokio::sync::watch;

/// While draining, how long a session may wait for its client's next
/// command before it is told `421` and closed: a client in the middle of
/// its work answers far sooner, an idle one (a cached connection) is let go.
pub const DRAIN_IDLE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    Leaving,
    Draining,
    Closing,
    Stopped,
}

/// Sets the phase (held by `server`).
pub struct Trigger(watch::Sender<Phase>);

/// Watches the phase (cloned into every task).
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<Phase>);

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(Phase::Running);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    /// Moves forward to `phase` (never back).
    pub fn advance(&self, phase: Phase) {
        self.0.send_if_modified(|p| {
            let moved = phase > *p;
            if moved {
                *p = phase;
            }
            moved
        });
    }
}

impl Shutdown {
    pub fn phase(&self) -> Phase {
        *self.0.borrow()
    }

    pub fn is_stopping(&self) -> bool {
        self.phase() >= Phase::Draining
    }

    /// The node has been told to stop (it may still serve for a moment).
    pub fn is_leaving(&self) -> bool {
        self.phase() >= Phase::Leaving
    }

    /// Returns once the phase is `phase` or later (never, if the trigger is gone
    /// without getting there).
    pub async fn reached(&mut self, phase: Phase) {
        if self.0.wait_for(|p| *p >= phase).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
