//! JWT bearer authentication with a policy per method.
//!
//! HS256 tokens are checked against a shared secret, RS256 tokens against the
//! RSA keys of a JWKS file (chosen by `kid`). A rule names methods
//! (`package.Service/Method`, `package.Service/*` or `*`) and says whether a
//! token is needed and which roles it must carry; the first rule that names
//! a method wins, `default_policy` covers the rest. A token presented on a
//! public method is still checked, so its claims can be trusted downstream.
//! Verified claims travel on as metadata: `x-meshkit-subject` and
//! `x-meshkit-claims-bin` (the claims as JSON); the same headers coming from
//! a client are removed first, so they cannot be forged.

use meshkit_common::methods::MethodPattern;

use crate::settings::JwtSettings;
use http::{HeaderMap, HeaderValue};
use meshkit_jwt::{TokenSource, Verifier};

pub use meshkit_jwt::Principal;

pub const SUBJECT_HEADER: &str = "x-meshkit-subject";
pub const CLAIMS_HEADER: &str = "x-meshkit-claims-bin";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Policy {
    Public,
    Authenticated { roles: Vec<String> },
}

#[derive(Debug, Clone)]
struct Rule {
    methods: Vec<MethodPattern>,
    policy: Policy,
}

/// The authenticator; cheap to share behind an `Arc`.
pub struct Auth {
    verifier: Verifier,
    default_policy: Policy,
    rules: Vec<Rule>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("rules", &self.rules).field("default_policy", &self.default_policy).finish()
    }
}

