//! Nagle's algorithm off on the process's TCP sockets.
//!
//! sqlx 0.9.0 stopped setting `TCP_NODELAY` on the sockets it opens (launchbadge/sqlx#4335,
//! fixed upstream after 0.9.0). With Nagle's algorithm on, a message whose last segment is
//! small waits for the server's delayed ACK: 40 ms on Linux. Measured here: a TLS
//! handshake pays it twice (86 ms per connection, psql: none), and a message over one
//! segment pays it once (the 346-migration run report, on loopback; on a network, any
//! message between one and two segments, about 1.5–3 kB: a migration script sent with its
//! BEGIN). libpq sets `TCP_NODELAY` on every connection; so does belay, after each
//! connect, until sqlx does again.

/// Turns Nagle's algorithm off on every TCP socket this process has open, the connection
/// just made included. Cheap (a look at the descriptor table) and idempotent; sockets
/// that are not TCP refuse the option, harmlessly. A no-op where `/proc/self/fd` does not
/// exist.
pub fn send_without_delay() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if is_socket {
            sys::set_nodelay(fd);
        }
    }
}

// The one FFI call of this crate: std sets TCP_NODELAY only on sockets it owns.
#[allow(unsafe_code)]
mod sys {
    pub fn set_nodelay(fd: i32) {
        let one: libc::c_int = 1;
        // SAFETY: `setsockopt` reads `size_of::<c_int>()` bytes from a live local. `fd` is
        // a descriptor of this process read from /proc/self/fd; if it was closed since and
        // its number reused, the option lands on another descriptor of this process, where
        // it is either wanted (a TCP socket) or refused (anything else).
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&raw const one).cast::<libc::c_void>(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_tcp_socket_of_the_process_sends_without_delay() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let stream =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        assert!(
            !stream.nodelay().expect("nodelay"),
            "Nagle is on by default"
        );
        super::send_without_delay();
        assert!(stream.nodelay().expect("nodelay"));
    }
}
