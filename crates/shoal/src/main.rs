//! The `shoal` binary: Shoal with its own services (`shoal::Builder`).

use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: the gateway's proxy path spent 8% of
/// its CPU in glibc malloc/free (perf, bench/gateway.sh load). It costs
/// memory; `--features system-alloc` keeps glibc's. See ARCHITECTURE.md
/// and `alloc.rs`.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: shoal::alloc::Mimalloc = shoal::alloc::Mimalloc;

fn main() -> ExitCode {
    shoal::Builder::new().run()
}
