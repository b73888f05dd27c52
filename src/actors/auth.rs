//! Passwords and tokens.
//!
//! Passwords are hashed with Argon2id (the crate's defaults, OWASP's recommended
//! parameters). Tokens are 48 random-looking bytes: the user id (so any node can route a
//! token to its user's home without a lookup) and 32 random bytes, base64url-encoded.
//! Only the token's SHA-256 is stored: a leaked database holds no usable token.
//!
//! Argon2 is slow and memory-hard by design (19 MiB per hash with the default
//! parameters), so every hash and check runs on the blocking pool behind one semaphore
//! sized to the CPU count: a burst of registrations or logins queues instead of taking
//! 19 MiB per request at once.

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::sync::OnceLock;
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::messages::TokenHash;
use crate::ids::UserId;

/// How long a token stays valid.
pub const TOKEN_LIFETIME_MS: i64 = 30 * 24 * 3600 * 1000;

const TOKEN_BYTES: usize = 48;

fn argon2_permits() -> &'static Semaphore {
    static PERMITS: OnceLock<Semaphore> = OnceLock::new();
    PERMITS
        .get_or_init(|| Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())))
}

/// Runs Argon2 work on the blocking pool, at most one job per CPU at a time.
async fn bounded<T: Send + 'static>(job: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let _permit = argon2_permits().acquire().await.ok()?;
    tokio::task::spawn_blocking(job).await.ok()
}

/// Hashes a password into a PHC string, off the calling thread.
pub async fn hash_password_bounded(password: String) -> Result<String, String> {
    bounded(move || hash_password(&password))
        .await
        .unwrap_or_else(|| Err("password hashing was interrupted".into()))
}

/// Checks a password against a PHC string, off the calling thread.
pub async fn verify_password_bounded(password: String, phc: String) -> bool {
    bounded(move || verify_password(&password, &phc))
        .await
        .unwrap_or(false)
}

/// Hashes a password into a PHC string. CPU-heavy: use the `_bounded` form on servers.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Checks a password against a PHC string. CPU-heavy: use the `_bounded` form on servers.
pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A fresh token for `user`, and the hash to store.
pub fn new_token(user: UserId) -> (String, TokenHash) {
    let mut raw = [0u8; TOKEN_BYTES];
    raw[..16].copy_from_slice(user.as_bytes());
    rand::thread_rng().fill_bytes(&mut raw[16..]);
    (URL_SAFE_NO_PAD.encode(raw), Sha256::digest(raw).into())
}

/// The user a token claims to belong to, and its hash. `None` for anything that is not
/// a well-formed token; whether it is valid is the user's actor to say.
pub fn parse_token(token: &str) -> Option<(UserId, TokenHash)> {
    if token.len() > 128 {
        return None;
    }
    let raw = URL_SAFE_NO_PAD.decode(token.as_bytes()).ok()?;
    if raw.len() != TOKEN_BYTES {
        return None;
    }
    let user = Uuid::from_slice(&raw[..16]).ok()?;
    Some((UserId(user), Sha256::digest(&raw).into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn token_round_trip() {
        let user = UserId::random();
        let (token, hash) = new_token(user);
        assert_eq!(parse_token(&token), Some((user, hash)));
        let (other, _) = new_token(user);
        assert_ne!(token, other);
    }

    #[test]
    fn password_round_trip() {
        let phc = hash_password("correct horse").unwrap();
        assert!(verify_password("correct horse", &phc));
        assert!(!verify_password("wrong horse", &phc));
        assert!(!verify_password("x", "not a phc string"));
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,200}") {
            let _ = parse_token(&s);
        }
    }
}
