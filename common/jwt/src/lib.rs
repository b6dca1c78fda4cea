//! Verifying JWT bearer tokens, for every meshkit process that takes them
//! (the gateway, the console): HS256 against a shared secret, RS256 against
//! the RSA keys of a JWKS file (chosen by `kid`); expiry with 30 s of leeway,
//! and the issuer and audience when set. A verified token gives a
//! [`Principal`]: its subject, claims and roles.
#![forbid(unsafe_code)]

use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde_json::{Map, Value as Json};

/// Where tokens come from: the settings a process names its issuer with.
#[derive(Debug, Clone, Default)]
pub struct TokenSource<'a> {
    /// HS256 shared secret; empty: HS256 tokens are not accepted.
    pub hs256_secret: &'a str,
    /// A JWKS file of RSA public keys (RS256); empty: RS256 is not accepted.
    pub jwks_file: &'a str,
    /// Required `iss`, if not empty.
    pub issuer: &'a str,
    /// Required `aud`, if not empty.
    pub audience: &'a str,
    /// The claim holding a token's roles (a string or a list of strings).
    pub roles_claim: &'a str,
}

/// Who a verified token speaks for.
#[derive(Debug, Clone)]
pub struct Principal {
    pub subject: String,
    pub claims: Map<String, Json>,
    pub roles: Vec<String>,
}

/// Checks tokens against one issuer's keys; cheap to share behind an `Arc`.
pub struct Verifier {
    hs256: Option<DecodingKey>,
    jwks: Option<JwkSet>,
    issuer: String,
    audience: String,
    roles_claim: String,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("hs256", &self.hs256.is_some())
            .field("jwks_keys", &self.jwks.as_ref().map_or(0, |s| s.keys.len()))
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

impl Verifier {
    /// Reads the JWKS file, if any; an error names `setting` (`gateway.jwt`)
    /// and what is wrong with the file.
    pub fn new(source: &TokenSource<'_>, setting: &str) -> Result<Self, String> {
        let jwks = if source.jwks_file.is_empty() {
            None
        } else {
            let file = source.jwks_file;
            let text = std::fs::read_to_string(file).map_err(|e| format!("{setting}.jwks_file {file}: {e}"))?;
            let set: JwkSet =
                serde_json::from_str(&text).map_err(|e| format!("{setting}.jwks_file {file} is not a JWKS: {e}"))?;
            for jwk in &set.keys {
                DecodingKey::from_jwk(jwk)
                    .map_err(|e| format!("{setting}.jwks_file {file}: key {:?} is unusable: {e}", jwk.common.key_id))?;
            }
            Some(set)
        };
        Ok(Self {
            hs256: (!source.hs256_secret.is_empty()).then(|| DecodingKey::from_secret(source.hs256_secret.as_bytes())),
            jwks,
            issuer: source.issuer.to_owned(),
            audience: source.audience.to_owned(),
            roles_claim: source.roles_claim.to_owned(),
        })
    }

    /// Verifies `token`; the error says why it is not accepted.
    pub fn verify(&self, token: &str) -> Result<Principal, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref().cloned().ok_or("HS256 tokens are not accepted")?,
            Algorithm::RS256 => {
                let set = self.jwks.as_ref().ok_or("RS256 tokens are not accepted")?;
                let jwk = match &header.kid {
                    Some(kid) => set.find(kid).ok_or_else(|| format!("no key with kid {kid:?}"))?,
                    None if set.keys.len() == 1 => &set.keys[0],
                    None => return Err("the token names no kid".into()),
                };
                DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?
            }
            other => return Err(format!("algorithm {other:?} is not accepted")),
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = 30;
        if self.issuer.is_empty() {
            validation.iss = None;
        } else {
            validation.set_issuer(&[&self.issuer]);
        }
        if self.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&self.audience]);
        }
        let data = jsonwebtoken::decode::<Map<String, Json>>(token, &key, &validation).map_err(|e| e.to_string())?;
        let subject = data.claims.get("sub").and_then(Json::as_str).unwrap_or_default().to_owned();
        let roles = match data.claims.get(&self.roles_claim) {
            Some(Json::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            Some(Json::Array(items)) => items.iter().filter_map(Json::as_str).map(str::to_owned).collect(),
            _ => Vec::new(),
        };
        Ok(Principal { subject, claims: data.claims, roles })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    fn token(secret: &str, claims: Json) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    fn exp() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600
    }

    #[test]
    fn tokens_are_verified_and_their_roles_read() {
        let source =
            TokenSource { hs256_secret: "s3cret", issuer: "meshkit-test", roles_claim: "roles", ..Default::default() };
        let v = Verifier::new(&source, "console.jwt").unwrap();
        let p = v
            .verify(&token(
                "s3cret",
                serde_json::json!({"sub":"ann","iss":"meshkit-test","exp":exp(),"roles":"admin ops"}),
            ))
            .unwrap();
        assert_eq!((p.subject.as_str(), p.roles), ("ann", vec!["admin".to_owned(), "ops".to_owned()]));
        let refused = |claims: Json, secret: &str| v.verify(&token(secret, claims)).unwrap_err();
        assert!(
            refused(serde_json::json!({"sub":"e","iss":"meshkit-test","exp":exp()}), "other").contains("Signature")
        );
        assert!(refused(serde_json::json!({"sub":"e","iss":"meshkit-test","exp":1000}), "s3cret").contains("Expired"));
        assert!(refused(serde_json::json!({"sub":"e","iss":"else","exp":exp()}), "s3cret").contains("Issuer"));
        let none = Verifier::new(&TokenSource::default(), "x").unwrap();
        assert!(none.verify(&token("s3cret", serde_json::json!({"exp":exp()}))).unwrap_err().contains("not accepted"));
        let err = Verifier::new(&TokenSource { jwks_file: "/no/such/file", ..Default::default() }, "console.jwt")
            .unwrap_err();
        assert!(err.starts_with("console.jwt.jwks_file /no/such/file"), "{err}");
    }
}
