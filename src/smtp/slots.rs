//! The node's connection slots (`smtp.max_connections`), all listeners
//! together, and stress mode. A reserve of `smtp.reserved_connections_percent`
//! of the slots is kept for clients in `mynetworks`, so that a flood of idle
//! connections from elsewhere never locks them out; a client from elsewhere
//! may take up to half of the reserve on probation when AUTH is on, and must
//! authenticate before MAIL. Above `smtp.stress_threshold_percent` of the
//! slots busy the node is under stress (Postfix's `${stress?...}`): every
//! session waits at most `smtp.stress_timeout` for a command or content,
//! sessions already waiting included.
//!
//! Invariant: at most `max_connections` slots are out; the reserve is only
//! taken when the general slots are all out.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::config::SmtpConfig;
use crate::metrics::METRICS;

/// Slot sizes derived from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sizes {
    general: usize,
    reserve: usize,
    /// Busy slots at which stress starts (0: never).
    stress_at: usize,
}

impl Sizes {
    fn of(c: &SmtpConfig) -> Sizes {
        let reserve = c.max_connections * c.reserved_connections_percent as usize / 100;
        let stress_at = match c.stress_threshold_percent {
            0 => 0,
            p => (c.max_connections * p as usize).div_ceil(100).max(1),
        };
        Sizes { general: c.max_connections - reserve, reserve, stress_at }
    }
}

pub struct Slots {
    general: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    sizes: Mutex<Sizes>,
    /// Permits (general, reserve) to forget as they come back, after a
    /// reload made a pool smaller while its slots were out.
    debt: Mutex<(usize, usize)>,
    stress: watch::Sender<bool>,
}

/// One open connection's slot; dropping it frees the slot.
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    slots: Arc<Slots>,
    /// Taken from the reserve.
    pub reserved: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            let mut debt = self.slots.debt.lock().unwrap_or_else(|e| e.into_inner());
            let owed = if self.reserved { &mut debt.1 } else { &mut debt.0 };
            if *owed > 0 {
                *owed -= 1;
                permit.forget();
            }
        }
        self.slots.update_stress();
    }
}

/// What a session needs to know about stress: whether it is on now (and
/// when it starts), and the timeout it imposes.
#[derive(Clone)]
pub struct Stress {
    pub on: watch::Receiver<bool>,
    pub timeout: Duration,
}

impl Stress {
    /// `timeout`, shortened while the node is under stress.
    pub fn limit(&self, timeout: Duration, stressed: bool) -> Duration {
        if stressed { timeout.min(self.timeout) } else { timeout }
    }
}

impl Slots {
    pub fn new(c: &SmtpConfig) -> Arc<Slots> {
        let sizes = Sizes::of(c);
        Arc::new(Slots {
            general: Arc::new(Semaphore::new(sizes.general)),
            reserve: Arc::new(Semaphore::new(sizes.reserve)),
            sizes: Mutex::new(sizes),
            debt: Mutex::new((0, 0)),
            stress: watch::channel(false).0,
        })
    }

    /// A general slot, if one is free.
    pub fn take(self: &Arc<Self>) -> Option<Slot> {
        let permit = self.general.clone().try_acquire_owned().ok()?;
        Some(self.slot(permit, false))
    }

    /// A reserved slot, once the general ones are all out: any free one for
    /// a client in `mynetworks`; for one on probation, only while more than
    /// half of the reserve is free.
    pub fn take_reserved(self: &Arc<Self>, trusted: bool) -> Option<Slot> {
        let reserve = self.sizes().reserve;
        if !trusted && self.reserve.available_permits() * 2 <= reserve {
            return None;
        }
        let permit = self.reserve.clone().try_acquire_owned().ok()?;
        Some(self.slot(permit, true))
    }

    fn slot(self: &Arc<Self>, permit: OwnedSemaphorePermit, reserved: bool) -> Slot {
        self.update_stress();
        Slot { permit: Some(permit), slots: self.clone(), reserved }
    }

