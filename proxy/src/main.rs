//! `outrider-proxy`: the sidecar's command line, run by [`outrider_proxy::cli::run`] (also
//! reached through `outrider-control` when the image's `outrider-proxy` symlink calls it).

use std::process::ExitCode;

/// mimalloc: its thread-local free lists cut the allocator's share of the request path.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    outrider_proxy::cli::run()
}
