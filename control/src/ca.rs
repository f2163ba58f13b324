//! The mesh certificate authority: issues short-lived workload certificates whose only name is a
//! SPIFFE URI SAN, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! The root comes from files (`--ca-cert`, `--ca-key`: an operator's root or an intermediate
//! signed by it) or is generated at first start and kept in the state directory (`ca.crt`,
//! `ca.key` with mode 0600), so a restart keeps the trust bundle every proxy holds.
//!
//! Trust model, plainly: the control plane authenticates proxies with one shared bearer token.
//! Whoever holds it may ask for ANY namespace and service account in the trust domain; the CA
//! checks the form of the names and that the CSR is signed by the key it certifies (proof of
//! possession), not that the caller runs as that service account. Binding identities to callers
//! (per-workload tokens, Kubernetes TokenReview) is future work; until then the token is as
//! sensitive as the CA key.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outrider_config::spiffe;
use outrider_config::wire::{self, CertificateRequest, CertificateResponse};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer as _, X509Certificate};

/// Default lifetime of a workload certificate.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of a generated root.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Backdating of `not_before`, so a peer whose clock is a little behind accepts a fresh leaf.
const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// File names in the state directory.
const CERT_FILE: &str = "ca.crt";
const KEY_FILE: &str = "ca.key";

/// Why the CA could not start or refused to issue.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A CA file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Only one of the two CA files exists in the state directory.
    #[error("{0}: found without its pair (ca.crt and ca.key go together); remove it or restore the other")]
    Half(PathBuf),
    /// The CA certificate or key is unusable.
    #[error("CA {what}: {source}")]
    Load {
        /// Which part.
        what: &'static str,
        /// Why.
        source: rcgen::Error,
    },
    /// The shared CA could not be read from or stored in etcd.
    #[error("shared CA in etcd: {0}")]
    Store(String),
    /// The trust domain is not a valid name.
    #[error(
        "trust domain `{0}` must be lowercase letters, digits, '-', '_' in '.'-separated labels"
    )]
    TrustDomain(String),
    /// The request names a bad namespace or service account.
    #[error("bad identity: {0}")]
    Identity(String),
    /// The CSR does not parse or is not signed by its own key.
    #[error("bad CSR: {0}")]
    Csr(rcgen::Error),
    /// Signing failed.
    #[error("cannot sign: {0}")]
    Sign(rcgen::Error),
    /// The CA certificate file cannot be split into roots and intermediates.
    #[error("CA certificate file: {0}")]
    File(String),
}

/// The certificate authority of one trust domain.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The trust anchors handed to proxies, PEM: the self-signed roots of the CA file.
    bundle: String,
    /// Intermediates between the issuer and its root, the issuer first (PEM): sent after each
    /// leaf, so a peer that trusts only the root can build the path.
    intermediates: String,
    trust_domain: String,
    ttl: Duration,
    serial: AtomicU64,
    /// When the issuing certificate expires, Unix seconds (0 when it cannot be read).
    not_after: u64,
    /// The latest leaf per identity: (issued at, not after), Unix seconds; at most
    /// [`ISSUED_KEPT`], expired ones dropped.
    issued: std::sync::Mutex<std::collections::BTreeMap<String, (u64, u64)>>,
}

