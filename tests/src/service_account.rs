//! A stand-in for a Kubernetes cluster's service-account token issuer: a P-256 key whose JWKS
//! is in a file (what `outrider-control serve --sa-jwks` reads), minting the tokens a
//! kubelet's projected volume would hold (what `outrider-proxy --identity-token-file` reads).

use std::ffi::OsString;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use crate::TempDir;

/// The `iss` of the tokens, as a cluster's `--service-account-issuer` would set it.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The issuer: its signing key and a directory with its JWKS and the tokens it minted.
pub struct TokenIssuer {
    key: jsonwebtoken::EncodingKey,
    dir: TempDir,
}

impl Default for TokenIssuer {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenIssuer {
    /// A new key, its JWKS written to `jwks.json`.
    pub fn new() -> Self {
        let pair = rcgen::KeyPair::generate().expect("P-256 key");
        let point = pair.public_key_raw();
        // Uncompressed point: 0x04, X (32 bytes), Y (32 bytes).
        let (x, y) = point[1..].split_at(32);
        let jwks = serde_json::json!({ "keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": "cluster",
            "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
        }]});
        let dir = TempDir::new();
        std::fs::write(dir.path.join("jwks.json"), jwks.to_string()).expect("write JWKS");
        Self {
            key: jsonwebtoken::EncodingKey::from_ec_der(&pair.serialize_der()),
            dir,
        }
    }

    /// Path of the JWKS file.
    pub fn jwks(&self) -> String {
        self.dir.path.join("jwks.json").display().to_string()
    }

    /// Flags for `outrider-control serve` to bind certificates to this issuer's tokens.
    pub fn control_flags(&self) -> [String; 4] {
        [
            "--sa-jwks".into(),
            self.jwks(),
            "--sa-issuer".into(),
            ISSUER.into(),
        ]
    }

    /// A token file for service account `namespace/name`, minted for `audience`, expiring
    /// `ttl_secs` from now (negative: already expired).
    pub fn token_file(
        &self,
        namespace: &str,
        name: &str,
        audience: &str,
        ttl_secs: i64,
    ) -> OsString {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs() as i64;
        let claims = serde_json::json!({
            "iss": ISSUER, "aud": [audience],
            "sub": format!("system:serviceaccount:{namespace}:{name}"),
            "iat": now, "nbf": now - 10, "exp": now + ttl_secs,
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("cluster".into());
        let token = jsonwebtoken::encode(&header, &claims, &self.key).expect("sign token");
        let safe = |s: &str| s.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
        let path = self.dir.path.join(format!(
            "{}-{}-{}-{ttl_secs}.token",
            safe(namespace),
            safe(name),
            safe(audience)
        ));
        std::fs::write(&path, token).expect("write token");
        path.into_os_string()
    }
}