impl Auth {
    /// From the validated settings; reads the JWKS file.
    pub fn from_settings(settings: &JwtSettings) -> Result<Self, String> {
        let source = TokenSource {
            hs256_secret: &settings.hs256_secret,
            jwks_file: &settings.jwks_file,
            issuer: &settings.issuer,
            audience: &settings.audience,
            roles_claim: &settings.roles_claim,
        };
        let verifier = Verifier::new(&source, "gateway.jwt")?;
        let policy = |name: &str, roles: &[String]| match name {
            "public" => Policy::Public,
            _ => Policy::Authenticated { roles: roles.to_vec() },
        };
        Ok(Self {
            verifier,
            default_policy: policy(&settings.default_policy, &[]),
            rules: settings
                .rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let methods = r
                        .methods
                        .iter()
                        .map(|m| MethodPattern::parse(m).map_err(|e| format!("gateway.jwt.rules[{i}].methods: {e}")))
                        .collect::<Result<Vec<_>, String>>()?;
                    Ok(Rule { methods, policy: policy(&r.policy, &r.roles) })
                })
                .collect::<Result<_, String>>()?,
        })
    }

    fn policy(&self, grpc_path: &str) -> &Policy {
        self.rules
            .iter()
            .find(|rule| rule.methods.iter().any(|m| m.matches(grpc_path)))
            .map_or(&self.default_policy, |r| &r.policy)
    }

    /// Checks the caller of `grpc_path`: strips forged identity headers,
    /// verifies the bearer token if any, enforces the method's policy and
    /// adds the verified identity as metadata.
    pub fn authorize(&self, grpc_path: &str, headers: &mut HeaderMap) -> Result<Option<Principal>, tonic::Status> {
        headers.remove(SUBJECT_HEADER);
        headers.remove(CLAIMS_HEADER);
        let token = match headers.get(http::header::AUTHORIZATION) {
            None => None,
            Some(value) => {
                let text = value.to_str().unwrap_or_default();
                let token = text
                    .strip_prefix("Bearer ")
                    .or_else(|| text.strip_prefix("bearer "))
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| {
                        tonic::Status::unauthenticated("the Authorization header is not `Bearer <token>`")
                    })?;
                Some(token.to_owned())
            }
        };
        let principal = match token {
            Some(token) => Some(self.verify(&token)?),
            None => None,
        };
        match (self.policy(grpc_path), &principal) {
            (Policy::Public, _) => {}
            (Policy::Authenticated { .. }, None) => {
                return Err(tonic::Status::unauthenticated(format!(
                    "{grpc_path} requires a bearer token (Authorization: Bearer <jwt>)"
                )));
            }
            (Policy::Authenticated { roles }, Some(p)) => {
                if !roles.is_empty() && !p.roles.iter().any(|r| roles.contains(r)) {
                    return Err(tonic::Status::permission_denied(format!(
                        "{grpc_path} requires one of the roles {roles:?}; the token of {:?} has none of them",
                        p.subject
                    )));
                }
            }
        }
        if let Some(p) = &principal {
            if let Ok(v) = HeaderValue::from_str(&p.subject) {
                headers.insert(SUBJECT_HEADER, v);
            }
            let claims = serde_json::to_vec(&p.claims).unwrap_or_default();
            let encoded = base64::Engine::encode(&base64::engine::general_purpose::STANDARD_NO_PAD, claims);
            if let Ok(v) = HeaderValue::from_str(&encoded) {
                headers.insert(CLAIMS_HEADER, v);
            }
        }
        Ok(principal)
    }

    fn verify(&self, token: &str) -> Result<Principal, tonic::Status> {
        self.verifier
            .verify(token)
            .map_err(|why| tonic::Status::unauthenticated(format!("invalid bearer token: {why}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::AuthRule;
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

    fn settings() -> JwtSettings {
        JwtSettings {
            hs256_secret: "s3cret".into(),
            issuer: "meshkit-test".into(),
            rules: vec![
                AuthRule { methods: vec!["a.Svc/Get".into()], policy: "public".into(), roles: vec![] },
                AuthRule {
                    methods: vec!["a.Svc/*".into()],
                    policy: "authenticated".into(),
                    roles: vec!["admin".into()],
                },
            ],
            default_policy: "authenticated".into(),
            ..JwtSettings::default()
        }
    }

    fn token(secret: &str, claims: serde_json::Value) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    fn exp() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600
    }

    fn headers(token: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(t) = token {
            h.insert("authorization", HeaderValue::from_str(&format!("Bearer {t}")).unwrap());
        }
        h.insert(SUBJECT_HEADER, HeaderValue::from_static("forged"));
        h
    }

    #[test]
    fn policies_and_tokens() {
        let auth = Auth::from_settings(&settings()).unwrap();
        let good = token("s3cret", serde_json::json!({"sub":"ann","iss":"meshkit-test","exp":exp(),"roles":["admin"]}));
        let plain = token("s3cret", serde_json::json!({"sub":"bob","iss":"meshkit-test","exp":exp()}));
        let forged = token("other", serde_json::json!({"sub":"eve","iss":"meshkit-test","exp":exp()}));
        let expired = token("s3cret", serde_json::json!({"sub":"ann","iss":"meshkit-test","exp":1000}));
        let wrong_iss = token("s3cret", serde_json::json!({"sub":"ann","iss":"else","exp":exp()}));

        let mut h = headers(None);
        assert!(auth.authorize("/a.Svc/Get", &mut h).unwrap().is_none());
        assert!(h.get(SUBJECT_HEADER).is_none(), "a client's identity header is dropped");

        let code =
            |path: &str, t: Option<&str>| auth.authorize(path, &mut headers(t)).map(|_| ()).map_err(|s| s.code());
        assert_eq!(code("/a.Svc/Put", None), Err(tonic::Code::Unauthenticated));
        assert_eq!(code("/a.Svc/Put", Some(&plain)), Err(tonic::Code::PermissionDenied));
        assert_eq!(code("/a.Svc/Put", Some(&good)), Ok(()));
        assert_eq!(code("/b.Other/X", Some(&plain)), Ok(()));
        assert_eq!(code("/b.Other/X", Some(&forged)), Err(tonic::Code::Unauthenticated));
        assert_eq!(code("/b.Other/X", Some(&expired)), Err(tonic::Code::Unauthenticated));
        assert_eq!(code("/b.Other/X", Some(&wrong_iss)), Err(tonic::Code::Unauthenticated));
        assert_eq!(
            code("/a.Svc/Get", Some(&forged)),
            Err(tonic::Code::Unauthenticated),
            "a bad token is refused anywhere"
        );

        let mut h = headers(Some(&good));
        auth.authorize("/a.Svc/Put", &mut h).unwrap();
        assert_eq!(h.get(SUBJECT_HEADER).unwrap(), "ann");
        assert!(h.get(CLAIMS_HEADER).is_some());

        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Basic abc"));
        let err = auth.authorize("/a.Svc/Get", &mut h).unwrap_err();
        assert!(err.message().contains("Bearer"), "{err:?}");
    }
}