/// Identities whose latest certificate [`Ca::status`] reports, at most.
const ISSUED_KEPT: usize = 10_000;

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl Ca {
    /// A CA from an operator's certificate and key (PEM files).
    pub fn from_files(
        cert: &Path,
        key: &Path,
        trust_domain: &str,
        ttl: Duration,
    ) -> Result<Self, CaError> {
        Self::from_pem(read(cert)?, &read(key)?, trust_domain, ttl)
    }

    /// The CA kept in `state_dir`, generated (and written, key mode 0600) on first start.
    pub fn open_or_generate(
        state_dir: &Path,
        trust_domain: &str,
        ttl: Duration,
    ) -> Result<Self, CaError> {
        let cert_path = state_dir.join(CERT_FILE);
        let key_path = state_dir.join(KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => return Self::from_files(&cert_path, &key_path, trust_domain, ttl),
            (true, false) => return Err(CaError::Half(cert_path)),
            (false, true) => return Err(CaError::Half(key_path)),
            (false, false) => {}
        }
        let (cert_pem, key_pem) = generate_root(trust_domain)?;
        // Key first, created 0600 from the start (never world-readable, not even briefly);
        // the certificate last, so a crash in between leaves a key alone, which is reported.
        write_new(&key_path, key_pem.as_bytes(), 0o600)?;
        write_new(&cert_path, cert_pem.as_bytes(), 0o644)?;
        tracing::info!(trust_domain, path = %cert_path.display(), "generated a new mesh CA");
        Self::from_pem(cert_pem, &key_pem, trust_domain, ttl)
    }

    /// The CA every replica on `etcd` shares: the one stored there, or a new root generated
    /// and stored with a create-if-absent transaction (so replicas starting together agree).
    pub fn shared(
        etcd: &crate::etcd::EtcdStore,
        trust_domain: &str,
        ttl: Duration,
    ) -> Result<Self, CaError> {
        let (cert_pem, key_pem) = etcd
            .shared_ca(|| generate_root(trust_domain))
            .map_err(|e| CaError::Store(e.to_string()))??;
        Self::from_pem(cert_pem, &key_pem, trust_domain, ttl)
    }
    fn from_pem(
        bundle: String,
        key_pem: &str,
        trust_domain: &str,
        ttl: Duration,
    ) -> Result<Self, CaError> {
        check_trust_domain(trust_domain)?;
        let key = KeyPair::from_pem(key_pem).map_err(|source| CaError::Load {
            what: "key",
            source,
        })?;
        // The first certificate of the file is the issuer; the rest (a root above an
        // intermediate) only travel in the bundle.
        let issuer = Issuer::from_ca_cert_pem(&bundle, key).map_err(|source| CaError::Load {
            what: "certificate",
            source,
        })?;
        let not_after = issuer_not_after(&bundle);
        let (bundle, intermediates) = split_anchors(&bundle)?;
        Ok(Self {
            issuer,
            bundle,
            intermediates,
            trust_domain: trust_domain.to_string(),
            ttl,
            serial: AtomicU64::new(1),
            not_after,
            issued: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        })
    }

    /// The trust domain certificates are issued in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust bundle (PEM).
    pub fn bundle(&self) -> &str {
        &self.bundle
    }

    /// Issues a leaf for `request`'s CSR key, naming only the identity asked for.
    pub fn issue(&self, request: &CertificateRequest) -> Result<CertificateResponse, CaError> {
        // Checked before anything is parsed or signed: a CSR for namespace `..` must not
        // become `spiffe://td/ns/../sa/x` (the SPIFFE spec forbids dot segments).
        spiffe::check_parts(
            &self.trust_domain,
            &request.namespace,
            &request.service_account,
        )
        .map_err(|e| CaError::Identity(e.to_string()))?;
        // Parsing verifies the CSR's signature: the caller holds the key it wants certified.
        let csr = CertificateSigningRequestParams::from_pem(&request.csr).map_err(CaError::Csr)?;
        let identity = wire::spiffe_id(
            &self.trust_domain,
            &request.namespace,
            &request.service_account,
        );
        // Nothing from the CSR but its key: names, usages and lifetime are the CA's choice.
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = identity
            .clone()
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Identity(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + self.ttl;
        params.serial_number = Some(random_serial(self.serial.fetch_add(1, Ordering::Relaxed)));
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(CaError::Sign)?;
        let unix = |t: OffsetDateTime| u64::try_from(t.unix_timestamp()).unwrap_or(0);
        self.record_issued(&identity, unix(now), unix(params.not_after));
        Ok(CertificateResponse {
            identity,
            chain: format!("{}{}", cert.pem(), self.intermediates),
            trust_bundle: self.bundle.clone(),
            not_before: unix(params.not_before),
            not_after: unix(params.not_after),
        })
    }
}

impl Ca {
    fn record_issued(&self, identity: &str, at: u64, not_after: u64) {
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        if issued.len() >= ISSUED_KEPT && !issued.contains_key(identity) {
            issued.retain(|_, (_, until)| *until > at);
            if issued.len() >= ISSUED_KEPT {
                return;
            }
        }
        issued.insert(identity.to_string(), (at, not_after));
    }

    /// When the issuing certificate expires, Unix seconds (0 when it cannot be read).
    pub fn not_after(&self) -> u64 {
        self.not_after
    }

    /// The CA certificate's expiry and the latest unexpired leaf of each identity, for
    /// `outriderctl check`.
    pub fn status(&self) -> crate::api::CertificatesStatus {
        let now = crate::api::now_ms() / 1000;
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        issued.retain(|_, (_, until)| *until > now);
        crate::api::CertificatesStatus {
            ca_not_after_ms: self.not_after.saturating_mul(1000),
            leaf_ttl_ms: u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX),
            issued: issued
                .iter()
                .map(|(identity, (at, until))| crate::api::IssuedCertificate {
                    identity: identity.clone(),
                    issued_at_ms: at.saturating_mul(1000),
                    not_after_ms: until.saturating_mul(1000),
                })
                .collect(),
        }
    }
}

/// The first certificate's `notAfter` in a PEM file, Unix seconds; 0 when unreadable.
fn issuer_not_after(file: &str) -> u64 {
    pem::parse_many(file)
        .ok()
        .and_then(|blocks| blocks.into_iter().next())
        .and_then(|block| {
            X509Certificate::from_der(block.contents())
                .ok()
                .map(|(_, cert)| cert.validity().not_after.timestamp())
        })
        .and_then(|t| u64::try_from(t).ok())
        .unwrap_or(0)
}

