//! rspamd's HTTP API: `POST /checkv2` with the message as the body and the
//! envelope in headers; the JSON answer carries the action and the score.

use std::time::Duration;

use serde::Deserialize;

use super::{Content, Envelope, ScanError};

/// The part of rspamd's answer we use.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RspamdReply {
    /// `no action`, `add header`, `rewrite subject`, `greylist`,
    /// `soft reject` or `reject`.
    pub action: String,
    #[serde(default)]
    pub score: f64,
    #[serde(default)]
    pub required_score: f64,
    /// The new subject, for `rewrite subject`.
    #[serde(default)]
    pub subject: Option<String>,
}

pub fn client(timeout: Duration) -> Result<reqwest::Client, ScanError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .no_proxy()
        .build()
        .map_err(|e| ScanError::Local(format!("rspamd client: {e}")))
}

/// Posts the message to rspamd at `url` (`http://host:port`).
pub async fn scan(
    client: &reqwest::Client,
    url: &str,
    content: &Content,
    env: &Envelope<'_>,
) -> Result<RspamdReply, ScanError> {
    let body = match content {
        Content::Memory(bytes) => reqwest::Body::from(bytes.clone()),
        Content::File(path) => {
            reqwest::Body::from(tokio::fs::File::open(path).await.map_err(|e| ScanError::Local(e.to_string()))?)
        }
    };
    let mut request = client
        .post(format!("{}/checkv2", url.trim_end_matches('/')))
        .header("IP", env.client_ip)
        .header("Helo", env.helo)
        .header("From", env.sender)
        .header("Queue-Id", env.queue_id)
        .header("Pass", "all");
    if env.client_name != "unknown" {
        request = request.header("Hostname", env.client_name);
    }
    if let Some(user) = env.user {
        request = request.header("User", user);
    }
    for rcpt in env.recipients {
        request = request.header("Rcpt", rcpt.as_str());
    }
    let response = request.body(body).send().await.map_err(|e| {
        if e.is_timeout() {
            ScanError::Timeout(format!("rspamd at {url}"))
        } else if e.is_connect() {
            ScanError::Unreachable(format!("rspamd at {url}: {e}"))
        } else {
            ScanError::Protocol(format!("rspamd at {url}: {e}"))
        }
    })?;
    if !response.status().is_success() {
        return Err(ScanError::Protocol(format!("rspamd at {url} answered HTTP {}", response.status())));
    }
    let bytes = response.bytes().await.map_err(|e| ScanError::Protocol(format!("rspamd at {url}: {e}")))?;
    parse_reply(&bytes)
}

pub fn parse_reply(body: &[u8]) -> Result<RspamdReply, ScanError> {
    let reply: RspamdReply = serde_json::from_slice(body)
        .map_err(|e| ScanError::Protocol(format!("rspamd answer is not the JSON expected: {e}")))?;
    match reply.action.as_str() {
        "no action" | "add header" | "rewrite subject" | "greylist" | "soft reject" | "reject" => Ok(reply),
        other => Err(ScanError::Protocol(format!("rspamd action {other:?} is unknown"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        let r = parse_reply(br#"{"action":"reject","score":1000.0,"required_score":15.0,"symbols":{}}"#).unwrap();
        assert_eq!((r.action.as_str(), r.score), ("reject", 1000.0));
        let r =
            parse_reply(br#"{"action":"rewrite subject","score":7.5,"required_score":15,"subject":"***SPAM*** hi"}"#)
                .unwrap();
        assert_eq!(r.subject.as_deref(), Some("***SPAM*** hi"));
        assert!(parse_reply(b"<html>").is_err());
        assert!(parse_reply(br#"{"action":"explode"}"#).is_err());
    }
}
