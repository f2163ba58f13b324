//! Binds certificate requests to Kubernetes service-account tokens.
//!
//! Without it, the shared API token alone entitles its holder to a certificate for any
//! identity in the trust domain. With it (`outrider-control serve --sa-jwks FILE`), a proxy
//! gets a certificate only for the service account its pod runs as: it sends the projected
//! token its kubelet mounted (audience `outrider` by default), and the control plane verifies
//! it offline against the cluster issuer's public keys (the JWKS that
//! `kubectl get --raw /openid/v1/jwks` prints): signature, expiry, audience, issuer when one is
//! set, and a subject `system:serviceaccount:<namespace>:<name>` naming exactly the namespace
//! and service account asked for.
//!
//! The same token binds subscriptions: a proxy may subscribe only as the workload named like
//! its service account (one service account per workload, as the mesh identity
//! `spiffe://<td>/ns/<ns>/sa/<sa>` assumes), so a token cannot fetch another workload's policy.
//!
//! The JWKS file is read again when it changes (the issuer rotates its keys; a ConfigMap
//! update replaces the file); a new file that cannot be read or parsed leaves the keys in use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Header carrying the pod's service-account token on `POST /v1/certificate`.
pub use outrider_config::wire::SERVICE_ACCOUNT_TOKEN_HEADER;

/// Default audience the tokens must be minted for (the projected volume's `audience`).
pub const DEFAULT_AUDIENCE: &str = "outrider";
/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: u64 = 30;
/// Prefix of a service account's subject in a Kubernetes token.
const SUBJECT_PREFIX: &str = "system:serviceaccount:";

/// Why a token entitles to no certificate, or the key set cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ServiceAccountError {
    /// The JWKS file could not be read.
    #[error("cannot read the service-account JWKS {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The JWKS file holds no usable key.
    #[error("{path} is not a usable JWKS: {reason}")]
    Jwks {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The request carried no token.
    #[error("no service-account token: this control plane issues certificates and policy only to the service account a pod's token proves (proxy: --identity-token-file)")]
    Missing,
    /// The token is not a JWT, or names an algorithm not accepted here.
    #[error("not a service-account token: {0}")]
    Malformed(String),
    /// No key in the JWKS has the token's key id.
    #[error("service-account token signed by an unknown key (kid {0:?})")]
    UnknownKey(Option<String>),
    /// Signature, expiry, audience or issuer check failed.
    #[error("service-account token rejected: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    /// The token is valid but not a service account's.
    #[error("token subject `{0}` is not a service account")]
    Subject(String),
    /// The token is for another service account than the one asked for.
    #[error("the token is for service account {token}, not {asked}")]
    Mismatch {
        /// `namespace/name` the token proves.
        token: String,
        /// `namespace/name` the request asked for.
        asked: String,
    },
    /// The token is for a service account whose workload is not the one subscribed as.
    #[error("token is for service account {namespace}/{name}; it may subscribe as workload {name:?}, not {workload:?}")]
    WorkloadMismatch {
        /// The token's namespace.
        namespace: String,
        /// The token's service account, the only workload it may subscribe as.
        name: String,
        /// The workload asked for.
        workload: String,
    },
}

/// A service account a token proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// One verification key of the issuer.
struct IssuerKey {
    kid: Option<String>,
    key: DecodingKey,
}

/// The keys in use and the modification time of the file they came from.
struct KeySet {
    modified: Option<SystemTime>,
    keys: Arc<Vec<IssuerKey>>,
}

/// Verifies service-account tokens against an issuer's JWKS file.
pub struct ServiceAccountTokens {
    path: PathBuf,
    issuer: Option<String>,
    audience: String,
    current: Mutex<KeySet>,
}

impl std::fmt::Debug for ServiceAccountTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountTokens")
            .field("path", &self.path)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

