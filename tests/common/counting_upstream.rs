//! A minimal raw HTTP/1.1 origin that counts its TCP connections, for tests
//! of how tiergate holds upstream connections. A request (a head, and the
//! body its `content-length` declares) gets `200 ok`, or, as its
//! [`Behaviour`] says, `connection: close` or no answer at all.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// How the origin treats the requests it reads.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Behaviour {
    /// Answers every request and keeps the connection open.
    KeepAlive,
    /// Answers with `connection: close` and shuts the connection down.
    CloseAfterResponse,
    /// Answers the first request of each connection; closes the connection
    /// without a word when a second one arrives on it: an origin whose
    /// keep-alive timer fired just as tiergate reused the connection.
    DropSecondOnConnection,
    /// The same, but the connection is reset (`SO_LINGER` 0) instead of
    /// closed.
    ResetSecondOnConnection,
    /// Answers the first request it ever reads; every later one is read
    /// and its connection closed without an answer.
    DropAllButFirst,
}

/// Connection counters shared with the server threads.
#[derive(Default)]
struct Counters {
    accepted: AtomicUsize,
    open: AtomicUsize,
    requests: AtomicUsize,
    dropped: AtomicUsize,
    heads: AtomicUsize,
}

/// The counting origin; stops accepting on drop.
pub struct CountingUpstream {
    addr: SocketAddr,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
}

impl CountingUpstream {
    /// Starts on `127.0.0.1:<random>`; with `close_after_response`,
    /// [`Behaviour::CloseAfterResponse`], else [`Behaviour::KeepAlive`].
    pub fn start(close_after_response: bool) -> CountingUpstream {
        CountingUpstream::with(if close_after_response {
            Behaviour::CloseAfterResponse
        } else {
            Behaviour::KeepAlive
        })
    }

    /// Starts on `127.0.0.1:<random>`, behaving as `behaviour` says.
    pub fn with(behaviour: Behaviour) -> CountingUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind counting upstream");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (counters.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        c.accepted.fetch_add(1, Ordering::SeqCst);
                        c.open.fetch_add(1, Ordering::SeqCst);
                        let c = c.clone();
                        std::thread::spawn(move || {
                            serve(stream, behaviour, &c);
                            c.open.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        CountingUpstream {
            addr,
            counters,
            stop,
        }
    }

    /// `http://127.0.0.1:P`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.counters.accepted.load(Ordering::SeqCst)
    }

    /// Connections still open.
    pub fn open(&self) -> usize {
        self.counters.open.load(Ordering::SeqCst)
    }

    /// Requests answered so far.
    pub fn requests(&self) -> usize {
        self.counters.requests.load(Ordering::SeqCst)
    }

    /// Request heads read so far (a request whose body is still coming
    /// counts).
    pub fn heads(&self) -> usize {
        self.counters.heads.load(Ordering::SeqCst)
    }

    /// Requests read whole and left unanswered, their connection closed.
    pub fn dropped(&self) -> usize {
        self.counters.dropped.load(Ordering::SeqCst)
    }
}

impl Drop for CountingUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(mut stream: TcpStream, behaviour: Behaviour, c: &Counters) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let close_after_response = behaviour == Behaviour::CloseAfterResponse;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut on_this_connection = 0;
    let mut head_counted = false;
    loop {
        while let Some(end) = find_head_end(&buf) {
            if !head_counted {
                c.heads.fetch_add(1, Ordering::SeqCst);
                head_counted = true;
            }
            let len = content_length(&buf[..end]);
            if buf.len() < end + len {
                break;
            }
            buf.drain(..end + len);
            head_counted = false;
            on_this_connection += 1;
            let drop_it = match behaviour {
                Behaviour::DropSecondOnConnection | Behaviour::ResetSecondOnConnection => {
                    on_this_connection > 1
                }
                Behaviour::DropAllButFirst => c.requests.load(Ordering::SeqCst) > 0,
                _ => false,
            };
            if drop_it {
                c.dropped.fetch_add(1, Ordering::SeqCst);
                if behaviour == Behaviour::ResetSecondOnConnection {
                    // Closing with a zero linger sends RST, not FIN.
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                } else {
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                }
                return;
            }
            c.requests.fetch_add(1, Ordering::SeqCst);
            let resp: &[u8] = if close_after_response {
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
            };
            if stream.write_all(resp).is_err() {
                return;
            }
            if close_after_response {
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The `content-length` of a request head (0 when absent).
fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}
