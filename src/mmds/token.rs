//! MMDS version 2 session tokens.
//!
//! Firecracker makes a token by encrypting its expiry (AES-GCM), so it keeps no state.
//! ember has no cipher in its dependencies: a token is 32 random bytes (hex) remembered
//! with its expiry, in a table of at most `MAX_TOKENS`; when the table is full the token
//! nearest to expiry goes first, so a guest that asks for tokens in a loop costs bounded
//! memory (and invalidates only its own oldest tokens).

use std::time::{Duration, Instant};

pub const MIN_TTL_SECONDS: u32 = 1;
pub const MAX_TTL_SECONDS: u32 = 21600;
/// Firecracker rejects longer tokens before looking at them.
pub const MAX_TOKEN_LEN: usize = 70;
const MAX_TOKENS: usize = 1024;
const TOKEN_BYTES: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error(
        "Invalid time to live value provided for token: {0}. Please provide a value between \
         {MIN_TTL_SECONDS} and {MAX_TTL_SECONDS}."
    )]
    InvalidTtl(u32),
    #[error("Failed to generate a token: {0}")]
    Random(String),
}

#[derive(Debug, Default)]
pub struct TokenAuthority {
    tokens: Vec<([u8; TOKEN_BYTES], Instant)>,
}

/// Fills `buf` from the kernel's random source.
pub fn random_bytes(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = buf.get_mut(done..).unwrap_or_default();
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`, which is valid
        // writable memory for that length.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; TOKEN_BYTES]> {
    let s = s.as_bytes();
    if s.len() != TOKEN_BYTES * 2 {
        return None;
    }
    let mut out = [0u8; TOKEN_BYTES];
    for (o, pair) in out.iter_mut().zip(s.chunks(2)) {
        let txt = std::str::from_utf8(pair).ok()?;
        *o = u8::from_str_radix(txt, 16).ok()?;
    }
    Some(out)
}

impl TokenAuthority {
    pub fn new() -> TokenAuthority {
        TokenAuthority::default()
    }

    /// A new token valid for `ttl` seconds.
    pub fn generate(&mut self, ttl: u32) -> Result<String, TokenError> {
        if !(MIN_TTL_SECONDS..=MAX_TTL_SECONDS).contains(&ttl) {
            return Err(TokenError::InvalidTtl(ttl));
        }
        let mut t = [0u8; TOKEN_BYTES];
        random_bytes(&mut t).map_err(|e| TokenError::Random(e.to_string()))?;
        let now = Instant::now();
        self.tokens.retain(|(_, exp)| *exp > now);
        if self.tokens.len() >= MAX_TOKENS
            && let Some(i) = self
                .tokens
                .iter()
                .enumerate()
                .min_by_key(|(_, (_, exp))| *exp)
                .map(|(i, _)| i)
        {
            self.tokens.swap_remove(i);
        }
        self.tokens
            .push((t, now + Duration::from_secs(u64::from(ttl))));
        Ok(hex(&t))
    }

    pub fn is_valid(&self, token: &str) -> bool {
        if token.len() > MAX_TOKEN_LEN {
            return false;
        }
        let Some(t) = unhex(token) else {
            return false;
        };
        let now = Instant::now();
        self.tokens.iter().any(|(k, exp)| *k == t && *exp > now)
    }

    /// Forgets every token (the tokens of a snapshot's source VM are not valid here).
    pub fn clear(&mut self) {
        self.tokens.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let mut a = TokenAuthority::new();
        assert_eq!(a.generate(0), Err(TokenError::InvalidTtl(0)));
        assert_eq!(a.generate(21601), Err(TokenError::InvalidTtl(21601)));
        let t = a.generate(60).unwrap();
        assert!(a.is_valid(&t));
        assert!(!a.is_valid("nope"));
        let mut wrong = t.clone().into_bytes();
        wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
        assert!(!a.is_valid(std::str::from_utf8(&wrong).unwrap()));
        for _ in 0..MAX_TOKENS * 2 {
            a.generate(1).unwrap();
        }
        assert!(a.tokens.len() <= MAX_TOKENS);
        // The long-lived token outlived the flood of short ones.
        assert!(a.is_valid(&t));
    }
}