impl ServiceAccountTokens {
    /// Reads the JWKS at `path`; tokens must be for `audience` and, when given, from `issuer`.
    pub fn open(
        path: &Path,
        issuer: Option<String>,
        audience: String,
    ) -> Result<Self, ServiceAccountError> {
        let modified = modified(path);
        let keys = read_keys(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            issuer,
            audience,
            current: Mutex::new(KeySet {
                modified,
                keys: Arc::new(keys),
            }),
        })
    }

    /// Checks that `token` proves the service account `namespace/name`.
    pub fn check(
        &self,
        token: Option<&str>,
        namespace: &str,
        name: &str,
    ) -> Result<ServiceAccount, ServiceAccountError> {
        let proved = self.verify(token.ok_or(ServiceAccountError::Missing)?)?;
        if proved.namespace != namespace || proved.name != name {
            return Err(ServiceAccountError::Mismatch {
                token: format!("{}/{}", proved.namespace, proved.name),
                asked: format!("{namespace}/{name}"),
            });
        }
        Ok(proved)
    }

    /// Checks that `token` may subscribe as `workload`: one service account per workload, so
    /// the workload is the token's service account name.
    pub fn check_workload(
        &self,
        token: Option<&str>,
        workload: &str,
    ) -> Result<ServiceAccount, ServiceAccountError> {
        let proved = self.verify(token.ok_or(ServiceAccountError::Missing)?)?;
        if proved.name != workload {
            return Err(ServiceAccountError::WorkloadMismatch {
                namespace: proved.namespace,
                name: proved.name,
                workload: workload.to_string(),
            });
        }
        Ok(proved)
    }

    /// Verifies `token` and returns the service account it proves.
    pub fn verify(&self, token: &str) -> Result<ServiceAccount, ServiceAccountError> {
        let header = jsonwebtoken::decode_header(token.trim())
            .map_err(|e| ServiceAccountError::Malformed(e.to_string()))?;
        // Only public-key algorithms: an HMAC "signature" would be checked against a public
        // key, which anyone has.
        if matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return Err(ServiceAccountError::Malformed(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let keys = self.keys();
        let candidates: Vec<&IssuerKey> = match &header.kid {
            Some(kid) => keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                .collect(),
            None => keys.iter().collect(),
        };
        if candidates.is_empty() {
            return Err(ServiceAccountError::UnknownKey(header.kid));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&[&self.audience]);
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
        }
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        let mut last = None;
        for candidate in candidates {
            match jsonwebtoken::decode::<Claims>(token.trim(), &candidate.key, &validation) {
                Ok(data) => return subject(&data.claims.sub),
                Err(e) => last = Some(e),
            }
        }
        Err(last.map_or(
            ServiceAccountError::UnknownKey(header.kid),
            ServiceAccountError::Invalid,
        ))
    }

    /// The keys in use, read again first if the file changed.
    fn keys(&self) -> Arc<Vec<IssuerKey>> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let now = modified(&self.path);
        if now != current.modified {
            current.modified = now;
            match read_keys(&self.path) {
                Ok(keys) => {
                    tracing::info!(path = %self.path.display(), keys = keys.len(), "service-account JWKS reloaded");
                    current.keys = Arc::new(keys);
                }
                Err(error) => {
                    tracing::warn!(%error, "service-account JWKS changed but cannot be used; keeping the keys in use");
                }
            }
        }
        Arc::clone(&current.keys)
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn read_keys(path: &Path) -> Result<Vec<IssuerKey>, ServiceAccountError> {
    let text = std::fs::read_to_string(path).map_err(|source| ServiceAccountError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let jwks_error = |reason: String| ServiceAccountError::Jwks {
        path: path.to_path_buf(),
        reason,
    };
    let set: JwkSet = serde_json::from_str(&text).map_err(|e| jwks_error(e.to_string()))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        match DecodingKey::from_jwk(jwk) {
            Ok(key) => keys.push(IssuerKey {
                kid: jwk.common.key_id.clone(),
                key,
            }),
            Err(e) => {
                tracing::warn!(kid = jwk.common.key_id.as_deref(), error = %e, "JWKS key skipped");
            }
        }
    }
    if keys.is_empty() {
        return Err(jwks_error("no usable key".into()));
    }
    Ok(keys)
}

/// `system:serviceaccount:<namespace>:<name>` as a [`ServiceAccount`].
fn subject(sub: &str) -> Result<ServiceAccount, ServiceAccountError> {
    sub.strip_prefix(SUBJECT_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains(':'))
        .map(|(namespace, name)| ServiceAccount {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
        .ok_or_else(|| ServiceAccountError::Subject(sub.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    /// An issuer: a P-256 key, its id, and its JWK.
    struct Issuer {
        kid: String,
        key: EncodingKey,
        jwk: serde_json::Value,
    }

    impl Issuer {
        fn new(kid: &str) -> Self {
            let pair = rcgen::KeyPair::generate().unwrap();
            let point = pair.public_key_raw();
            // Uncompressed point: 0x04, X (32 bytes), Y (32 bytes).
            let (x, y) = point[1..].split_at(32);
            Self {
                kid: kid.into(),
                key: EncodingKey::from_ec_der(&pair.serialize_der()),
                jwk: json!({
                    "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                    "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
                }),
            }
        }

        fn token(&self, claims: &serde_json::Value) -> String {
            let mut header = Header::new(Algorithm::ES256);
            header.kid = Some(self.kid.clone());
            jsonwebtoken::encode(&header, claims, &self.key).unwrap()
        }
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn claims(sub: &str) -> serde_json::Value {
        json!({
            "iss": "https://kubernetes.default.svc.cluster.local",
            "aud": ["outrider"],
            "sub": sub,
            "iat": now(), "nbf": now(), "exp": now() + 3600,
        })
    }

    struct Jwks(PathBuf);
    impl Jwks {
        fn write(tag: &str, issuers: &[&Issuer]) -> Self {
            let path = std::env::temp_dir()
                .join(format!("outrider-jwks-{tag}-{}.json", std::process::id()));
            let jwks = Self(path);
            jwks.rewrite(issuers);
            jwks
        }
        fn rewrite(&self, issuers: &[&Issuer]) {
            let keys: Vec<_> = issuers.iter().map(|i| i.jwk.clone()).collect();
            let tmp = self.0.with_extension("tmp");
            std::fs::write(&tmp, json!({ "keys": keys }).to_string()).unwrap();
            std::fs::rename(&tmp, &self.0).unwrap();
        }
    }
    impl Drop for Jwks {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn verifier(jwks: &Jwks) -> ServiceAccountTokens {
        ServiceAccountTokens::open(
            &jwks.0,
            Some("https://kubernetes.default.svc.cluster.local".into()),
            DEFAULT_AUDIENCE.into(),
        )
        .unwrap()
    }

    const PAYMENTS: &str = "system:serviceaccount:shop:payments";

    #[test]
    fn a_pods_token_proves_its_service_account_and_no_other() {
        let issuer = Issuer::new("k1");
        let jwks = Jwks::write("proves", &[&issuer]);
        let tokens = verifier(&jwks);
        let token = issuer.token(&claims(PAYMENTS));
        let proved = tokens.check(Some(&token), "shop", "payments").unwrap();
        assert_eq!(
            proved,
            ServiceAccount {
                namespace: "shop".into(),
                name: "payments".into()
            }
        );
        let err = tokens.check(Some(&token), "shop", "checkout").unwrap_err();
        assert!(
            matches!(&err, ServiceAccountError::Mismatch { token, asked } if token == "shop/payments" && asked == "shop/checkout"),
            "{err}"
        );
        let err = tokens.check(Some(&token), "bank", "payments").unwrap_err();
        assert!(matches!(err, ServiceAccountError::Mismatch { .. }), "{err}");
        assert!(matches!(
            tokens.check(None, "shop", "payments"),
            Err(ServiceAccountError::Missing)
        ));
    }

    #[test]
    fn a_token_subscribes_only_as_its_service_accounts_workload() {
        let issuer = Issuer::new("k1");
        let jwks = Jwks::write("workload", &[&issuer]);
        let tokens = verifier(&jwks);
        let token = issuer.token(&claims(PAYMENTS));
        assert_eq!(
            tokens
                .check_workload(Some(&token), "payments")
                .unwrap()
                .name,
            "payments"
        );
        let err = tokens.check_workload(Some(&token), "orders").unwrap_err();
        assert_eq!(
            err.to_string(),
            "token is for service account shop/payments; it may subscribe as workload \"payments\", not \"orders\""
        );
        assert!(matches!(
            tokens.check_workload(None, "payments"),
            Err(ServiceAccountError::Missing)
        ));
        // A forged token proves nothing, whatever workload it names.
        let forged = Issuer::new("k1").token(&claims(PAYMENTS));
        assert!(matches!(
            tokens.check_workload(Some(&forged), "payments"),
            Err(ServiceAccountError::Invalid(_))
        ));
    }

    #[test]
    fn forged_expired_and_misdirected_tokens_are_refused() {
        let issuer = Issuer::new("k1");
        let jwks = Jwks::write("refused", &[&issuer]);
        let tokens = verifier(&jwks);
        let invalid = |token: &str| {
            let err = tokens.verify(token).unwrap_err();
            assert!(matches!(err, ServiceAccountError::Invalid(_)), "{err}");
            err.to_string()
        };

        // Another key claiming the issuer's key id: the signature does not verify.
        let forger = Issuer::new("k1");
        invalid(&forger.token(&claims(PAYMENTS)));

        let mut expired = claims(PAYMENTS);
        expired["exp"] = json!(now() - 120);
        assert!(invalid(&issuer.token(&expired)).contains("xpired"));

        let mut not_yet = claims(PAYMENTS);
        not_yet["nbf"] = json!(now() + 600);
        invalid(&issuer.token(&not_yet));

        let mut audience = claims(PAYMENTS);
        audience["aud"] = json!(["https://kubernetes.default.svc"]);
        invalid(&issuer.token(&audience));

        let mut issuer_claim = claims(PAYMENTS);
        issuer_claim["iss"] = json!("https://elsewhere.example");
        invalid(&issuer.token(&issuer_claim));

        let mut no_expiry = claims(PAYMENTS);
        no_expiry.as_object_mut().unwrap().remove("exp");
        invalid(&issuer.token(&no_expiry));

        let err = tokens
            .verify(&issuer.token(&claims("system:node:worker-1")))
            .unwrap_err();
        assert!(matches!(err, ServiceAccountError::Subject(_)), "{err}");

        let stranger = Issuer::new("k2");
        let err = tokens
            .verify(&stranger.token(&claims(PAYMENTS)))
            .unwrap_err();
        assert!(matches!(err, ServiceAccountError::UnknownKey(Some(ref k)) if k == "k2"));

        // HMAC with the public key as the secret: refused before any key is tried.
        let hmac = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(PAYMENTS),
            &EncodingKey::from_secret(issuer.jwk.to_string().as_bytes()),
        )
        .unwrap();
        let err = tokens.verify(&hmac).unwrap_err();
        assert!(matches!(err, ServiceAccountError::Malformed(_)), "{err}");
        let err = tokens.verify("not.a.jwt").unwrap_err();
        assert!(matches!(err, ServiceAccountError::Malformed(_)), "{err}");
    }

    #[test]
    fn a_rotated_jwks_is_picked_up_and_a_broken_one_keeps_the_keys() {
        let old = Issuer::new("old");
        let jwks = Jwks::write("rotate", &[&old]);
        let tokens = verifier(&jwks);
        assert!(tokens.verify(&old.token(&claims(PAYMENTS))).is_ok());

        let new = Issuer::new("new");
        std::thread::sleep(std::time::Duration::from_millis(20));
        jwks.rewrite(&[&new]);
        assert!(tokens.verify(&new.token(&claims(PAYMENTS))).is_ok());
        assert!(matches!(
            tokens.verify(&old.token(&claims(PAYMENTS))),
            Err(ServiceAccountError::UnknownKey(_))
        ));

        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&jwks.0, "{ not json").unwrap();
        assert!(tokens.verify(&new.token(&claims(PAYMENTS))).is_ok());
    }

    #[test]
    fn an_unusable_jwks_fails_at_start() {
        let missing = ServiceAccountTokens::open(
            Path::new("/nonexistent/jwks.json"),
            None,
            DEFAULT_AUDIENCE.into(),
        );
        assert!(matches!(missing, Err(ServiceAccountError::Read { .. })));
        let path = std::env::temp_dir().join(format!("outrider-jwks-empty-{}", std::process::id()));
        std::fs::write(&path, r#"{"keys": []}"#).unwrap();
        let empty = ServiceAccountTokens::open(&path, None, DEFAULT_AUDIENCE.into());
        let _ = std::fs::remove_file(&path);
        assert!(matches!(empty, Err(ServiceAccountError::Jwks { .. })));
    }
}
