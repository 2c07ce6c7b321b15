//! The listening socket: bound with a deep backlog, accepted from until WouldBlock, and paused
//! by deadline (never by sleeping) when the process runs out of file descriptors.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use slog::{Logger, info, warn};
use socket2::{Domain, Protocol, Socket, Type};

use crate::conn::{interrupted, would_block};

/// Connections the kernel queues before we accept them. std and mio use 128, which a burst of
/// 256 connecting clients (wrk -c256) overflows into SYN retries that cost a second each; the
/// kernel caps it at `net.core.somaxconn` (4096 on current kernels).
pub const LISTEN_BACKLOG: i32 = 4096;

/// How long accepting pauses after `accept` fails for want of descriptors or memory. Retrying
/// at once would spin (the queued connection keeps the listener readable); a tenth of a second
/// lets closing connections free descriptors while bounding the wait of queued clients.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// The result of one `accept`.
pub enum Accept {
    /// A new connection.
    Conn(TcpStream, SocketAddr),
    /// The queue is empty.
    Empty,
    /// Out of file descriptors or kernel memory: pause accepting for [`ACCEPT_PAUSE`].
    Exhausted(io::Error),
}

/// The bound listening socket.
pub struct Listener {
    socket: TcpListener,
    addr: SocketAddr,
}

impl Listener {
    /// Binds `addr` (port 0 picks a free port) with `SO_REUSEADDR` and [`LISTEN_BACKLOG`].
    pub fn bind(addr: SocketAddr) -> io::Result<Listener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        if addr.is_ipv6() {
            socket.set_only_v6(false).ok();
        }
        socket.set_nonblocking(true)?;
        // One write per batch of responses: never let Nagle hold back the last segment.
        // Accepted sockets inherit TCP_NODELAY from the listener, saving a syscall each.
        socket.set_tcp_nodelay(true)?;
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        let socket = TcpListener::from_std(socket.into());
        let addr = socket.local_addr()?;
        Ok(Listener { socket, addr })
    }

    /// Adopts a listening socket bound by someone else (systemd's socket activation).
    pub fn adopt(socket: std::net::TcpListener) -> io::Result<Listener> {
        socket.set_nonblocking(true)?;
        socket2::SockRef::from(&socket).set_tcp_nodelay(true)?;
        let socket = TcpListener::from_std(socket);
        let addr = socket.local_addr()?;
        Ok(Listener { socket, addr })
    }

    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The socket, for (de)registration.
    pub fn socket_mut(&mut self) -> &mut TcpListener {
        &mut self.socket
    }

    /// The socket.
    pub fn socket(&self) -> &TcpListener {
        &self.socket
    }

    /// Accepts one connection, skipping failures that belong to that connection alone.
    pub fn accept(&self) -> Accept {
        loop {
            match self.socket.accept() {
                Ok((stream, peer)) => return Accept::Conn(stream, peer),
                Err(e) if would_block(&e) => return Accept::Empty,
                Err(e) if interrupted(&e) || connection_specific(&e) => continue,
                Err(e) => return Accept::Exhausted(e),
            }
        }
    }
}

/// A listener taken from until WouldBlock, paused by deadline when descriptors run out: one
/// log line per episode, not one per retry.
pub struct Acceptor {
    listener: Listener,
    /// Accepting is paused until [`Acceptor::resume`] (out of descriptors).
    paused: bool,
    /// `accept` has failed for want of resources and not succeeded since.
    exhausted: bool,
}

impl Acceptor {
    /// Accepts from `listener`.
    pub fn new(listener: Listener) -> Acceptor {
        Acceptor {
            listener,
            paused: false,
            exhausted: false,
        }
    }

    /// The listener.
    pub fn listener(&self) -> &Listener {
        &self.listener
    }

    /// The listener, for (de)registration.
    pub fn listener_mut(&mut self) -> &mut Listener {
        &mut self.listener
    }

    /// The listener, no longer accepted from here.
    pub fn into_listener(self) -> Listener {
        self.listener
    }

    /// Accepts until the queue is empty (edge-triggered: one event may stand for many), giving
    /// each connection to `take`. Returns when to resume if accepting had to pause (EMFILE);
    /// `open` is the connection count the log lines report.
    pub fn accept_all(
        &mut self,
        now: Instant,
        log: &Logger,
        open: impl Fn() -> usize,
        mut take: impl FnMut(TcpStream, SocketAddr),
    ) -> Option<Instant> {
        if self.paused {
            return None;
        }
        loop {
            match self.listener.accept() {
                Accept::Conn(stream, peer) => {
                    if self.exhausted {
                        info!(log, "accepting again"; "connections" => open());
                        self.exhausted = false;
                    }
                    take(stream, peer);
                }
                Accept::Empty => return None,
                Accept::Exhausted(e) => {
                    if !self.exhausted {
                        warn!(log, "cannot accept, pausing until descriptors free up"; "error" => %e,
                              "retry_ms" => ACCEPT_PAUSE.as_millis() as u64, "connections" => open());
                        self.exhausted = true;
                    }
                    self.paused = true;
                    return Some(now + ACCEPT_PAUSE);
                }
            }
        }
    }

    /// The pause is over (its deadline passed), or must be ignored (the drain takes the queue).
    pub fn resume(&mut self) {
        self.paused = false;
    }
}

/// accept(2) errors about the connection being accepted, not the listener (the peer reset it
/// while queued, a firewall refused it): skip that connection and keep accepting.
fn connection_specific(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ECONNABORTED | libc::EPROTO | libc::EPERM | libc::ENETDOWN | libc::ENOPROTOOPT)
            | Some(
                libc::EHOSTDOWN
                    | libc::ENONET
                    | libc::EHOSTUNREACH
                    | libc::EOPNOTSUPP
                    | libc::ENETUNREACH
            )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let _client = std::net::TcpStream::connect(listener.addr()).unwrap();
        let accepted = loop {
            match listener.accept() {
                Accept::Conn(stream, _) => break stream,
                Accept::Empty => std::thread::yield_now(),
                Accept::Exhausted(e) => panic!("{e}"),
            }
        };
        assert!(accepted.nodelay().unwrap());
    }
}
