//! The control-plane replicas a proxy uses (`--control URL[,URL...]`): each URL's host
//! resolved to its addresses, and each address one replica. The subscription moves on to the
//! next replica whenever it ends or fails to connect ([`Rotation`]); a certificate request
//! asks the replica the subscription is connected to first, then the others while one cannot
//! be reached ([`connected_first`]). Requests go to the address itself (it is their
//! authority: a `Host` naming the URL's host would differ from HTTP/2's `:authority`), so the
//! ACKs of a stream reach the replica that holds it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::Uri;

/// Longest wait for one URL's host name to resolve.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Most replicas used: addresses past it (a name resolving to very many) are left out.
pub const MAX_REPLICAS: usize = 32;

/// A `--control` value that is not usable.
#[derive(Debug, thiserror::Error)]
pub enum ControlUrlError {
    /// Not an `http://host[:port]` URL.
    #[error("--control {url:?}: {reason}")]
    Invalid {
        /// The value given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No URL at all (`--control ""`).
    #[error("--control needs at least one http://host:port URL")]
    Empty,
}

/// Why there is no replica to try.
#[derive(Debug, thiserror::Error)]
#[error("no control-plane address: {0}")]
pub struct NoReplica(pub(crate) String);

/// One `--control` URL, parsed.
#[derive(Debug, Clone)]
struct ControlUrl {
    /// As given, without a trailing `/`.
    url: Arc<str>,
    /// `host:port` to resolve (port 80 when the URL has none).
    host_port: String,
    /// The URL's path, without a trailing `/`; requests' paths are appended to it.
    base_path: Arc<str>,
}

/// One control-plane replica: an address a `--control` URL's host resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// The URL it was configured by.
    pub url: Arc<str>,
    /// The address requests go to.
    pub address: SocketAddr,
    base_path: Arc<str>,
}

impl Replica {
    /// The URI of `path_and_query` on this replica's address.
    pub fn uri(&self, path_and_query: &str) -> String {
        format!("http://{}{}{path_and_query}", self.address, self.base_path)
    }
}

impl std::fmt::Display for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.url, self.address)
    }
}

/// The configured control-plane URLs, and the replica the subscription is connected to.
#[derive(Debug)]
pub struct Replicas {
    urls: Vec<ControlUrl>,
    connected: Mutex<Option<Replica>>,
    /// Told whenever the subscription connects (the registration is then renewed with that
    /// replica at once: one that just restarted does not know it).
    subscribed: tokio::sync::Notify,
}

impl Replicas {
    /// Parses `--control` values, each `http://host[:port][/path]`.
    pub fn parse<S: AsRef<str>>(urls: &[S]) -> Result<Self, ControlUrlError> {
        let urls = urls
            .iter()
            .map(|u| parse_url(u.as_ref().trim()))
            .collect::<Result<Vec<_>, _>>()?;
        if urls.is_empty() {
            return Err(ControlUrlError::Empty);
        }
        Ok(Self {
            urls,
            connected: Mutex::new(None),
            subscribed: tokio::sync::Notify::new(),
        })
    }

    /// The URLs as given, comma-separated (for `/config`'s `origin`).
    pub fn describe(&self) -> String {
        let urls: Vec<&str> = self.urls.iter().map(|u| &*u.url).collect();
        urls.join(",")
    }