/// Splits a CA file into its trust anchors (the self-signed roots) and the intermediates
/// (the rest, in file order), both PEM.
///
/// Only roots are anchors: an intermediate in the bundle would be trusted on its own, so a
/// peer could not be told to trust the root alone, nor the intermediate be replaced without
/// redistributing the bundle. A file without a root (an intermediate alone) keeps it as the
/// anchor, as there is nothing else to trust.
fn split_anchors(file: &str) -> Result<(String, String), CaError> {
    let blocks = pem::parse_many(file).map_err(|e| CaError::File(e.to_string()))?;
    let (mut roots, mut intermediates) = (String::new(), String::new());
    for block in blocks.iter().filter(|b| b.tag() == "CERTIFICATE") {
        let self_signed = X509Certificate::from_der(block.contents())
            .map(|(_, cert)| cert.subject().as_raw() == cert.issuer().as_raw())
            .map_err(|e| CaError::File(format!("a certificate does not parse: {e}")))?;
        // LF, like the certificates rcgen writes (pem's default is CRLF).
        let text = pem::encode_config(
            block,
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        );
        if self_signed {
            roots.push_str(&text);
        } else {
            intermediates.push_str(&text);
        }
    }
    if roots.is_empty() {
        tracing::warn!("the CA file holds no root: its issuing certificate is the trust anchor");
        return Ok((intermediates, String::new()));
    }
    Ok((roots, intermediates))
}

fn check_trust_domain(trust_domain: &str) -> Result<(), CaError> {
    spiffe::check_trust_domain(trust_domain)
        .map_err(|_| CaError::TrustDomain(trust_domain.escape_debug().to_string()))
}

