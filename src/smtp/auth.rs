//! SASL PLAIN and LOGIN (RFC 4954, RFC 4616) as the session sees them:
//! base64 responses in, credentials out. Pure; the session sends the
//! challenges and [`crate::users`] checks the password.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::proto::reply::Reply;

/// The mechanisms offered in EHLO, in this order.
pub const MECHANISMS: &str = "PLAIN LOGIN";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

impl Mechanism {
    pub fn parse(name: &str) -> Option<Mechanism> {
        match name {
            "PLAIN" => Some(Mechanism::Plain),
            "LOGIN" => Some(Mechanism::Login),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// Why a client response cannot be used; each has one reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaslError {
    /// The client sent `*` (RFC 4954 §4).
    Cancelled,
    /// Not base64, not UTF-8, or not the mechanism's layout.
    Malformed,
    /// PLAIN with an authorization identity other than the user: we do not
    /// let one user act as another.
    Authzid,
}

impl SaslError {
    pub fn reply(&self) -> Reply {
        match self {
            SaslError::Cancelled => Reply::new(501, "5.7.0", "Authentication aborted"),
            SaslError::Malformed => Reply::new(501, "5.5.2", "Cannot decode response"),
            SaslError::Authzid => Reply::new(535, "5.7.8", "Error: authentication failed"),
        }
    }
}

/// Decodes one base64 client response; `=` is the empty response.
pub fn decode(response: &str) -> Result<Vec<u8>, SaslError> {
    let response = response.trim();
    if response == "*" {
        return Err(SaslError::Cancelled);
    }
    if response == "=" {
        return Ok(Vec::new());
    }
    STANDARD.decode(response).map_err(|_| SaslError::Malformed)
}

/// A decoded response as text (LOGIN user name or password).
pub fn decode_text(response: &str) -> Result<String, SaslError> {
    String::from_utf8(decode(response)?).map_err(|_| SaslError::Malformed)
}

/// RFC 4616: `[authzid] NUL authcid NUL passwd`.
pub fn decode_plain(response: &str) -> Result<Credentials, SaslError> {
    let raw = decode(response)?;
    let parts: Vec<&[u8]> = raw.split(|&b| b == 0).collect();
    let [authzid, authcid, passwd] = parts.as_slice() else {
        return Err(SaslError::Malformed);
    };
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| SaslError::Malformed);
    let (authzid, username, password) = (text(authzid)?, text(authcid)?, text(passwd)?);
    if username.is_empty() {
        return Err(SaslError::Malformed);
    }
    if !authzid.is_empty() && authzid != username {
        return Err(SaslError::Authzid);
    }
    Ok(Credentials { username, password })
}

/// A server challenge (`334 …`): base64 of `text`.
pub fn challenge(text: &str) -> String {
    STANDARD.encode(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &[u8]) -> String {
        STANDARD.encode(s)
    }

    #[test]
    fn plain_with_and_without_authzid() {
        let c = decode_plain(&b64(b"\0alice\0s3cret")).unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("alice", "s3cret"));
        assert!(decode_plain(&b64(b"alice\0alice\0pw")).is_ok());
        assert_eq!(decode_plain(&b64(b"bob\0alice\0pw")), Err(SaslError::Authzid));
    }

    #[test]
    fn malformed_and_cancelled_responses() {
        assert_eq!(decode_plain("*"), Err(SaslError::Cancelled));
        assert_eq!(decode_plain("not base64!"), Err(SaslError::Malformed));
        assert_eq!(decode_plain(&b64(b"alice:pw")), Err(SaslError::Malformed));
        assert_eq!(decode_plain(&b64(b"\0\0pw")), Err(SaslError::Malformed));
        assert_eq!(decode_text("="), Ok(String::new()));
        assert_eq!(decode_text(&b64(&[0xff, 0xfe])), Err(SaslError::Malformed));
    }

    #[test]
    fn login_challenges_are_the_customary_ones() {
        assert_eq!(challenge("Username:"), "VXNlcm5hbWU6");
        assert_eq!(challenge("Password:"), "UGFzc3dvcmQ6");
    }
}
