//! Workload SPIFFE ids, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, checked
//! the same way where a policy names one (`identity:`, `authorization`) and where the
//! control plane's CA issues one. Namespace and service account are Kubernetes names (DNS-1123
//! labels), which also keeps out what the SPIFFE spec forbids in a path: empty, `.` and `..`
//! segments and percent-encoding.

/// Why a SPIFFE id, or one of its parts, is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// Not of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    #[error("must be a SPIFFE id: spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    Shape,
    /// The trust domain is not a lowercase DNS-like name.
    #[error(
        "trust domain `{0}` must be lowercase letters, digits, '-', '_' and '.'-separated \
         labels (at most 255 characters)"
    )]
    TrustDomain(String),
    /// The namespace or service account is not a DNS-1123 label.
    #[error(
        "{what} `{value}` must be a DNS-1123 label: 1 to 63 lowercase letters, digits and '-', \
         starting and ending with a letter or digit"
    )]
    Label {
        /// `namespace` or `service account`.
        what: &'static str,
        /// The refused value, with control characters escaped.
        value: String,
    },
    /// A pattern's `*` is part of a segment rather than all of it.
    #[error("`*` stands for a whole part (`ns/*`), not for part of one as in `{0}`")]
    PartialWildcard(String),
}

/// A SPIFFE id split into its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadId<'a> {
    /// The trust domain (`cluster.local`).
    pub trust_domain: &'a str,
    /// The Kubernetes namespace.
    pub namespace: &'a str,
    /// The Kubernetes service account.
    pub service_account: &'a str,
}

/// Parses and checks a workload SPIFFE id.
pub fn parse(id: &str) -> Result<WorkloadId<'_>, SpiffeIdError> {
    let rest = id.strip_prefix("spiffe://").ok_or(SpiffeIdError::Shape)?;
    let (trust_domain, path) = rest.split_once('/').ok_or(SpiffeIdError::Shape)?;
    let path = path.strip_prefix("ns/").ok_or(SpiffeIdError::Shape)?;
    let (namespace, service_account) = path.split_once("/sa/").ok_or(SpiffeIdError::Shape)?;
    check_parts(trust_domain, namespace, service_account)?;
    Ok(WorkloadId {
        trust_domain,
        namespace,
        service_account,
    })
}

/// A pattern of workload SPIFFE ids (`authorization` rules' `identities`): each part is a
/// value or, written `*`, any value (`None` here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadPattern<'a> {
    /// The trust domain, or any.
    pub trust_domain: Option<&'a str>,
    /// The namespace, or any.
    pub namespace: Option<&'a str>,
    /// The service account, or any.
    pub service_account: Option<&'a str>,
}

impl WorkloadPattern<'_> {
    /// Whether `id` fits the pattern.
    pub fn matches(&self, id: &WorkloadId<'_>) -> bool {
        self.trust_domain.is_none_or(|td| td == id.trust_domain)
            && self.namespace.is_none_or(|ns| ns == id.namespace)
            && self
                .service_account
                .is_none_or(|sa| sa == id.service_account)
    }
}

/// Parses and checks an id pattern: an id whose trust domain, namespace or service account may
/// be `*` (a whole part; `checkout-*` is refused).
pub fn parse_pattern(pattern: &str) -> Result<WorkloadPattern<'_>, SpiffeIdError> {
    let rest = pattern
        .strip_prefix("spiffe://")
        .ok_or(SpiffeIdError::Shape)?;
    let (trust_domain, path) = rest.split_once('/').ok_or(SpiffeIdError::Shape)?;
    let path = path.strip_prefix("ns/").ok_or(SpiffeIdError::Shape)?;
    let (namespace, service_account) = path.split_once("/sa/").ok_or(SpiffeIdError::Shape)?;
    let part = |value| -> Result<Option<&str>, SpiffeIdError> {
        match value {
            "*" => Ok(None),
            v if v.contains('*') => Err(SpiffeIdError::PartialWildcard(escape(v))),
            v => Ok(Some(v)),
        }
    };
    let pattern = WorkloadPattern {
        trust_domain: part(trust_domain)?,
        namespace: part(namespace)?,
        service_account: part(service_account)?,
    };
    if let Some(td) = pattern.trust_domain {
        check_trust_domain(td)?;
    }
    if let Some(ns) = pattern.namespace {
        check_label("namespace", ns)?;
    }
    if let Some(sa) = pattern.service_account {
        check_label("service account", sa)?;
    }
    Ok(pattern)
}

