//! Per-client limits of one node, in memory like Postfix's anvil: open
//! sessions per IP ([`PerIp`]) and event rates per IP in a fixed window
//! ([`Anvil`]: connections, messages, recipients, failed AUTH). Pure
//! bookkeeping; the listener and session decide the replies. Memory is
//! bounded by [`TRACKED_CLIENTS`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most client addresses whose rates are tracked at once; beyond it,
/// expired entries are dropped, and a new client is not tracked until
/// there is room (fail open rather than grow without bound).
pub const TRACKED_CLIENTS: usize = 100_000;

/// Open sessions per client IP, released when a session ends.
#[derive(Default)]
pub struct PerIp(Mutex<HashMap<IpAddr, usize>>);

/// One open session of `ip`; dropping it releases the count.
pub struct Slot<'a> {
    per_ip: &'a PerIp,
    ip: IpAddr,
}

impl PerIp {
    /// Takes a slot unless `ip` already holds `limit` (None = no limit).
    pub fn try_take(&self, ip: IpAddr, limit: Option<usize>) -> Option<Slot<'_>> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if limit.is_some_and(|l| *n >= l) {
            if *n == 0 {
                map.remove(&ip);
            }
            return None;
        }
        *n += 1;
        Some(Slot { per_ip: self, ip })
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut map = self.per_ip.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// What [`Anvil`] counts per client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Connection = 0,
    Message = 1,
    Recipient = 2,
    AuthFailure = 3,
}

impl Event {
    /// The `limit` label of `mxrelay_smtp_limit_hits_total` when its rate trips.
    pub fn label(self) -> &'static str {
        match self {
            Event::Connection => "connection_rate",
            Event::Message => "message_rate",
            Event::Recipient => "recipient_rate",
            Event::AuthFailure => "auth_failures",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    counts: [u32; 4],
}

/// Event counts per client IP in fixed windows of `rate_window`.
#[derive(Default)]
pub struct Anvil(Mutex<HashMap<IpAddr, Window>>);

impl Anvil {
    /// Counts one `event` of `ip` and says whether it stays within `limit`
    /// (0 = unlimited) for the window that began at most `window` ago.
    pub fn hit(&self, ip: IpAddr, event: Event, limit: u32, window: Duration) -> bool {
        self.hit_at(ip, event, limit, window, Instant::now())
    }

    /// The count of `event` for `ip` in its current window.
    pub fn count(&self, ip: IpAddr, event: Event, window: Duration) -> u32 {
        let now = Instant::now();
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&ip).filter(|w| now.duration_since(w.started) < window).map_or(0, |w| w.counts[event as usize])
    }

    fn hit_at(&self, ip: IpAddr, event: Event, limit: u32, window: Duration, now: Instant) -> bool {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(&ip) && map.len() >= TRACKED_CLIENTS {
            map.retain(|_, w| now.duration_since(w.started) < window);
            if map.len() >= TRACKED_CLIENTS {
                return true;
            }
        }
        let w = map.entry(ip).or_insert(Window { started: now, counts: [0; 4] });
        if now.duration_since(w.started) >= window {
            *w = Window { started: now, counts: [0; 4] };
        }
        let n = &mut w.counts[event as usize];
        *n = n.saturating_add(1);
        limit == 0 || *n <= limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn rate_limit_counts_per_ip_and_resets_with_the_window() {
        let anvil = Anvil::default();
        let t0 = Instant::now();
        let minute = Duration::from_secs(60);
        assert!(anvil.hit_at(IP, Event::Message, 2, minute, t0));
        assert!(anvil.hit_at(IP, Event::Message, 2, minute, t0));
        assert!(!anvil.hit_at(IP, Event::Message, 2, minute, t0 + Duration::from_secs(30)));
        // Other events and other clients have their own counts.
        assert!(anvil.hit_at(IP, Event::Recipient, 2, minute, t0));
        assert!(anvil.hit_at(OTHER, Event::Message, 2, minute, t0));
        // A new window starts afresh.
        assert!(anvil.hit_at(IP, Event::Message, 2, minute, t0 + minute));
    }

    #[test]
    fn zero_means_unlimited() {
        let anvil = Anvil::default();
        assert!((0..1000).all(|_| anvil.hit(IP, Event::Connection, 0, Duration::from_secs(60))));
        assert_eq!(anvil.count(IP, Event::Connection, Duration::from_secs(60)), 1000);
    }

    #[test]
    fn per_ip_slots_are_released_on_drop() {
        let per_ip = PerIp::default();
        let a = per_ip.try_take(IP, Some(2)).unwrap();
        let _b = per_ip.try_take(IP, Some(2)).unwrap();
        assert!(per_ip.try_take(IP, Some(2)).is_none());
        assert!(per_ip.try_take(OTHER, Some(2)).is_some());
        drop(a);
        assert!(per_ip.try_take(IP, Some(2)).is_some());
        assert!(per_ip.try_take(IP, None).is_some());
    }
}
