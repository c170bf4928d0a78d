//! The one envelope codec of every back end: an envelope is stored as
//! string fields, a Redis message hash's fields, and the same fields as a
//! JSON object in the embedded queue's `envelope` column. Operators' flags
//! are fields of their own ([`HELD`], [`BOUNCE`]) that the back ends set
//! in place (Lua, SQL) and a commit or deferral never writes.

use std::collections::HashMap;

use super::{Envelope, QueueId};

/// Field set (to `"1"`) on a message an operator put on hold.
pub const HELD: &str = "held";
/// Field set (to `"1"`) on a message an operator asked to bounce.
pub const BOUNCE: &str = "bounce";

impl Envelope {
    /// Reads the envelope from the string fields a back end stores.
    pub fn from_fields(f: &std::collections::HashMap<String, String>) -> Option<Envelope> {
        let get = |k: &str| f.get(k).cloned().unwrap_or_default();
        let num = |k: &str| f.get(k).and_then(|v| v.parse::<i64>().ok());
        Some(Envelope {
            id: QueueId(f.get("id")?.clone()),
            sender: get("sender"),
            recipients: serde_json::from_str(f.get("recipients")?).ok()?,
            client_ip: get("client_ip"),
            client_name: get("client_name"),
            helo: get("helo"),
            received_at: num("received_at")?,
            // As stored: a negative size is unreadable, not 2^64 - n.
            size: f.get("size")?.parse::<u64>().ok()?,
            node: get("node"),
            smtputf8: get("smtputf8") == "1",
            eight_bit: get("eight_bit") == "1",
            // Stored by us as a u32; anything outside is clamped, not wrapped.
            attempts: num("attempts").map_or(0, |n| u32::try_from(n.max(0)).unwrap_or(u32::MAX)),
            held: get(HELD) == "1",
            bounce_requested: get(BOUNCE) == "1",
            dsn_ret: f.get("dsn_ret").filter(|v| !v.is_empty()).cloned(),
            dsn_envid: f.get("dsn_envid").filter(|v| !v.is_empty()).cloned(),
        })
    }

    /// The string fields a commit (and a deferral) stores, which
    /// [`Envelope::from_fields`] reads back. Never [`HELD`] or [`BOUNCE`]:
    /// operators set those, and a deferral must not undo them.
    pub fn to_fields(&self) -> Result<Vec<(&'static str, String)>, serde_json::Error> {
        Ok(vec![
            ("id", self.id.to_string()),
            ("sender", self.sender.clone()),
            ("recipients", serde_json::to_string(&self.recipients)?),
            ("client_ip", self.client_ip.clone()),
            ("client_name", self.client_name.clone()),
            ("helo", self.helo.clone()),
            ("received_at", self.received_at.to_string()),
            ("size", self.size.to_string()),
            ("node", self.node.clone()),
            ("smtputf8", u8::from(self.smtputf8).to_string()),
            ("eight_bit", u8::from(self.eight_bit).to_string()),
            ("attempts", self.attempts.to_string()),
            ("dsn_ret", self.dsn_ret.clone().unwrap_or_default()),
            ("dsn_envid", self.dsn_envid.clone().unwrap_or_default()),
        ])
    }

    /// The fields as one JSON object of strings (the embedded queue's
    /// `envelope` column).
    pub(super) fn to_json(&self) -> Result<String, serde_json::Error> {
        let fields: std::collections::BTreeMap<&str, String> = self.to_fields()?.into_iter().collect();
        serde_json::to_string(&fields)
    }

    /// Reads [`Envelope::to_json`]'s object back (a `null` is a field not
    /// set); `None` when it is not one.
    pub(super) fn from_json(json: &str) -> Option<Envelope> {
        let fields: HashMap<String, Option<String>> = serde_json::from_str(json).ok()?;
        Envelope::from_fields(&fields.into_iter().filter_map(|(k, v)| Some((k, v?))).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{Recipient, RecipientState};

    fn envelope(size: u64) -> Envelope {
        Envelope {
            id: QueueId::new(),
            sender: "a@example.org".into(),
            recipients: vec![Recipient {
                address: "b@example.com".into(),
                domain: "example.com".into(),
                state: RecipientState::Pending,
                last_reply: None,
                delay_warned: false,
                notify: None,
                orcpt: None,
            }],
            client_ip: "192.0.2.1".into(),
            client_name: "client.example.net".into(),
            helo: "client.example.net".into(),
            received_at: 1_793_613_600_123,
            size,
            node: "n1".into(),
            smtputf8: true,
            eight_bit: false,
            attempts: 3,
            held: false,
            bounce_requested: false,
            dsn_ret: None,
            dsn_envid: None,
        }
    }

    fn stored(env: &Envelope) -> std::collections::HashMap<String, String> {
        env.to_fields().unwrap().into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    #[test]
    fn fields_round_trip() {
        for size in [0, 4711, u64::MAX] {
            let env = envelope(size);
            assert_eq!(Envelope::from_fields(&stored(&env)), Some(env.clone()));
            assert_eq!(Envelope::from_json(&env.to_json().unwrap()), Some(env));
        }
    }

    /// The operators' flags, set in place by a back end, read back; a
    /// `null` (SQLite's `json_set` of a missing field) is not set.
    #[test]
    fn flags_are_read_from_their_own_fields() {
        let mut fields = stored(&envelope(1));
        fields.insert(HELD.into(), "1".into());
        fields.insert(BOUNCE.into(), "1".into());
        let env = Envelope::from_fields(&fields).unwrap();
        assert!(env.held && env.bounce_requested);
        let json = envelope(1).to_json().unwrap().replacen('{', r#"{"held":null,"bounce":"0","#, 1);
        let env = Envelope::from_json(&json).unwrap();
        assert!(!env.held && !env.bounce_requested);
        assert_eq!(Envelope::from_json(r#"{"id":"x","size":1}"#), None, "no recipients, no arrival");
        assert_eq!(Envelope::from_json("[1]"), None);
    }

    /// Found by fuzz/fuzz_targets/spool_envelope.rs: `-831` was read as a
    /// size of 2^64 - 831, which the envelope's own encoder then wrote in a
    /// form it could not read back.
    #[test]
    fn a_negative_size_is_unreadable() {
        let mut fields = stored(&envelope(1));
        fields.insert("size".into(), "-831".into());
        assert_eq!(Envelope::from_fields(&fields), None);
    }

    /// A stored attempt count beyond `u32` (only a hand-edited or foreign
    /// hash has one) is clamped, not wrapped back to a first attempt.
    #[test]
    fn an_oversized_attempt_count_is_clamped() {
        let mut fields = stored(&envelope(1));
        for (raw, read) in [("4294967301", u32::MAX), ("-4", 0), ("7", 7)] {
            fields.insert("attempts".into(), raw.into());
            assert_eq!(Envelope::from_fields(&fields).unwrap().attempts, read, "{raw}");
        }
    }
}
