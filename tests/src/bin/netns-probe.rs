//! A TCP probe for the capture tests (tests/tests/capture_init.rs), run inside network
//! namespaces with `ip netns exec`:
//!
//! - `netns-probe listen TAG ADDR...` listens on each address (IPv6 ones IPv6-only), prints
//!   `ready`, and answers every connection with `TAG local=ADDR orig=ORIGINAL_DST` (the
//!   address before a netfilter redirect, `none` when there was none), for at most 60 s.
//! - `netns-probe connect ADDR` connects (3 s deadline), prints the answer and exits 0, or
//!   prints the error and exits 1.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};

/// A listener outlives no test: the longest a probe serves.
const LIFETIME: Duration = Duration::from_secs(60);
const CONNECT_DEADLINE: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("listen") if args.len() >= 3 => listen(&args[1], &args[2..]),
        Some("connect") if args.len() == 2 => connect(&args[1]),
        _ => {
            eprintln!("usage: netns-probe listen TAG ADDR... | netns-probe connect ADDR");
            ExitCode::from(64)
        }
    }
}

fn listen(tag: &str, addrs: &[String]) -> ExitCode {
    let mut listeners = Vec::new();
    for addr in addrs {
        match bind(addr) {
            Ok(listener) => listeners.push(listener),
            Err(e) => {
                eprintln!("netns-probe: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    for listener in listeners {
        let tag = tag.to_string();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = answer(&tag, stream);
            }
        });
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    std::thread::sleep(LIFETIME);
    ExitCode::SUCCESS
}

fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        // Beside a 0.0.0.0 listener on the same port.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(64)?;
    Ok(socket.into())
}

fn answer(tag: &str, mut stream: TcpStream) -> std::io::Result<()> {
    let local = stream.local_addr()?;
    let socket = SockRef::from(&stream);
    let original = if local.is_ipv4() {
        socket.original_dst_v4()
    } else {
        socket.original_dst_v6()
    };
    let original = original
        .ok()
        .and_then(|addr| addr.as_socket())
        .map_or_else(|| "none".to_string(), |addr| addr.to_string());
    stream.write_all(format!("{tag} local={local} orig={original}\n").as_bytes())
}

fn connect(addr: &str) -> ExitCode {
    let result = addr
        .parse::<SocketAddr>()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
        .and_then(|addr| TcpStream::connect_timeout(&addr, CONNECT_DEADLINE))
        .and_then(|mut stream| {
            stream.set_read_timeout(Some(CONNECT_DEADLINE))?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply)?;
            Ok(reply)
        });
    match result {
        Ok(reply) => {
            print!("{reply}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("netns-probe: {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}
