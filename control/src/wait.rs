//! `outriderctl wait-ready`: polls the proxy's `/ready` until it answers 200. The legacy
//! (pre-1.29) sidecar runs it as its postStart hook, which holds the app containers back until
//! the proxy is ready; the image has no shell, so this cannot be a curl loop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// `outriderctl wait-ready` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// The proxy's admin address.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Give up (exit 1) after this long.
    #[arg(long, default_value = "120s")]
    pub timeout: outrider_config::Duration,
}

/// How often `/ready` is asked.
const POLL: Duration = Duration::from_millis(100);
/// One attempt's connect and read bound, so a stuck peer cannot outlive the timeout by much.
const ATTEMPT: Duration = Duration::from_secs(1);

/// Runs `outriderctl wait-ready`: 0 once `/ready` is 200, 1 on timeout.
pub fn main(args: &WaitArgs) -> ExitCode {
    let deadline = Instant::now() + args.timeout.get();
    loop {
        if ready(args.admin) {
            return ExitCode::SUCCESS;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "outriderctl: {} not ready after {:?}",
                args.admin,
                args.timeout.get()
            );
            return ExitCode::from(1);
        }
        std::thread::sleep(POLL);
    }
}

/// True if `GET /ready` on `admin` answers 200.
pub fn ready(admin: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&admin, ATTEMPT) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(ATTEMPT));
    let _ = stream.set_write_timeout(Some(ATTEMPT));
    let request = format!("GET /ready HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 16];
    let mut got = 0;
    while got < head.len() {
        match stream.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    head[..got].starts_with(b"HTTP/1.1 200 ")
}
