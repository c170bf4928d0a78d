//! Stored envelopes, read back from whatever the store holds. Input: a
//! mode byte, then (mode even) the fields of a Redis message hash as
//! HGETALL returns them, `field NUL value NUL ...`, or (mode odd) the
//! `queue_messages.envelope` JSON of the SQLite spool.
//!
//! Asserts: decoding never panics; a hash decodes only with an `id`, a
//! `recipients` JSON list and numeric `received_at`/`size`, and gives
//! back what it was given (id, sender, recipients with their states,
//! flags as `1`, RET and ENVID unless empty, a stored attempt count
//! clamped to `u32`, never wrapped); an envelope that decoded, written
//! back with the commit's encoder (and the operator's `held`/`bounce`
//! flags), decodes to the same envelope; the JSON form round-trips too, as does the recipients list
//! (and the DSN fields: `dsn_ret`, `dsn_envid`, each recipient's `notify`,
//! `orcpt` and `delay_warned`).
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use mxrelay::spool::{Envelope, Recipient};

fuzz_target!(|data: &[u8]| {
    let [mode, rest @ ..] = data else { return };
    if mode % 2 == 1 {
        let Ok(mut env) = serde_json::from_slice::<Envelope>(rest) else { return };
        // The fields store "no RET/ENVID" as an empty value, so an empty one
        // reads back as none. Only this JSON builds one: the session's are
        // never empty (`proto::dsn`), and `from_fields` reads none.
        env.dsn_ret = env.dsn_ret.filter(|v| !v.is_empty());
        env.dsn_envid = env.dsn_envid.filter(|v| !v.is_empty());
        round_trip(&env);
        let json = serde_json::to_string(&env).expect("an envelope always encodes");
        assert_eq!(serde_json::from_str::<Envelope>(&json).ok(), Some(env), "JSON round trip");
        return;
    }
    let mut fields = HashMap::new();
    let mut parts = rest.split(|&b| b == 0);
    while let (Some(k), Some(v)) = (parts.next(), parts.next()) {
        let (Ok(k), Ok(v)) = (std::str::from_utf8(k), std::str::from_utf8(v)) else { return };
        fields.insert(k.to_string(), v.to_string());
    }
    let Some(env) = Envelope::from_fields(&fields) else { return };
    assert_eq!(Some(env.id.as_str()), fields.get("id").map(String::as_str));
    assert_eq!(&env.sender, fields.get("sender").unwrap_or(&String::new()));
    let recipients: Vec<Recipient> = serde_json::from_str(&fields["recipients"]).expect("decoded recipients");
    assert_eq!(env.recipients, recipients);
    assert_eq!(env.smtputf8, fields.get("smtputf8").is_some_and(|v| v == "1"));
    assert_eq!(env.held, fields.get("held").is_some_and(|v| v == "1"));
    let dsn = |k: &str| fields.get(k).map(String::as_str).filter(|v| !v.is_empty());
    assert_eq!((env.dsn_ret.as_deref(), env.dsn_envid.as_deref()), (dsn("dsn_ret"), dsn("dsn_envid")));
    if let Some(n) = fields.get("attempts").and_then(|v| v.parse::<i64>().ok()) {
        assert_eq!(i64::from(env.attempts), n.clamp(0, i64::from(u32::MAX)), "attempts {n}");
    }
    round_trip(&env);
});

/// The commit's fields, plus the flags operators set, read back.
fn round_trip(env: &Envelope) {
    let mut stored: HashMap<String, String> =
        env.to_fields().expect("an envelope always encodes").into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    if env.held {
        stored.insert("held".into(), "1".into());
    }
    if env.bounce_requested {
        stored.insert("bounce".into(), "1".into());
    }
    assert_eq!(Envelope::from_fields(&stored).as_ref(), Some(env), "stored as {stored:?}");
    let json = serde_json::to_string(&env.recipients).expect("recipients always encode");
    assert_eq!(serde_json::from_str::<Vec<Recipient>>(&json).ok().as_ref(), Some(&env.recipients));
}
