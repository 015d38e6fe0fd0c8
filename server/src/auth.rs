//! The optional bearer token: read from a file or an environment variable at start, and
//! compared in constant time (subtle), so that timing does not tell how much of a guess was
//! right.

use std::path::Path;
use std::sync::Arc;

use subtle::ConstantTimeEq;

use crate::ServeError;

#[derive(Clone, Default)]
pub struct BearerToken(Option<Arc<[u8]>>);

impl BearerToken {
    pub fn none() -> Self {
        Self(None)
    }

    pub fn new(token: &str) -> Result<Self, String> {
        let token = token.trim();
        if token.is_empty() {
            return Err("the token is empty".into());
        }
        Ok(Self(Some(token.as_bytes().into())))
    }

    /// The token in `path` (surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<Self, ServeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ServeError::Token { path: path.into(), message: e.to_string() })?;
        Self::new(&text).map_err(|message| ServeError::Token { path: path.into(), message })
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// Checks an `authorization` header value (`Bearer <token>`).
    pub fn check(&self, header: Option<&[u8]>) -> Result<(), &'static str> {
        let Some(want) = &self.0 else {
            return Ok(());
        };
        let Some(header) = header else {
            return Err("this server requires a bearer token (authorization: Bearer <token>)");
        };
        let given = header.strip_prefix(b"Bearer ").unwrap_or(b"");
        if bool::from(given.ct_eq(want)) {
            Ok(())
        } else {
            Err("the bearer token is wrong")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_the_header() {
        let t = BearerToken::new(" s3cret\n").unwrap();
        assert!(t.check(Some(b"Bearer s3cret")).is_ok());
        assert!(t.check(Some(b"Bearer s3cre")).is_err());
        assert!(t.check(Some(b"Bearer s3cret2")).is_err());
        assert!(t.check(Some(b"s3cret")).is_err());
        assert!(t.check(None).unwrap_err().contains("requires a bearer token"));
        assert!(BearerToken::none().check(None).is_ok());
        assert!(BearerToken::new("  ").is_err());
    }
}
