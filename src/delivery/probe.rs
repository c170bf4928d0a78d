//! Recipient verification probes (`policy::verify`): one short session to
//! a listed domain's `relay_host`, dialled as its mail would be (the
//! domain's TLS level, loop detection, each address in turn), asking
//! `MAIL FROM:<>` and `RCPT TO:` and nothing more.

use std::sync::Arc;

use super::dialer::Dialer;
use super::route::{Route, RouteError};
use crate::dns::Dns;
use crate::domains::DomainRoute;
use crate::policy::verify::{Probe, ProbeAnswer};

pub struct Prober {
    dialer: Arc<Dialer>,
    dns: Dns,
}

impl Prober {
    pub fn new(dialer: Arc<Dialer>, dns: Dns) -> Prober {
        Prober { dialer, dns }
    }
}

#[async_trait::async_trait]
impl Probe for Prober {
    async fn probe(&self, route: &DomainRoute, address: &str) -> ProbeAnswer {
        let down = |why: String| ProbeAnswer::NoAnswer { why, down: true };
        let destination = Route::Relay { host: route.relay_host.clone(), port: route.relay_port };
        let targets = match destination.resolve(&self.dns).await {
            Ok(t) => t,
            Err(RouteError::Temporary(e) | RouteError::Permanent(_, e)) => return down(e),
        };
        let level = self.dialer.tls_level(&route.domain);
        let mut last_error = String::from("no address to try");
        for target in &targets {
            let mut conn = match self.dialer.open(target, level).await {
                Ok(conn) => conn,
                Err(e) => {
                    last_error = format!("{}[{}]:{}: {e}", target.host, target.addr.ip(), target.addr.port());
                    continue;
                }
            };
            let asked = conn.probe_recipient(address).await;
            let said = |reply: &dyn std::fmt::Display, command: &str| {
                format!("host {} said: {reply} (in reply to {command} command)", conn.peer())
            };
            let answer = match &asked {
                Ok(Ok(rcpt)) if rcpt.is_success() => ProbeAnswer::Deliverable(said(rcpt, "RCPT TO")),
                Ok(Ok(rcpt)) if rcpt.is_permanent() => ProbeAnswer::Undeliverable(said(rcpt, "RCPT TO")),
                Ok(Ok(rcpt)) => ProbeAnswer::NoAnswer { why: said(rcpt, "RCPT TO"), down: false },
                // A server refusing the null sender says nothing of the address.
                Ok(Err(mail)) => ProbeAnswer::NoAnswer { why: said(mail, "MAIL FROM"), down: false },
                Err(e) => ProbeAnswer::NoAnswer { why: format!("{}: {e}", conn.peer()), down: false },
            };
            conn.quit().await;
            return answer;
        }
        down(last_error)
    }
}
