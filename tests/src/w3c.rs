//! The test app the W3C Trace Context conformance harness (`tests/w3c-trace-context/`) drives:
//! it follows the harness's callback protocol. The harness POSTs a JSON list of
//! `{"url": ..., "arguments": ...}`; for each element, the app POSTs `arguments` (as JSON) to
//! `url`. The app sits behind a proxy both ways: the harness calls it through the proxy's
//! inbound port, and it makes its callbacks through the proxy's outbound port (`Host` naming
//! the harness), so what the harness checks is the trace context after both of the proxy's
//! directions. Like an instrumented app that makes no span of its own, it copies the
//! `traceparent` and `tracestate` fields it received onto each callback.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::{full, http1_client, Proto, TestBody, Upstream};

/// The app on 127.0.0.1:0; its callbacks go to the proxy's outbound port once `outbound` is
/// set (the proxy is started after the app, with the app's address).
pub async fn start_app(outbound: Arc<OnceLock<SocketAddr>>) -> Upstream {
    Upstream::start(Proto::Http1, move |req: Request<Incoming>| {
        let outbound = Arc::clone(&outbound);
        async move {
            match callbacks(req, outbound.get().copied()).await {
                Ok(()) => json(StatusCode::OK, "{}".to_string()),
                Err(error) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({ "error": error }).to_string(),
                ),
            }
        }
    })
    .await
}

fn json(status: StatusCode, body: String) -> Response<TestBody> {
    let mut res = Response::new(full(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    res
}

/// Makes the callbacks `req` asks for, in order, each through the proxy at `outbound`.
async fn callbacks(req: Request<Incoming>, outbound: Option<SocketAddr>) -> Result<(), String> {
    let outbound = outbound.ok_or("the proxy's outbound port is not known yet")?;
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    let actions: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let actions = match actions {
        serde_json::Value::Array(actions) => actions,
        serde_json::Value::Null => Vec::new(),
        other => vec![other],
    };
    let client = http1_client();
    for action in actions {
        let url: Uri = action["url"]
            .as_str()
            .ok_or("an action without a url")?
            .parse()
            .map_err(|e: http::uri::InvalidUri| e.to_string())?;
        let authority = url.authority().ok_or("a url without an authority")?;
        let path = url.path_and_query().map_or("/", |p| p.as_str());
        let arguments = action
            .get("arguments")
            .cloned()
            .unwrap_or(serde_json::Value::Array(Vec::new()));
        let mut callback = Request::post(format!("http://{outbound}{path}"))
            .header(http::header::HOST, authority.as_str())
            .header(http::header::CONTENT_TYPE, "application/json");
        for name in ["traceparent", "tracestate"] {
            for value in parts.headers.get_all(name) {
                callback = callback.header(name, value);
            }
        }
        let callback = callback
            .body(full(arguments.to_string()))
            .map_err(|e| e.to_string())?;
        let res = client.request(callback).await.map_err(|e| e.to_string())?;
        let status = res.status();
        res.into_body().collect().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("callback to {url} answered {status}"));
        }
    }
    Ok(())
}
