//! Free loopback ports for servers started by Shoal itself (`shoal up`'s
//! children) and by its tests.

use std::sync::Mutex;

/// A free loopback port below the kernel's ephemeral range. A port from
/// that range (what binding port 0 gives) may be taken, before its server
/// binds it, as the local port of one of the many outgoing connections on
/// the machine; the server would then fail to start, again and again on the
/// same port. A port is not handed out twice by one process. Falls back to
/// port 0's choice when no port below the range is free.
pub fn loopback_port() -> std::io::Result<u16> {
    static PICKED: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = (low.saturating_sub(12_000).max(1024), low);
    if from < to {
        for _ in 0..64 {
            let seed = uuid::Uuid::new_v4().as_u128() as u32;
            let port = from + (seed % u32::from(to - from)) as u16;
            let mut picked = PICKED.lock().unwrap_or_else(|p| p.into_inner());
            if !picked.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                picked.push(port);
                return Ok(port);
            }
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// How many connections the kernel may queue for a listener before it
/// accepts them (capped by `net.core.somaxconn`, 4096 on recent kernels).
/// tokio's `TcpListener::bind` asks for 1,024: a burst of reconnects
/// beyond that (thousands of event streams moved by a drain) found the
/// queue full, the kernel dropped their SYNs, and each connect waited a
/// second for its retransmission, past the gateway's connect timeout.
pub const LISTEN_BACKLOG: u32 = 8192;

/// A listening socket on `addr` with [`LISTEN_BACKLOG`] (and
/// `SO_REUSEADDR`, as `TcpListener::bind` sets on Unix).
pub fn bind_listener(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

#[cfg(test)]
mod tests {
    /// The listener takes connections, and holds more unaccepted ones
    /// than tokio's 1,024 (the kernel's cap permitting).
    #[tokio::test]
    async fn a_listener_queues_more_than_tokio_would() {
        let listener = super::bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let cap: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(4096);
        let want = cap.min(1_500);
        if want <= 1_100 {
            return; // this kernel caps the queue at tokio's size anyway
        }
        // Connections complete while none is accepted, up to the queue.
        let mut held = Vec::new();
        for n in 0..want {
            let connect = tokio::net::TcpStream::connect(addr);
            match tokio::time::timeout(std::time::Duration::from_millis(500), connect).await {
                Ok(Ok(s)) => held.push(s),
                Ok(Err(e)) => panic!("connection {n} of {want} failed (open-files limit?): {e}"),
                Err(_) => panic!("connection {n} of {want} waited: the queue is shorter"),
            }
        }
        let (_first, _) = listener.accept().await.unwrap();
    }

    #[test]
    fn ports_are_free_distinct_and_below_the_ephemeral_range() {
        let a = super::loopback_port().unwrap();
        let b = super::loopback_port().unwrap();
        assert_ne!(a, b);
        std::net::TcpListener::bind(("127.0.0.1", a)).expect("free");
        if let Ok(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") {
            let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
            assert!(a < low && b < low, "{a} {b} below {low}");
        }
    }
}