    /// Every replica now, in the order of the URLs and of each name's addresses: names are
    /// resolved again at each call (each within [`RESOLVE_TIMEOUT`]), so replicas a DNS name
    /// gains or loses are seen. A name that does not resolve is left out (logged); `Err` when
    /// none is left.
    pub async fn resolve(&self) -> Result<Vec<Replica>, NoReplica> {
        let mut replicas: Vec<Replica> = Vec::new();
        let mut failures = Vec::new();
        for url in &self.urls {
            let addresses =
                tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(&url.host_port))
                    .await;
            let addresses = match addresses {
                Ok(Ok(addresses)) => addresses,
                Ok(Err(error)) => {
                    tracing::warn!(url = %url.url, %error, "cannot resolve a control-plane URL");
                    failures.push(format!("{}: {error}", url.url));
                    continue;
                }
                Err(_) => {
                    tracing::warn!(url = %url.url, timeout = %outrider_config::Duration(RESOLVE_TIMEOUT), "a control-plane URL did not resolve in time");
                    failures.push(format!(
                        "{}: not resolved within {RESOLVE_TIMEOUT:?}",
                        url.url
                    ));
                    continue;
                }
            };
            for address in addresses {
                if replicas.len() >= MAX_REPLICAS {
                    break;
                }
                if replicas.iter().any(|r| r.address == address) {
                    continue;
                }
                replicas.push(Replica {
                    url: Arc::clone(&url.url),
                    address,
                    base_path: Arc::clone(&url.base_path),
                });
            }
        }
        if replicas.is_empty() {
            if failures.is_empty() {
                failures.push("the URLs resolve to no address".into());
            }
            return Err(NoReplica(failures.join("; ")));
        }
        Ok(replicas)
    }

    /// The replica the subscription is connected to, if it is.
    pub fn connected(&self) -> Option<Replica> {
        self.lock().clone()
    }

    /// Records the replica the subscription is connected to (`None` once it is not).
    pub fn set_connected(&self, replica: Option<Replica>) {
        let connected = replica.is_some();
        *self.lock() = replica;
        if connected {
            self.subscribed.notify_waiters();
        }
    }

    /// Completes when the subscription next connects to a replica.
    pub async fn subscribed(&self) {
        self.subscribed.notified().await;
    }

    fn lock(&self) -> MutexGuard<'_, Option<Replica>> {
        // Only a clone or a store happens under it: a poisoned value is still whole.
        self.connected.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn parse_url(given: &str) -> Result<ControlUrl, ControlUrlError> {
    let invalid = |reason: &str| ControlUrlError::Invalid {
        url: given.to_string(),
        reason: reason.to_string(),
    };
    let uri: Uri = given
        .parse()
        .map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
    if uri.scheme_str() != Some("http") {
        return Err(invalid("expected http://host:port"));
    }
    let Some(authority) = uri.authority() else {
        return Err(invalid("expected http://host:port"));
    };
    if authority.as_str().contains('@') {
        return Err(invalid(
            "user information is not supported; use --token-file",
        ));
    }
    if uri.query().is_some() {
        return Err(invalid("a query is not supported"));
    }
    let port = authority.port_u16().unwrap_or(80);
    // `host()` keeps an IPv6 address's brackets, which `host:port` needs.
    let host_port = format!("{}:{port}", authority.host());
    Ok(ControlUrl {
        url: given.trim_end_matches('/').into(),
        host_port,
        base_path: uri.path().trim_end_matches('/').into(),
    })
}

/// Which replica the next subscription attempt goes to: the one after the last one tried, so
/// a replica that dropped the stream or could not be reached is not tried again before every
/// other has been.
#[derive(Debug, Default)]
pub struct Rotation {
    last: Option<Replica>,
}

impl Rotation {
    /// The replica after the last one tried in `replicas` (wrapping round), or the first when
    /// none was tried or the last is no longer among them; recorded as tried.
    pub fn next(&mut self, replicas: &[Replica]) -> Option<Replica> {
        let after = self
            .last
            .as_ref()
            .and_then(|last| replicas.iter().position(|r| r == last))
            .map_or(0, |i| i.saturating_add(1));
        let next = replicas.get(after).or_else(|| replicas.first()).cloned()?;
        self.last = Some(next.clone());
        Some(next)
    }
}

