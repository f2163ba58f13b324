//! An HTTP/1.1 probe for the capture runtime tests (tests/tests/capture_runtime.rs), run inside
//! network namespaces with `ip netns exec`; an app that knows nothing of the proxy:
//!
//! - `http-probe serve TAG ADDR...` answers every request on each address with 200 and the body
//!   `TAG host=HOST` (the request's Host), prints `ready`, and serves for at most 60 s.
//! - `http-probe get ADDR HOST PATH` sends one GET (3 s deadline for each step) and prints the
//!   status line and, after a line `--`, the body; exits 1 on a transport error or a
//!   connection closed without a response.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

const LIFETIME: Duration = Duration::from_secs(60);
const DEADLINE: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") if args.len() >= 3 => serve(&args[1], &args[2..]),
        Some("get") if args.len() == 4 => get(&args[1], &args[2], &args[3]),
        _ => {
            eprintln!("usage: http-probe serve TAG ADDR... | http-probe get ADDR HOST PATH");
            ExitCode::from(64)
        }
    }
}

fn serve(tag: &str, addrs: &[String]) -> ExitCode {
    let mut listeners = Vec::new();
    for addr in addrs {
        match addr.parse::<SocketAddr>().map(TcpListener::bind) {
            Ok(Ok(listener)) => listeners.push(listener),
            Ok(Err(e)) => {
                eprintln!("http-probe: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("http-probe: bad address {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    for listener in listeners {
        let tag = tag.to_string();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let tag = tag.clone();
                std::thread::spawn(move || {
                    let _ = answer(&tag, stream);
                });
            }
        });
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    std::thread::sleep(LIFETIME);
    ExitCode::SUCCESS
}

/// Answers the requests of one keep-alive connection.
fn answer(tag: &str, stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(LIFETIME))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut host = String::new();
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("host") {
                    host = value.trim().to_string();
                }
            }
        }
        let body = format!("{tag} host={host}");
        write!(
            writer,
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )?;
    }
}

fn get(addr: &str, host: &str, path: &str) -> ExitCode {
    match fetch(addr, host, path) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("http-probe: GET {path} from {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn fetch(addr: &str, host: &str, path: &str) -> std::io::Result<String> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stream = TcpStream::connect_timeout(&addr, DEADLINE)?;
    stream.set_read_timeout(Some(DEADLINE))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    if response.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without a response",
        ));
    }
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or("");
    Ok(format!("{status}\n--\n{body}"))
}