    fn sizes(&self) -> Sizes {
        *self.sizes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Slots out now.
    fn busy(&self) -> usize {
        let s = self.sizes();
        let debt = *self.debt.lock().unwrap_or_else(|e| e.into_inner());
        (s.general + s.reserve + debt.0 + debt.1)
            .saturating_sub(self.general.available_permits() + self.reserve.available_permits())
    }

    /// Stress starts at `stress_at` busy slots and ends below three
    /// quarters of it (no flapping around the threshold).
    fn update_stress(&self) {
        let (busy, at) = (self.busy(), self.sizes().stress_at);
        let on = *self.stress.borrow();
        let next = at > 0 && if on { busy * 4 >= at * 3 } else { busy >= at };
        if next != on && self.stress.send_if_modified(|s| std::mem::replace(s, next) != next) {
            METRICS.smtp_stress.set(next as i64);
            if next {
                METRICS.smtp_stress_episodes.inc();
                tracing::warn!(busy, threshold = at, "stress mode on: command and data timeouts shortened");
            } else {
                tracing::info!(busy, threshold = at, "stress mode off: normal timeouts");
            }
        }
    }

    pub fn stress(&self, c: &SmtpConfig) -> Stress {
        Stress { on: self.stress.subscribe(), timeout: c.stress_timeout }
    }

    /// New sizes after a reload; slots out stay out.
    pub fn resize(&self, c: &SmtpConfig) {
        let new = Sizes::of(c);
        let mut sizes = self.sizes.lock().unwrap_or_else(|e| e.into_inner());
        let mut debt = self.debt.lock().unwrap_or_else(|e| e.into_inner());
        let (general_debt, reserve_debt) = &mut *debt;
        let pools = [
            (&self.general, sizes.general, new.general, general_debt),
            (&self.reserve, sizes.reserve, new.reserve, reserve_debt),
        ];
        for (sem, old, new, owed) in pools {
            // Grow by paying off debt first; shrink by forgetting free
            // permits, and the rest as the busy ones come back.
            let target = (new as isize) - (old as isize);
            if target > 0 {
                let paid = (*owed).min(target as usize);
                *owed -= paid;
                sem.add_permits(target as usize - paid);
            } else if target < 0 {
                let cut = (-target) as usize;
                *owed += cut - sem.forget_permits(cut);
            }
        }
        *sizes = new;
        drop((sizes, debt));
        self.update_stress();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max: usize, reserve: u32, stress: u32) -> SmtpConfig {
        SmtpConfig {
            max_connections: max,
            reserved_connections_percent: reserve,
            stress_threshold_percent: stress,
            ..SmtpConfig::default()
        }
    }

    #[test]
    fn the_reserve_is_for_trusted_clients_and_half_for_probation() {
        let slots = Slots::new(&config(20, 20, 0));
        let general: Vec<Slot> = (0..16).map_while(|_| slots.take()).collect();
        assert_eq!(general.len(), 16);
        assert!(slots.take().is_none());
        // 4 reserved: 2 on probation at most, then only trusted ones.
        let probation: Vec<Slot> = (0..4).map_while(|_| slots.take_reserved(false)).collect();
        assert_eq!(probation.len(), 2);
        assert!(probation.iter().all(|s| s.reserved));
        assert!(slots.take_reserved(true).is_some_and(|s| s.reserved));
        let _a = slots.take_reserved(true).expect("a trusted slot");
        let _b = slots.take_reserved(true).expect("a trusted slot");
        assert!(slots.take_reserved(true).is_none(), "more slots than max_connections");
        drop(general);
        assert!(slots.take().is_some());
    }

    #[test]
    fn stress_starts_at_the_threshold_and_ends_below_three_quarters() {
        let slots = Slots::new(&config(10, 0, 80));
        let stress = slots.stress(&SmtpConfig::default());
        let mut held: Vec<Slot> = (0..7).map(|_| slots.take().unwrap()).collect();
        assert!(!*stress.on.borrow());
        held.push(slots.take().unwrap());
        assert!(*stress.on.borrow(), "8 of 10 busy");
        held.truncate(6);
        assert!(*stress.on.borrow(), "6 of 10 busy: still >= 3/4 of 8");
        held.truncate(5);
        assert!(!*stress.on.borrow(), "5 of 10 busy");
        assert_eq!(stress.limit(Duration::from_secs(300), true), SmtpConfig::default().stress_timeout);
        assert_eq!(stress.limit(Duration::from_secs(300), false), Duration::from_secs(300));
    }

    #[test]
    fn resize_keeps_the_invariant() {
        let slots = Slots::new(&config(10, 0, 0));
        let held: Vec<Slot> = (0..10).map(|_| slots.take().unwrap()).collect();
        slots.resize(&config(4, 50, 0));
        drop(held);
        let general: Vec<Slot> = (0..10).map_while(|_| slots.take()).collect();
        assert_eq!(general.len(), 2);
        let reserved: Vec<Slot> = (0..10).map_while(|_| slots.take_reserved(true)).collect();
        assert_eq!(reserved.len(), 2);
    }
}