/// Checks the parts the CA puts into an id, before it makes one.
pub fn check_parts(
    trust_domain: &str,
    namespace: &str,
    service_account: &str,
) -> Result<(), SpiffeIdError> {
    check_trust_domain(trust_domain)?;
    check_label("namespace", namespace)?;
    check_label("service account", service_account)
}

/// Checks a trust domain: lowercase letters, digits, `-`, `_`, in non-empty `.`-separated
/// labels, at most 255 characters (the SPIFFE spec's trust-domain characters, without the
/// empty labels that would make `a..b` a different domain that reads the same).
pub fn check_trust_domain(trust_domain: &str) -> Result<(), SpiffeIdError> {
    let valid = !trust_domain.is_empty()
        && trust_domain.len() <= 255
        && trust_domain.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        });
    if valid {
        Ok(())
    } else {
        Err(SpiffeIdError::TrustDomain(escape(trust_domain)))
    }
}

/// Whether `name` is a DNS-1123 label, as Kubernetes namespaces are: 1 to 63 lowercase letters,
/// digits and `-`, starting and ending with a letter or digit.
pub fn is_dns1123_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.first().is_some_and(alnum)
        && bytes.last().is_some_and(alnum)
        && bytes.iter().all(|b| alnum(b) || *b == b'-')
}

fn check_label(what: &'static str, value: &str) -> Result<(), SpiffeIdError> {
    if is_dns1123_label(value) {
        Ok(())
    } else {
        Err(SpiffeIdError::Label {
            what,
            value: escape(value),
        })
    }
}

/// The refused value goes into error messages and logs: escape what a terminal would act on.
fn escape(value: &str) -> String {
    value.escape_debug().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_kubernetes_identities() {
        assert_eq!(
            parse("spiffe://cluster.local/ns/shop/sa/checkout-v2"),
            Ok(WorkloadId {
                trust_domain: "cluster.local",
                namespace: "shop",
                service_account: "checkout-v2",
            })
        );
        parse("spiffe://td_1.example-org/ns/a/sa/0").expect("valid");
    }

    #[test]
    fn patterns_take_a_star_for_a_whole_part() {
        let id = parse("spiffe://cluster.local/ns/shop/sa/checkout").expect("valid");
        let fits = |p: &str| parse_pattern(p).expect(p).matches(&id);
        assert!(fits("spiffe://cluster.local/ns/shop/sa/checkout"));
        assert!(fits("spiffe://cluster.local/ns/shop/sa/*"));
        assert!(fits("spiffe://*/ns/*/sa/checkout"));
        assert!(fits("spiffe://*/ns/*/sa/*"));
        assert!(!fits("spiffe://cluster.local/ns/shop/sa/payments"));
        assert!(!fits("spiffe://other.td/ns/shop/sa/*"));
        assert!(!fits("spiffe://cluster.local/ns/web/sa/*"));
        assert_eq!(
            parse_pattern("spiffe://cluster.local/ns/shop/sa/check*"),
            Err(SpiffeIdError::PartialWildcard("check*".into()))
        );
        for bad in [
            "*",
            "spiffe://cluster.local/ns/../sa/*",
            "spiffe://cluster.local/ns/*/sa/",
            "spiffe://cluster.local/*",
            "spiffe://Cluster/ns/*/sa/*",
        ] {
            assert!(parse_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refuses_dot_empty_and_encoded_segments() {
        for bad in [
            "spiffe://cluster.local/ns/../sa/x",
            "spiffe://cluster.local/ns/./sa/x",
            "spiffe://cluster.local/ns//sa/x",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/ns/a/sa/..",
            "spiffe://cluster.local/ns/%2e%2e/sa/x",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/ns/Shop/sa/x",
            "spiffe://cluster.local/ns/a_b/sa/x",
            "spiffe://cluster.local/ns/-a/sa/x",
            "spiffe://cluster.local/ns/a\u{200b}/sa/x",
            "spiffe://cluster..local/ns/a/sa/x",
            "spiffe://Cluster.local/ns/a/sa/x",
            "spiffe:///ns/a/sa/b",
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/a/b",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            check_parts("cluster.local", "..", "x")
                .expect_err("dot segment")
                .to_string(),
            "namespace `..` must be a DNS-1123 label: 1 to 63 lowercase letters, digits and \
             '-', starting and ending with a letter or digit"
        );
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(is_dns1123_label(&"a".repeat(63)));
    }
}
