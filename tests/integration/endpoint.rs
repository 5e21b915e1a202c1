//! A Stripe-like HTTP endpoint on loopback for the HTTP sink's tests: real
//! sockets, HTTP/1.1 parsed by hand (one request per connection), every
//! request recorded, faults injected by a script, and the endpoint's own
//! dedup by `Idempotency-Key`, so tests check what it *applied*, after dedup.
//!
//! Dedup, as Stripe documents it: the first request of a key that reaches the
//! handler is applied and its answer stored; a later request of the key gets
//! the stored answer (`Idempotent-Replayed: true`) and is not applied again;
//! one that arrives while the first is still being handled gets 409; one with
//! another body gets 422.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What the script makes of one request, before dedup.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Go on to dedup and apply.
    None,
    /// Answer this status (with a body and maybe `Retry-After`) without applying.
    Status { status: u16, retry_after: Option<u64>, body: String },
    /// Close the connection with a TCP reset, without applying or answering.
    Reset,
    /// Apply, then answer only after this long (a client timeout loses the answer).
    SlowAnswer(Duration),
    /// Apply, then hold the answer until [`Endpoint::release`] (or a minute).
    Hold,
    /// Apply, then hold the answer until this many requests have been handled at
    /// once (or half a minute), then answer after the given time.
    Gate(usize, Duration),
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
    /// What was done with it: "fault 500", "reset", "applied", "replayed", "in progress", "reused".
    pub handled: String,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn key(&self) -> &str {
        self.header("idempotency-key").unwrap_or("")
    }
    /// The event ID, from the JSON body's `id`.
    pub fn event_id(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_string))
            .unwrap_or_default()
    }
}

type Script = dyn Fn(&Seen, usize) -> Fault + Send + Sync;

/// A key's first body and its stored answer (`None` while the first request is in progress).
type Stored = (Vec<u8>, Option<(u16, String)>);

#[derive(Default)]
struct State {
    seen: Vec<Seen>,
    stored: HashMap<String, Stored>,
    /// key → times its effect was applied.
    applied: HashMap<String, usize>,
    released: bool,
    /// Requests read but not yet answered, and the most at once: what the
    /// client holds open (a connection's close, after the answer, is not counted).
    in_flight: usize,
    most_in_flight: usize,
}

pub struct Endpoint {
    pub port: u16,
    state: Arc<(Mutex<State>, Condvar)>,
}

impl Endpoint {
    /// Starts serving; `script(request, nth request of its key, from 1)` picks a fault.
    pub fn start(script: impl Fn(&Seen, usize) -> Fault + Send + Sync + 'static) -> Endpoint {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let script: Arc<Script> = Arc::new(script);
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (state, script) = (shared.clone(), script.clone());
                std::thread::spawn(move || serve(stream, &state, &*script));
            }
        });
        Endpoint { port, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.0.lock().unwrap().seen.clone()
    }

    /// key → times applied.
    pub fn applied(&self) -> HashMap<String, usize> {
        self.state.0.lock().unwrap().applied.clone()
    }

    /// The most requests that were being handled at once.
    pub fn most_in_flight(&self) -> usize {
        self.state.0.lock().unwrap().most_in_flight
    }

    /// Lets held answers go.
    pub fn release(&self) {
        self.state.0.lock().unwrap().released = true;
        self.state.1.notify_all();
    }
}

/// A request being handled: counted from when it was read to just before its
/// answer (or reset) is written, so the count never exceeds what the client has
/// sent and not yet been answered, whatever the timing of connections.
struct Handling<'a>(&'a (Mutex<State>, Condvar));

impl<'a> Handling<'a> {
    fn begin(state: &'a (Mutex<State>, Condvar)) -> Handling<'a> {
        let mut s = state.0.lock().unwrap();
        s.in_flight += 1;
        s.most_in_flight = s.most_in_flight.max(s.in_flight);
        state.1.notify_all();
        Handling(state)
    }
}

impl Drop for Handling<'_> {
    fn drop(&mut self) {
        self.0 .0.lock().unwrap().in_flight -= 1;
    }
}

/// Handles one connection (one request).
fn serve(stream: TcpStream, state: &(Mutex<State>, Condvar), script: &Script) {
    let Some(mut seen) = read_request(&stream) else { return };
    let handling = Handling::begin(state);
    let (lock, released) = state;
    let nth = {
        let s = lock.lock().unwrap();
        s.seen.iter().filter(|r| r.key() == seen.key()).count() + 1
    };
    let fault = script(&seen, nth);
    let record = |seen: &mut Seen, handled: &str| {
        seen.handled = handled.to_string();
        lock.lock().unwrap().seen.push(seen.clone());
    };
    let mut stream = stream;
    match fault {
        Fault::Status { status, retry_after, body } => {
            record(&mut seen, &format!("fault {status}"));
            let extra = retry_after.map(|s| format!("Retry-After: {s}\r\n")).unwrap_or_default();
            drop(handling);
            respond(&mut stream, status, &extra, &body);
            return;
        }
        Fault::Reset => {
            record(&mut seen, "reset");
            drop(handling);
            reset(stream);
            return;
        }
        Fault::None | Fault::SlowAnswer(_) | Fault::Hold | Fault::Gate(..) => {}
    }
    // The endpoint's own dedup.
    let key = seen.key().to_string();
    let answer = {
        let mut s = lock.lock().unwrap();
        match s.stored.get(&key).cloned() {
            Some((body, _)) if body != seen.body => {
                Err((422, "reused", "idempotency key reused with other parameters"))
            }
            Some((_, None)) => Err((409, "in progress", "a request with this key is in progress")),
            Some((_, Some((status, text)))) => Ok(Some((status, text))),
            None => {
                s.stored.insert(key.clone(), (seen.body.clone(), None));
                *s.applied.entry(key.clone()).or_default() += 1;
                Ok(None)
            }
        }
    };
    match answer {
        Err((status, handled, text)) => {
            record(&mut seen, handled);
            drop(handling);
            respond(&mut stream, status, "", &format!(r#"{{"error":"{text}"}}"#));
        }
        Ok(Some((status, text))) => {
            record(&mut seen, "replayed");
            drop(handling);
            respond(&mut stream, status, "Idempotent-Replayed: true\r\n", &text);
        }
        Ok(None) => {
            record(&mut seen, "applied");
            let text = format!(r#"{{"object":"charge","id":"ch_{}","event":"{}"}}"#, &key[7..23], seen.event_id());
            lock.lock().unwrap().stored.insert(key, (seen.body.clone(), Some((200, text.clone()))));
            match fault {
                Fault::SlowAnswer(d) => std::thread::sleep(d),
                Fault::Hold => {
                    let s = lock.lock().unwrap();
                    drop(released.wait_timeout_while(s, Duration::from_secs(60), |s| !s.released).unwrap());
                }
                Fault::Gate(at, then) => {
                    let s = lock.lock().unwrap();
                    drop(released.wait_timeout_while(s, Duration::from_secs(30), |s| s.most_in_flight < at).unwrap());
                    std::thread::sleep(then);
                }
                _ => {}
            }
            drop(handling);
            respond(&mut stream, 200, "", &text);
        }
    }
}

fn read_request(stream: &TcpStream) -> Option<Seen> {
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Seen { method, path, headers, body, at: Instant::now(), handled: String::new() })
}

fn respond(stream: &mut TcpStream, status: u16, extra: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
}

/// SO_LINGER 0, then close: the peer gets a TCP reset, not a clean end.
fn reset(stream: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a socket we own, with a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}
