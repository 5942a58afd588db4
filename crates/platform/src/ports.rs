//! Picking a loopback port for a process that will listen on it later (the
//! local stack and the tests start servers on ports chosen in advance).

use std::{
    net::TcpListener,
    sync::atomic::{AtomicU32, Ordering},
};

/// The range ports are picked from: below Linux's ephemeral range
/// (32768-60999), so the kernel never hands a picked port to an outgoing
/// connection as its local port between the pick and the server's bind,
/// which is what `bind(":0")` then close risks under load.
const FIRST: u32 = 20_000;
const COUNT: u32 = 12_000;

/// A loopback port that is free now, from [`FIRST`]..[`FIRST`]+[`COUNT`].
///
/// # Errors
///
/// When no port in the range (nor any ephemeral one) can be bound.
pub fn free_port() -> std::io::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().wrapping_mul(2_654_435_761);
    for _ in 0..2_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let offset = seed.wrapping_add(n.wrapping_mul(7_919)) % COUNT;
        let port = u16::try_from(FIRST + offset).unwrap_or(u16::MAX);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    #[test]
    fn picked_ports_are_free_and_below_the_ephemeral_range() {
        for _ in 0..50 {
            let port = super::free_port().expect("a port");
            assert!((20_000..32_000).contains(&port), "{port}");
            assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
        }
    }
}
