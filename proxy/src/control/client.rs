//! The proxy's one-shot requests to the control plane (certificates, registrations): the
//! bearer token and one bounded POST to a replica.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

use crate::control::replicas::Replica;

/// The HTTP client the proxy's one-shot control-plane requests (certificates, registrations)
/// go through.
pub type ControlClient = Client<HttpConnector, Full<Bytes>>;

/// Where the bearer token comes from.
#[derive(Debug, Clone)]
pub enum Token {
    /// Read from this file at every connection attempt, so a rotated token is picked up.
    File(PathBuf),
    /// Given directly (`OUTRIDER_CONTROL_TOKEN`).
    Value(String),
}

impl Token {
    /// The bearer token, read again from its file at each call so a rotated token is picked
    /// up; surrounding whitespace (a file's final newline) is not part of it.
    pub fn read(&self) -> std::io::Result<String> {
        match self {
            Token::Value(v) => Ok(v.trim().to_string()),
            Token::File(path) => std::fs::read_to_string(path).map(|t| t.trim().to_string()),
        }
    }
}

/// One JSON POST to a control-plane replica, bounded in time and size: a replica that does
/// not answer within `timeout` (connection included) or answers more than `max_response`
/// bytes is unavailable, and the caller asks the next one.
pub struct ControlPost<'a> {
    /// The path on the replica.
    pub path: &'a str,
    /// The bearer token.
    pub token: &'a str,
    /// One more header (the service-account token of a certificate request).
    pub extra_header: Option<(HeaderName, HeaderValue)>,
    /// The longest wait for the whole answer.
    pub timeout: Duration,
    /// The largest answer read.
    pub max_response: usize,
}

impl ControlPost<'_> {
    /// Sends `body` to `replica`: its answer (status and body), or why there is none.
    pub async fn send(
        &self,
        client: &ControlClient,
        replica: &Replica,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), String> {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(replica.uri(self.path))
            .header(AUTHORIZATION, format!("Bearer {}", self.token))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        if let Some((name, value)) = &self.extra_header {
            request.headers_mut().insert(name.clone(), value.clone());
        }
        let exchange = async {
            let response = client.request(request).await.map_err(|e| e.to_string())?;
            let status = response.status();
            let body = Limited::new(response.into_body(), self.max_response)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))?
    }
}