/// A positive 16-byte serial, unique per CA process: the clock in nanoseconds and a counter.
/// Serials need uniqueness, not secrecy (RFC 5280 4.1.2.2).
fn random_serial(counter: u64) -> SerialNumber {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&nanos.to_be_bytes());
    bytes[8..].copy_from_slice(&counter.to_be_bytes());
    // A leading 1 bit would make the DER integer negative.
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// Writes a file that must not exist yet, with `mode`, and syncs it.
/// A new self-signed root for `trust_domain`: `(certificate PEM, key PEM)`.
fn generate_root(trust_domain: &str) -> Result<(String, String), CaError> {
    check_trust_domain(trust_domain)?;
    let key = KeyPair::generate().map_err(|source| CaError::Load {
        what: "key generation",
        source,
    })?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Outrider mesh");
    name.push(DnType::CommonName, format!("Outrider CA {trust_domain}"));
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + ROOT_TTL;
    params.serial_number = Some(random_serial(0));
    let cert = params.self_signed(&key).map_err(|source| CaError::Load {
        what: "self-signing",
        source,
    })?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData as _;
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

    fn request(ns: &str, sa: &str) -> (KeyPair, CertificateRequest) {
        let key = KeyPair::generate().expect("key");
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        let request = CertificateRequest {
            csr,
            namespace: ns.into(),
            service_account: sa.into(),
        };
        (key, request)
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("outrider-ca-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    /// A root and an intermediate it signed (PEM), and the intermediate's key.
    fn root_and_intermediate() -> (String, String, KeyPair) {
        let ca_params = |name: &str, depth: u8| {
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, name);
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(depth));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params
        };
        let root_key = KeyPair::generate().expect("root key");
        let root_params = ca_params("Test root", 1);
        let root = root_params.self_signed(&root_key).expect("root");
        let root_issuer = Issuer::new(root_params, root_key);
        let key = KeyPair::generate().expect("intermediate key");
        let intermediate = ca_params("Test intermediate", 0)
            .signed_by(&key, &root_issuer)
            .expect("intermediate");
        (root.pem(), intermediate.pem(), key)
    }

    #[test]
    fn an_intermediate_signs_and_travels_with_each_leaf_while_only_the_root_is_trusted() {
        let (root, intermediate, key) = root_and_intermediate();
        let ttl = Duration::from_secs(3600);
        let ca = Ca::from_pem(
            format!("{intermediate}{root}"),
            &key.serialize_pem(),
            "cluster.local",
            ttl,
        )
        .expect("ca");
        let issued = ca.issue(&request("shop", "checkout").1).expect("issued");
        let der = |text: &str| -> Vec<Vec<u8>> {
            pem::parse_many(text)
                .expect("pem")
                .iter()
                .map(|b| b.contents().to_vec())
                .collect()
        };
        let chain = der(&issued.chain);
        assert_eq!(chain.len(), 2, "leaf and intermediate");
        assert_eq!(chain[1], der(&intermediate)[0]);
        let (_, leaf) = X509Certificate::from_der(&chain[0]).expect("leaf");
        let (_, issuer) = X509Certificate::from_der(&chain[1]).expect("intermediate");
        assert_eq!(leaf.issuer().as_raw(), issuer.subject().as_raw());
        assert_eq!(
            der(&issued.trust_bundle),
            der(&root),
            "the root alone is trusted"
        );

        // An intermediate alone: nothing above it to trust, so it stays the anchor.
        let ca = Ca::from_pem(
            intermediate.clone(),
            &key.serialize_pem(),
            "cluster.local",
            ttl,
        )
        .expect("ca");
        let issued = ca.issue(&request("shop", "checkout").1).expect("issued");
        assert_eq!(der(&issued.chain).len(), 1);
        assert_eq!(der(&issued.trust_bundle), der(&intermediate));
    }

    #[test]
    fn issues_a_leaf_with_only_the_spiffe_uri_for_the_csr_key() {
        let dir = temp_dir("issue");
        let ca =
            Ca::open_or_generate(&dir, "cluster.local", Duration::from_secs(3600)).expect("ca");
        let (key, request) = request("shop", "checkout");
        let issued = ca.issue(&request).expect("issued");
        assert_eq!(
            issued.identity,
            "spiffe://cluster.local/ns/shop/sa/checkout"
        );
        assert_eq!(issued.trust_bundle, ca.bundle());
        assert_eq!(issued.not_after - issued.not_before, 3600 + 60);

        let der = pem::parse(&issued.chain).expect("pem");
        let (_, cert) = X509Certificate::from_der(der.contents()).expect("x509");
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .expect("ext")
            .expect("san")
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::URI(u) => format!("uri:{u}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(sans, ["uri:spiffe://cluster.local/ns/shop/sa/checkout"]);
        assert_eq!(
            cert.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        assert!(!cert.is_ca());
        // Signed by the CA.
        let root = pem::parse(ca.bundle()).expect("root pem");
        let (_, root) = X509Certificate::from_der(root.contents()).expect("root");
        cert.verify_signature(Some(root.public_key()))
            .expect("signed by the CA");
    }

    #[test]
    fn a_restart_keeps_the_root_and_the_key_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = temp_dir("persist");
        let first = Ca::open_or_generate(&dir, "td", DEFAULT_CERT_TTL).expect("first");
        let second = Ca::open_or_generate(&dir, "td", DEFAULT_CERT_TTL).expect("second");
        assert_eq!(first.bundle(), second.bundle());
        let mode = std::fs::metadata(dir.join(KEY_FILE))
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_file(dir.join(CERT_FILE)).expect("rm");
        assert!(matches!(
            Ca::open_or_generate(&dir, "td", DEFAULT_CERT_TTL),
            Err(CaError::Half(_))
        ));
    }

    #[test]
    fn refuses_bad_names_and_forged_csrs() {
        let dir = temp_dir("refuse");
        let ca = Ca::open_or_generate(&dir, "td", DEFAULT_CERT_TTL).expect("ca");
        let (_, bad) = request("shop", "a/sa/admin");
        assert!(matches!(ca.issue(&bad), Err(CaError::Identity(_))));
        let (_, mut forged) = request("shop", "checkout");
        // Flip a byte inside the signature (near the end of the DER).
        let mut der = pem::parse(&forged.csr).expect("pem").into_contents();
        let n = der.len();
        der[n - 3] ^= 0x01;
        forged.csr = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        assert!(matches!(ca.issue(&forged), Err(CaError::Csr(_))));
        assert!(matches!(
            Ca::open_or_generate(&temp_dir("td"), "bad/domain", DEFAULT_CERT_TTL),
            Err(CaError::TrustDomain(_))
        ));
    }

    #[test]
    fn refuses_dot_segments_and_non_kubernetes_names() {
        let dir = temp_dir("dots");
        let ca = Ca::open_or_generate(&dir, "cluster.local", DEFAULT_CERT_TTL).expect("ca");
        for (ns, sa) in [
            ("..", "x"),
            (".", "x"),
            ("shop", ".."),
            ("%2e%2e", "x"),
            ("Shop", "x"),
            ("shop", "a_b"),
            ("", "x"),
        ] {
            let (_, bad) = request(ns, sa);
            match ca.issue(&bad) {
                Err(CaError::Identity(why)) => assert!(why.contains("DNS-1123 label"), "{why}"),
                other => panic!("{ns}/{sa}: expected a refusal, got {other:?}"),
            }
        }
        let (_, good) = request("shop", "checkout-v2");
        assert_eq!(
            ca.issue(&good).expect("issued").identity,
            "spiffe://cluster.local/ns/shop/sa/checkout-v2"
        );
    }
}
