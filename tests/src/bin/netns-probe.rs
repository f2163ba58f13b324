//! A TCP probe for the capture tests (tests/tests/capture_init.rs), run inside network
//! namespaces with `ip netns exec`:
//!
//! - `netns-probe listen TAG ADDR...` listens on each address (IPv6 ones IPv6-only), prints
//!   `ready`, and answers every connection with `TAG local=ADDR orig=ORIGINAL_DST` (the
//!   address before a netfilter redirect, `none` when there was none), for at most 60 s.
//! - `netns-probe connect ADDR` connects (3 s deadline), prints the answer and exits 0, or
//!   prints the error and exits 1.
//! - `netns-probe relay TARGET LISTEN...` listens on each `LISTEN`, prints `ready`, and relays
//!   every connection byte for byte to a new connection to `TARGET`, for at most 120 s. Each
//!   endpoint is `tcp:ADDR` or `unix:PATH`. A test process cannot open sockets inside another
//!   network namespace itself (that takes `setns`), but a Unix socket's path is reachable from
//!   every namespace: a relay in a pod with `tcp:` on its pod side is how the test's own clients
//!   and servers act as that pod's app (tests/src/netns.rs).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};

/// A listener outlives no test: the longest a probe serves.
const LIFETIME: Duration = Duration::from_secs(60);
const CONNECT_DEADLINE: Duration = Duration::from_secs(3);
/// A relay outlives no test (nextest ends one at 120 s).
const RELAY_LIFETIME: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("listen") if args.len() >= 3 => listen(&args[1], &args[2..]),
        Some("connect") if args.len() == 2 => connect(&args[1]),
        Some("relay") if args.len() >= 3 => relay(&args[1], &args[2..]),
        _ => {
            eprintln!(
                "usage: netns-probe listen TAG ADDR... | netns-probe connect ADDR \
                 | netns-probe relay TARGET LISTEN..."
            );
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

/// A connected stream of either kind.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn connect(endpoint: &str) -> std::io::Result<Stream> {
        match endpoint.split_once(':') {
            Some(("tcp", addr)) => {
                let addr: SocketAddr = addr
                    .parse()
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                TcpStream::connect_timeout(&addr, CONNECT_DEADLINE).map(Stream::Tcp)
            }
            Some(("unix", path)) => UnixStream::connect(path).map(Stream::Unix),
            _ => Err(bad_endpoint(endpoint)),
        }
    }

    fn try_clone(&self) -> std::io::Result<Stream> {
        match self {
            Stream::Tcp(s) => s.try_clone().map(Stream::Tcp),
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
        }
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }

    fn shutdown_both(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn bad_endpoint(endpoint: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("{endpoint}: expected tcp:ADDR or unix:PATH"),
    )
}

fn relay(target: &str, listens: &[String]) -> ExitCode {
    let mut acceptors: Vec<Box<dyn FnMut() -> std::io::Result<Stream> + Send>> = Vec::new();
    for endpoint in listens {
        let bound = match endpoint.split_once(':') {
            Some(("tcp", addr)) => bind(addr).map(|listener| {
                Box::new(move || listener.accept().map(|(s, _)| Stream::Tcp(s)))
                    as Box<dyn FnMut() -> std::io::Result<Stream> + Send>
            }),
            Some(("unix", path)) => UnixListener::bind(path).map(|listener| {
                Box::new(move || listener.accept().map(|(s, _)| Stream::Unix(s)))
                    as Box<dyn FnMut() -> std::io::Result<Stream> + Send>
            }),
            _ => Err(bad_endpoint(endpoint)),
        };
        match bound {
            Ok(accept) => acceptors.push(accept),
            Err(e) => {
                eprintln!("netns-probe: cannot listen on {endpoint}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    for mut accept in acceptors {
        let target = target.to_string();
        std::thread::spawn(move || loop {
            let Ok(downstream) = accept() else { continue };
            let target = target.clone();
            std::thread::spawn(move || match Stream::connect(&target) {
                Ok(upstream) => splice(downstream, upstream),
                // Closing the accepted connection is how the client learns of the failure.
                Err(e) => eprintln!("netns-probe: relay to {target}: {e}"),
            });
        });
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    std::thread::sleep(RELAY_LIFETIME);
    ExitCode::SUCCESS
}

/// Copies both ways until each side has ended its half (a half-close travels as one).
fn splice(a: Stream, b: Stream) {
    let (Ok(mut a_read), Ok(mut b_read)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let (mut a_write, mut b_write) = (a, b);
    let forward = std::thread::spawn(move || {
        let copied = std::io::copy(&mut a_read, &mut b_write);
        b_write.shutdown_write();
        if copied.is_err() {
            b_write.shutdown_both();
        }
    });
    let copied = std::io::copy(&mut b_read, &mut a_write);
    a_write.shutdown_write();
    if copied.is_err() {
        a_write.shutdown_both();
    }
    let _ = forward.join();
}
