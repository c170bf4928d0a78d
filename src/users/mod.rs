//! SMTP AUTH credentials: the `relay_users` table (MySQL or the embedded
//! SQLite, next to `domains`) holding Argon2id hashes, and the check that
//! AUTH PLAIN/LOGIN runs against it.
//!
//! Invariants: a password is never stored or logged in clear; an unknown
//! user costs the same Argon2 verification as a wrong password, so timing
//! does not reveal which names exist; a database fault is temporary
//! ([`UserError::Unavailable`] → 454), never a rejection; memory for
//! Argon2 is bounded by the verifier threads ([`verifier`]).

pub mod sql;
pub mod verifier;

use std::sync::{Arc, LazyLock};

use argon2::Argon2;
use argon2::password_hash::PasswordHasher;

/// Longest user name accepted (the column is VARCHAR(255)).
pub const USERNAME_LIMIT: usize = 255;
/// Longest password checked (so an AUTH PLAIN line fits the command-line
/// limit); longer ones fail after the same work.
pub const PASSWORD_LIMIT: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("user database unavailable: {0}")]
    Unavailable(String),
    #[error("user {0} already exists")]
    Duplicate(String),
    #[error("invalid user name {0:?}: {1}")]
    InvalidName(String, &'static str),
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error("every password verifier is busy and {} attempts wait", verifier::QUEUE)]
    Busy,
}

/// Where the credentials live. One file per back end.
#[async_trait::async_trait]
pub trait UserStore: Send + Sync {
    /// The stored hash of `username`, if the user exists.
    async fn password_hash(&self, username: &str) -> Result<Option<String>, UserError>;
    async fn add(&self, username: &str, password_hash: &str) -> Result<(), UserError>;
    /// Replaces the password of an existing user; `false` when there is none.
    async fn set_password(&self, username: &str, password_hash: &str) -> Result<bool, UserError>;
    /// `false` when the user did not exist.
    async fn remove(&self, username: &str) -> Result<bool, UserError>;
    /// Every user name with its creation time, sorted by name.
    async fn list(&self) -> Result<Vec<(String, String)>, UserError>;
}

/// Opens the store on the domain database `url` names (`mysql://…` or
/// `sqlite://…`); the tables come from the same migrations.
pub fn open(url: &str) -> Result<Arc<dyn UserStore>, UserError> {
    let unavailable = |e: crate::domains::DomainError| UserError::Unavailable(e.to_string());
    if url.starts_with("sqlite:") {
        let db = crate::domains::sqlite::SqliteDomains::connect(url).map_err(unavailable)?;
        Ok(Arc::new(sql::SqliteUsers::new(db.pool().clone())))
    } else {
        let db = crate::domains::mysql::MySqlDomains::connect(url, std::time::Duration::from_secs(5))
            .map_err(unavailable)?;
        Ok(Arc::new(sql::MySqlUsers::new(db.pool().clone())))
    }
}

/// Checks a user name before it is stored.
pub fn validate_name(name: &str) -> Result<(), UserError> {
    if name.is_empty() || name.len() > USERNAME_LIMIT {
        return Err(UserError::InvalidName(name.into(), "must be 1 to 255 bytes"));
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(UserError::InvalidName(name.into(), "must not contain spaces or control characters"));
    }
    Ok(())
}

/// An Argon2id PHC string for `password`, with a fresh random salt.
pub fn hash_password(password: &str) -> Result<String, UserError> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| UserError::Hash(e.to_string()))
}

/// Verified against when the user does not exist, so that an unknown name
/// takes as long as a wrong password.
static DUMMY_HASH: LazyLock<String> = LazyLock::new(|| hash_password("mxrelay-timing-equaliser").unwrap_or_default());

/// Checks `password` for `username`; `Ok(false)` for an unknown user and a
/// wrong password alike, after the same amount of work. `Busy` when every
/// verifier is at work and [`verifier::QUEUE`] attempts already wait.
pub async fn verify(store: &dyn UserStore, username: &str, password: &str) -> Result<bool, UserError> {
    let stored = if username.len() > USERNAME_LIMIT { None } else { store.password_hash(username).await? };
    let known = stored.is_some();
    let hash = stored.unwrap_or_else(|| DUMMY_HASH.clone());
    let matches = verifier::verify(password.as_bytes().to_vec(), hash).await?;
    Ok(known && matches && password.len() <= PASSWORD_LIMIT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::PasswordVerifier;

    #[test]
    fn hashes_verify_and_differ_per_salt() {
        let a = hash_password("s3cret").unwrap();
        let b = hash_password("s3cret").unwrap();
        assert!(a.starts_with("$argon2id$"));
        assert_ne!(a, b);
        assert!(Argon2::default().verify_password(b"s3cret", a.as_str()).is_ok());
        assert!(Argon2::default().verify_password(b"wrong", a.as_str()).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("alice@example.org").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name(&"x".repeat(256)).is_err());
    }
}