/// `replicas` in the order a one-off request tries them: `connected` first, when it is among
/// them, then the ones after it, wrapping round.
pub fn connected_first(mut replicas: Vec<Replica>, connected: Option<&Replica>) -> Vec<Replica> {
    if let Some(i) = connected.and_then(|c| replicas.iter().position(|r| r == c)) {
        replicas.rotate_left(i);
    }
    replicas
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn replicas(urls: &[&str]) -> Vec<Replica> {
        Replicas::parse(urls)
            .expect("valid")
            .resolve()
            .await
            .expect("resolved")
    }

    #[tokio::test]
    async fn urls_parse_and_resolve_to_their_addresses_in_order() {
        let parsed = Replicas::parse(&[
            "http://127.0.0.1:1/",
            " http://[::1]:2/base/ ",
            "http://127.0.0.3",
        ])
        .expect("valid");
        assert_eq!(
            parsed.describe(),
            "http://127.0.0.1:1,http://[::1]:2/base,http://127.0.0.3"
        );
        let resolved = parsed.resolve().await.expect("resolved");
        let shown: Vec<String> = resolved.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "http://127.0.0.1:1 (127.0.0.1:1)",
                "http://[::1]:2/base ([::1]:2)",
                "http://127.0.0.3 (127.0.0.3:80)"
            ]
        );
        assert_eq!(resolved[1].uri("/v1/ack"), "http://[::1]:2/base/v1/ack");
        assert_eq!(resolved[2].uri("/v1/ack"), "http://127.0.0.3:80/v1/ack");
        // The same address twice is one replica.
        assert_eq!(
            replicas(&["http://127.0.0.1:1", "http://127.0.0.1:1/"])
                .await
                .len(),
            1
        );
    }

    #[test]
    fn bad_urls_are_refused_with_the_reason() {
        for (url, reason) in [
            ("https://ctl:15010", "expected http://host:port"),
            ("ctl:15010", "expected http://host:port"),
            ("http://user:pw@ctl:15010", "user information"),
            ("http://ctl:15010/?x=1", "a query"),
            ("http://", ""),
        ] {
            let error = Replicas::parse(&[url]).expect_err(url).to_string();
            assert!(error.contains(reason), "{url}: {error}");
        }
        assert!(matches!(
            Replicas::parse::<&str>(&[]),
            Err(ControlUrlError::Empty)
        ));
    }

    #[tokio::test]
    async fn rotation_moves_past_the_last_replica_tried() {
        let all = replicas(&[
            "http://127.0.0.1:1",
            "http://127.0.0.1:2",
            "http://127.0.0.1:3",
        ])
        .await;
        let mut rotation = Rotation::default();
        let ports: Vec<u16> = (0..5)
            .map(|_| rotation.next(&all).expect("one").address.port())
            .collect();
        assert_eq!(ports, [1, 2, 3, 1, 2]);
        // The last one tried (2) is gone from a new resolution: start over at the first.
        let fewer = replicas(&["http://127.0.0.1:3", "http://127.0.0.1:1"]).await;
        assert_eq!(rotation.next(&fewer).expect("one").address.port(), 3);
        assert_eq!(rotation.next(&fewer).expect("one").address.port(), 1);
        assert_eq!(rotation.next(&[]), None);
    }

    #[tokio::test]
    async fn one_off_requests_start_at_the_connected_replica() {
        let all = replicas(&[
            "http://127.0.0.1:1",
            "http://127.0.0.1:2",
            "http://127.0.0.1:3",
        ])
        .await;
        let ports =
            |order: Vec<Replica>| -> Vec<u16> { order.iter().map(|r| r.address.port()).collect() };
        assert_eq!(ports(connected_first(all.clone(), None)), [1, 2, 3]);
        assert_eq!(
            ports(connected_first(all.clone(), Some(&all[1]))),
            [2, 3, 1]
        );
        let elsewhere = replicas(&["http://127.0.0.1:9"]).await;
        assert_eq!(ports(connected_first(all, Some(&elsewhere[0]))), [1, 2, 3]);
    }
}
