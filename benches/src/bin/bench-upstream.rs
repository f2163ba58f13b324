//! `bench-upstream`: the upstream of the load benchmark (`benches/load.sh`). A minimal hyper
//! 1.x server on a current-thread Tokio runtime that answers every request, HTTP/1.1 or
//! prior-knowledge h2c on the same port, with `200 OK` and the 13-byte body `hello, world\n`, after
//! reading the request body, if any.
//!
//! Usage: `bench-upstream [--listen ADDR]` (default `127.0.0.1:18080`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// The response body every request gets.
const BODY: &[u8] = b"hello, world\n";
/// Where it listens without `--listen`.
const DEFAULT_LISTEN: &str = "127.0.0.1:18080";
const USAGE: &str = "usage: bench-upstream [--listen ADDR]";

/// What the command line asks for.
enum Command {
    /// Serve on this address.
    Serve(SocketAddr),
    /// Print the usage and exit.
    Help,
}

fn parse_args() -> Result<Command, String> {
    let mut listen = DEFAULT_LISTEN.to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                listen = args
                    .next()
                    .ok_or_else(|| format!("--listen needs an address\n{USAGE}"))?;
            }
            s if s.starts_with("--listen=") => listen = s["--listen=".len()..].to_string(),
            "-h" | "--help" => return Ok(Command::Help),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    listen
        .parse()
        .map(Command::Serve)
        .map_err(|e| format!("invalid --listen address {listen:?}: {e}"))
}

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // A request body is read to its end before the answer, as a real server (the OTLP
    // collector of `load.sh --observability`) reads it: answering first left the sender
    // writing into a connection the server was about to drain or close.
    let body = req.into_body();
    if !body.is_end_stream() {
        let _ = body.collect().await;
    }
    let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(response)
}

async fn serve(listener: TcpListener) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                eprintln!("bench-upstream: accept failed: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = builder
            .serve_connection(TokioIo::new(stream), service_fn(answer))
            .into_owned();
        tokio::spawn(async move {
            // Clients closing mid-request are normal at the end of a load run.
            let _ = conn.await;
        });
    }
}

fn main() -> ExitCode {
    let listen = match parse_args() {
        Ok(Command::Serve(listen)) => listen,
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench-upstream: cannot start runtime: {e}");
            return ExitCode::from(70);
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::bind(listen).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("bench-upstream: cannot listen on {listen}: {e}");
                return ExitCode::from(69);
            }
        };
        let bound = listener.local_addr().unwrap_or(listen);
        eprintln!("bench-upstream: listening on {bound}");
        serve(listener).await;
        ExitCode::SUCCESS
    })
}
