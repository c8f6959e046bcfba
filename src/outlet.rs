//! A client's outlet: the way out to one client's socket, shared by the dispatcher (which hands
//! it frames) and the client's session thread (which writes what could not go out at once).
//!
//! The common case needs no thread switch at all: when nothing is waiting, the dispatcher writes
//! a batch's frames for this client straight to the socket, without blocking, in one `sendmsg`.
//! Whatever the socket does not take at once waits here, and the doorbell tells the session,
//! which writes more each time the socket has room. Nobody ever blocks on a write before the
//! session's final close, so a client that sends without reading cannot wedge its session: its
//! backlog grows until the dispatcher drops it as too slow. One lock keeps frames whole and in
//! order; it is held for a copy or a non-blocking write, never for a wait.
//!
//! Everything that waits for one client counts against one bound, the dispatcher's frames and
//! the session's own (pongs, errors, close) alike, and against a budget for all clients
//! together ([`Bounds`]); a [`Backlog`] over either says the client is too slow. The outlet
//! frames text messages (RFC 6455, unmasked: server to client) and knows nothing of rooms.
//!
//! Its destination is one of two ways: a socket (a WebSocket: raw clients, and socket.io
//! clients once on a WebSocket), or the [`Queue`] of an Engine.IO polling session, whose waiting
//! `GET` the queue wakes. A socket.io client's outlet has the [`Form`] `SocketIo`: each wschat
//! frame becomes its socket.io event on the way in ([`crate::socketio::from_server_frame`]). When a
//! polling client upgrades, its outlet takes over the WebSocket's way ([`Outlet::take_over`]), so
//! the dispatcher keeps one outlet per client whatever the transport.

use std::collections::HashMap;
use std::io::{self, IoSlice, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::doorbell::{Doorbell, WAITING};
use crate::metrics::Metrics;
use crate::protocol::Frame;
use crate::socketio;

/// Flags of every write: never wait, and (where the system has it) no SIGPIPE for a peer gone.
#[cfg(any(
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd",
    target_os = "netbsd"
))]
const SEND_FLAGS: libc::c_int = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
#[cfg(not(any(
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd",
    target_os = "netbsd"
)))]
const SEND_FLAGS: libc::c_int = libc::MSG_DONTWAIT;

/// Frames per `sendmsg`: headers and payloads make two slices each, well under `IOV_MAX` (1024).
const FRAMES_PER_WRITE: usize = 64;
/// A header for a payload of any length: 2 bytes, plus 8 for the length (no mask).
const MAX_HEADER_BYTES: usize = 10;
/// Buffer capacity kept once the backlog is written; a bigger burst's buffer is released.
const KEEP_BUFFER_BYTES: usize = 16 * 1024;
/// Entries of the socket.io forms table kept between batches; a bigger batch's is released.
const KEEP_FORMS: usize = 1024;

/// A client over the total budget is dropped only if it holds at least this much of it: a
/// client with a small backlog is not punished for the others'.
const FAIR_SHARE_BYTES: usize = 64 * 1024;

/// A close the dispatcher asked for: code and reason.
pub type CloseRequest = (u16, &'static str);

/// How much may wait before a client counts as too slow.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Frames waiting for one client (`--client-queue`).
    pub frames: usize,
    /// Bytes waiting for one client (`--client-queue-bytes`).
    pub bytes: usize,
    /// Bytes waiting for all clients together (`--backlog-bytes`), counted in
    /// [`Metrics::backlog_bytes`].
    pub total_bytes: usize,
}

/// What is waiting for the session to write, after a [`Outlet::send`].
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Backlog {
    pub frames: usize,
    pub bytes: usize,
    /// Past the client's bound, or past the total budget with more than a fair share.
    pub too_slow: bool,
}

/// What the session learns from [`Outlet::drain`].
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Drained {
    /// Bytes still wait for room in the socket.
    pub pending: bool,
    /// Some bytes went out.
    pub progressed: bool,
    pub close: Option<CloseRequest>,
}

/// How the client reads frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// wschat's JSON frames, as they are.
    Raw,
    /// socket.io events (`42["chat message","hi"]`); `full` adds the message object.
    SocketIo { full: bool },
}

/// Where the frames of a client without a socket of its own wait: an Engine.IO polling
/// session's queue, which wakes the session's waiting `GET`.
pub trait Queue: Send + Sync {
    /// Queues frames already in the client's form; says what waits now.
    fn push(&self, frames: &[Frame]) -> Backlog;
    /// Ends the session (the dispatcher dropped the client).
    fn close(&self, reason: &'static str);
}

/// An outlet's destination.
#[derive(Clone)]
enum Way {
    /// A WebSocket, written here; its session is rung for what waits.
    Socket {
        stream: Arc<TcpStream>,
        doorbell: Arc<Doorbell>,
    },
    /// A polling session's queue (weak: the session owns its outlet, not the other way round).
    Queue(Weak<dyn Queue>),
}

pub struct Outlet {
    metrics: Arc<Metrics>,
    bounds: Bounds,
    state: Mutex<State>,
}

struct State {
    way: Way,
    form: Form,
    out: Pending,
    close: Option<CloseRequest>,
    /// The session is ending: frames from the dispatcher are dropped.
    shut: bool,
}

/// Bytes the socket has not taken yet.
#[derive(Default)]
struct Pending {
    /// Whole frames that the socket has not taken yet, from offset `sent` on.
    waiting: Vec<u8>,
    sent: usize,
    /// Frames in `waiting`.
    frames: usize,
}

impl Pending {
    fn pending(&self) -> usize {
        self.waiting.len() - self.sent
    }
}

impl Outlet {
    /// An outlet to a WebSocket, whose session parks on `doorbell`.
    pub fn new(
        stream: Arc<TcpStream>,
        doorbell: Arc<Doorbell>,
        metrics: Arc<Metrics>,
        bounds: Bounds,
    ) -> Outlet {
        Outlet::with_way(Way::Socket { stream, doorbell }, metrics, bounds)
    }

    /// An outlet to a polling session's queue, in socket.io's form.
    pub fn queued(queue: Weak<dyn Queue>, metrics: Arc<Metrics>, bounds: Bounds) -> Outlet {
        let outlet = Outlet::with_way(Way::Queue(queue), metrics, bounds);
        outlet.set_form(Form::SocketIo { full: false });
        outlet
    }

    fn with_way(way: Way, metrics: Arc<Metrics>, bounds: Bounds) -> Outlet {
        let state = State {
            way,
            form: Form::Raw,
            out: Pending::default(),
            close: None,
            shut: false,
        };
        Outlet {
            metrics,
            bounds,
            state: Mutex::new(state),
        }
    }

    /// How the dispatcher's frames are turned before they leave (set at a socket.io CONNECT).
    pub fn set_form(&self, form: Form) {
        self.lock().form = form;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves the all-clients gauge by what this outlet's backlog changed (from `before` bytes to
    /// what waits now), and says where the backlog stands.
    fn account(&self, out: &Pending, before: usize) -> Backlog {
        let bytes = out.pending();
        let total = move_gauge(&self.metrics, before, bytes);
        Backlog {
            frames: out.frames,
            bytes,
            too_slow: self.bounds.exceeded(total, out.frames, bytes),
        }
    }

    // ----- the dispatcher's side -----

    /// Sends `frames` (wschat's frames, turned into the client's form, through `forms`) in
    /// order: at once if the socket takes them, else they wait for the session. Never blocks.
    /// Returns what is waiting now.
    pub fn send(&self, frames: &[Frame], forms: &mut SocketIoForms) -> Backlog {
        let mut state = self.lock();
        if state.shut {
            return Backlog::default();
        }
        match state.form {
            Form::Raw => self.deliver(&mut state, frames),
            Form::SocketIo { full } => {
                let events: Vec<Frame> = frames
                    .iter()
                    .filter_map(|frame| forms.get(frame, full))
                    .collect();
                self.deliver(&mut state, &events)
            }
        }
    }

    /// Sends frames already in the client's form (socket.io's own packets: the answer to a
    /// CONNECT, acknowledgements, errors), behind everything sent before.
    pub fn send_as_is(&self, frames: &[Frame]) -> Backlog {
        let mut state = self.lock();
        if state.shut {
            return Backlog::default();
        }
        self.deliver(&mut state, frames)
    }

    fn deliver(&self, state: &mut State, frames: &[Frame]) -> Backlog {
        let State { way, out, .. } = state;
        let (stream, doorbell) = match way {
            Way::Socket { stream, doorbell } => (stream, doorbell),
            Way::Queue(queue) => {
                return queue
                    .upgrade()
                    .map_or_else(Backlog::default, |q| q.push(frames));
            }
        };
        let before = out.pending();
        let mut rest = frames;
        if before == 0 {
            rest = self.write_now(stream, out, frames);
        }
        for frame in rest {
            append_frame(&mut out.waiting, frame);
        }
        out.frames += rest.len();
        let backlog = self.account(out, before);
        if backlog.bytes > 0 {
            doorbell.ring(WAITING);
        }
        backlog
    }

    /// Asks the session to close the connection, after what is waiting.
    pub fn close(&self, code: u16, reason: &'static str) {
        let mut state = self.lock();
        match &state.way {
            Way::Socket { doorbell, .. } => {
                let doorbell = doorbell.clone();
                state.close.get_or_insert((code, reason));
                doorbell.ring(WAITING);
            }
            Way::Queue(queue) => {
                if let Some(queue) = queue.upgrade() {
                    queue.close(reason);
                }
            }
        }
    }

    /// The client moved from a polling queue to the WebSocket that `from` writes to (a
    /// socket.io upgrade): this outlet writes there from now on, first what `from` still holds,
    /// then `leftovers` (taken while no frame can slip in between: what the queue still held for
    /// the old way). `from` is shut.
    pub fn take_over(&self, from: &Outlet, leftovers: impl FnOnce() -> Vec<Frame>) {
        let mut mine = self.lock();
        let mut theirs = from.lock();
        theirs.shut = true;
        let (before_mine, before_theirs) = (mine.out.pending(), theirs.out.pending());
        mine.way = theirs.way.clone();
        let moved = &theirs.out.waiting[theirs.out.sent..];
        mine.out.waiting.extend_from_slice(moved);
        mine.out.frames += theirs.out.frames;
        theirs.out = Pending::default();
        let leftovers = leftovers();
        for frame in &leftovers {
            append_frame(&mut mine.out.waiting, frame);
        }
        mine.out.frames += leftovers.len();
        from.account(&theirs.out, before_theirs);
        self.account(&mine.out, before_mine);
        if let Way::Socket { doorbell, .. } = &mine.way {
            doorbell.ring(WAITING);
        }
    }

    /// Writes what the socket takes without blocking; a partly written frame's rest goes to
    /// `waiting` (empty on entry). Returns the frames not started.
    fn write_now<'f>(
        &self,
        stream: &TcpStream,
        out: &mut Pending,
        frames: &'f [Frame],
    ) -> &'f [Frame] {
        let mut done = 0;
        while done < frames.len() {
            let chunk = &frames[done..frames.len().min(done + FRAMES_PER_WRITE)];
            let mut headers = [[0u8; MAX_HEADER_BYTES]; FRAMES_PER_WRITE];
            let mut header_lens = [0; FRAMES_PER_WRITE];
            for (i, frame) in chunk.iter().enumerate() {
                header_lens[i] = text_header(&mut headers[i], frame.len());
            }
            let mut slices = [IoSlice::new(&[]); 2 * FRAMES_PER_WRITE];
            for (i, frame) in chunk.iter().enumerate() {
                slices[2 * i] = IoSlice::new(&headers[i][..header_lens[i]]);
                slices[2 * i + 1] = IoSlice::new(frame.as_bytes());
            }
            let slices = &slices[..2 * chunk.len()];
            let Ok(mut written) = self.send_without_blocking(stream, slices) else {
                return &[]; // the connection is broken: the session learns it from its read
            };
            for pair in slices.chunks(2) {
                let (header, payload) = (&pair[0][..], &pair[1][..]);
                if written >= header.len() + payload.len() {
                    written -= header.len() + payload.len();
                    done += 1;
                    continue;
                }
                // Partly written (or not at all): its rest waits, before the others.
                let from_payload = written.saturating_sub(header.len());
                out.waiting
                    .extend_from_slice(&header[written.min(header.len())..]);
                out.waiting.extend_from_slice(&payload[from_payload..]);
                out.frames += 1;
                return &frames[done + 1..];
            }
        }
        &[]
    }

    // ----- the session's side -----

    /// Queues bytes the session framed itself (pongs, pings, errors, close) behind the
    /// dispatcher's frames; [`Outlet::drain`] writes them. They count against the same bounds:
    /// a client that sends pings and reads nothing grows its own backlog until it is too slow.
    pub fn append_own(&self, bytes: &[u8]) -> Backlog {
        let mut state = self.lock();
        let before = state.out.pending();
        state.out.waiting.extend_from_slice(bytes);
        state.out.frames += 1;
        self.account(&state.out, before)
    }

    /// Writes what the socket takes now, without blocking.
    pub fn drain(&self) -> io::Result<Drained> {
        let mut state = self.lock();
        let State {
            way, out, close, ..
        } = &mut *state;
        let mut drained = Drained {
            close: *close,
            ..Drained::default()
        };
        let Way::Socket { stream, .. } = way else {
            return Ok(drained); // a queue is drained by its polls
        };
        let before = out.pending();
        if before > 0 {
            let written =
                self.send_without_blocking(stream, &[IoSlice::new(&out.waiting[out.sent..])])?;
            out.sent += written;
            drained.progressed = written > 0;
        }
        if out.pending() == 0 {
            out.sent = 0;
            out.frames = 0;
            out.waiting.clear();
            if out.waiting.capacity() > KEEP_BUFFER_BYTES {
                out.waiting = Vec::new();
            }
        }
        drained.pending = out.pending() > 0;
        self.account(out, before);
        Ok(drained)
    }

    /// The session is ending: frames from the dispatcher are dropped from now on.
    pub fn shut(&self) {
        self.lock().shut = true;
    }

    /// For the session's end: writes everything still waiting, blocking, as long as each write
    /// makes progress within `timeout`. Frames from the dispatcher are dropped from now on.
    pub fn finish(&self, timeout: Duration) -> io::Result<()> {
        let (bytes, sent, way) = {
            let mut state = self.lock();
            state.shut = true;
            let before = state.out.pending();
            let taken = std::mem::take(&mut state.out);
            self.account(&state.out, before);
            (taken.waiting, taken.sent, state.way.clone())
        };
        let Way::Socket { stream, .. } = way else {
            return Ok(());
        };
        stream.set_write_timeout(Some(timeout))?;
        (&*stream).write_all(&bytes[sent..])?;
        Metrics::add(&self.metrics.bytes_out, (bytes.len() - sent) as u64);
        Ok(())
    }

    /// `sendmsg` with `MSG_DONTWAIT` (socket2's safe wrapper): writes what the socket takes now
    /// (0 when it is full); the socket itself stays blocking for [`Outlet::finish`].
    fn send_without_blocking(
        &self,
        stream: &TcpStream,
        slices: &[IoSlice<'_>],
    ) -> io::Result<usize> {
        let socket = socket2::SockRef::from(stream);
        loop {
            match socket.send_vectored_with_flags(slices, SEND_FLAGS) {
                Ok(n) => {
                    Metrics::add(&self.metrics.bytes_out, n as u64);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                Err(e) => return Err(e),
            }
        }
    }
}

/// One batch's frames in socket.io's form, each turned once for all the batch's socket.io
/// clients: a broadcast is one frame shared by every recipient (the same bytes), so its form is
/// found by the bytes' address. Cleared after each batch, while the frames are still alive (an
/// address is never reused within one).
#[derive(Default)]
pub struct SocketIoForms {
    turned: HashMap<(usize, usize, bool), Option<Frame>>,
}

impl SocketIoForms {
    fn get(&mut self, frame: &Frame, full: bool) -> Option<Frame> {
        let key = (frame.as_str().as_ptr() as usize, frame.len(), full);
        let turned = self.turned.entry(key);
        turned
            .or_insert_with(|| socketio::from_server_frame(frame, full))
            .clone()
    }

    /// Forgets the batch (keeping the table's memory for the next, unless it grew large).
    pub fn clear(&mut self) {
        if self.turned.capacity() > KEEP_FORMS {
            self.turned = HashMap::new();
        } else {
            self.turned.clear();
        }
    }
}

impl Bounds {
    /// Whether a client with `frames` and `bytes` waiting is too slow, when `total` bytes wait
    /// for all clients together: past its own bound, or past the total budget holding more than
    /// a fair share of it.
    pub fn exceeded(&self, total: u64, frames: usize, bytes: usize) -> bool {
        let over_total = total as usize > self.total_bytes && bytes >= FAIR_SHARE_BYTES;
        over_total || frames > self.frames || bytes > self.bytes
    }
}

/// Moves the all-clients gauge [`Metrics::backlog_bytes`] from `before` to `after` bytes for one
/// client; returns the new total.
pub fn move_gauge(metrics: &Metrics, before: usize, after: usize) -> u64 {
    if after >= before {
        let up = (after - before) as u64;
        metrics.backlog_bytes.fetch_add(up, Relaxed) + up
    } else {
        let down = (before - after) as u64;
        metrics.backlog_bytes.fetch_sub(down, Relaxed) - down
    }
}

impl Drop for Outlet {
    /// What never went out leaves the all-clients gauge with the outlet.
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let pending = state.out.pending() as u64;
        self.metrics.backlog_bytes.fetch_sub(pending, Relaxed);
    }
}

/// Writes a text frame's header for a payload of `len` bytes; returns the header's length.
fn text_header(out: &mut [u8; MAX_HEADER_BYTES], len: usize) -> usize {
    let header = FrameHeader {
        opcode: OpCode::Data(Data::Text),
        ..FrameHeader::default()
    };
    let mut cursor = &mut out[..];
    // Cannot fail: an unmasked header is at most MAX_HEADER_BYTES long.
    let _ = header.format(len as u64, &mut cursor);
    header.len(len as u64)
}

fn append_frame(out: &mut Vec<u8>, frame: &Frame) {
    let mut header = [0u8; MAX_HEADER_BYTES];
    let header_len = text_header(&mut header, frame.len());
    out.extend_from_slice(&header[..header_len]);
    out.extend_from_slice(frame.as_bytes());
}

/// For unit tests of whatever hands frames to outlets (delivery, the dispatcher): an outlet whose
/// way is a [`Recorder`], which keeps every frame it is given instead of writing to a socket.
#[cfg(test)]
pub mod testing {
    use super::*;

    /// A queue that records frames; `slow` makes every push report the client too slow.
    #[derive(Default)]
    pub struct Recorder {
        pub frames: Mutex<Vec<Frame>>,
        pub slow: Mutex<bool>,
        /// How long each push takes: whoever hands this client frames falls behind.
        pub pause: Mutex<Duration>,
        /// The reason of the close the outlet was asked for, if any.
        pub closed: Mutex<Option<&'static str>>,
    }

    impl Queue for Recorder {
        fn push(&self, frames: &[Frame]) -> Backlog {
            std::thread::sleep(*self.pause.lock().unwrap());
            self.frames.lock().unwrap().extend_from_slice(frames);
            let too_slow = *self.slow.lock().unwrap();
            Backlog {
                too_slow,
                ..Backlog::default()
            }
        }
        fn close(&self, reason: &'static str) {
            *self.closed.lock().unwrap() = Some(reason);
        }
    }

    impl Recorder {
        /// The frames recorded since the last call.
        pub fn take(&self) -> Vec<Frame> {
            std::mem::take(&mut *self.frames.lock().unwrap())
        }
    }

    /// An outlet in wschat's own form that records into the returned [`Recorder`] (which must
    /// live as long as the outlet is used: the outlet holds it weakly).
    pub fn recording(metrics: &Arc<Metrics>, bounds: Bounds) -> (Arc<Outlet>, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        let weak: Weak<dyn Queue> = Arc::downgrade(&recorder) as Weak<Recorder>;
        let outlet = Outlet::queued(weak, metrics.clone(), bounds);
        outlet.set_form(Form::Raw);
        (Arc::new(outlet), recorder)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Recorder;
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    const BOUNDS: Bounds = Bounds {
        frames: 100,
        bytes: 1 << 20,
        total_bytes: 1 << 20,
    };

    fn chat_frame(text: &str) -> Frame {
        format!(r#"{{"type":"message","id":1,"room":"lobby","from":"ada","text":"{text}"}}"#).into()
    }

    /// A connected pair: the server's end and the client's.
    fn socket_pair() -> (Arc<TcpStream>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let server = listener.accept().unwrap().0;
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (Arc::new(server), client)
    }

    /// An outlet to the server's end of a pair, as a session makes it.
    fn socket_outlet(server: Arc<TcpStream>, metrics: &Arc<Metrics>, bounds: Bounds) -> Outlet {
        let doorbell = Doorbell::for_current_thread();
        Outlet::new(server, doorbell, metrics.clone(), bounds)
    }

    /// Reads one unmasked text frame of under 126 bytes.
    fn read_text(client: &mut TcpStream) -> String {
        let mut header = [0u8; 2];
        client.read_exact(&mut header).unwrap();
        assert_eq!(header[0], 0x81, "a final text frame");
        let mut payload = vec![0u8; usize::from(header[1])];
        client.read_exact(&mut payload).unwrap();
        String::from_utf8(payload).unwrap()
    }

    #[test]
    fn a_socketio_outlet_queues_events_turned_once_per_batch() {
        let queue = Arc::new(Recorder::default());
        let weak: Weak<dyn Queue> = Arc::downgrade(&queue) as Weak<Recorder>;
        let outlet = Outlet::queued(weak, Arc::new(Metrics::default()), BOUNDS);
        let mut forms = SocketIoForms::default();
        let frame = chat_frame("hi");
        outlet.send(std::slice::from_ref(&frame), &mut forms);
        assert_eq!(
            *queue.frames.lock().unwrap(),
            [r#"42["chat message","hi"]"#]
        );
        // The same bytes again in the batch: the same turned frame, not a new one.
        let first = forms.get(&frame, false).unwrap();
        let again = forms.get(&frame.clone(), false).unwrap();
        assert_eq!(first.as_str().as_ptr(), again.as_str().as_ptr());
        forms.clear();
        assert!(forms.turned.is_empty());
    }

    #[test]
    fn an_upgrade_moves_the_client_to_the_socket_in_order() {
        let (server, mut client) = socket_pair();
        let metrics = Arc::new(Metrics::default());
        let socket = socket_outlet(server, &metrics, BOUNDS);
        let queue = Arc::new(Recorder::default());
        let weak: Weak<dyn Queue> = Arc::downgrade(&queue) as Weak<Recorder>;
        let polling = Outlet::queued(weak, metrics, BOUNDS);
        socket.send_as_is(&["3probe".into()]);
        polling.take_over(&socket, || vec!["4left in the queue".into()]);
        let mut forms = SocketIoForms::default();
        polling.send(&[chat_frame("after")], &mut forms);
        polling.drain().unwrap(); // as the session does once it took the outlet over
        assert_eq!(read_text(&mut client), "3probe");
        assert_eq!(read_text(&mut client), "4left in the queue");
        assert_eq!(read_text(&mut client), r#"42["chat message","after"]"#);
        assert!(
            queue.frames.lock().unwrap().is_empty(),
            "nothing went to the queue"
        );
        // The old outlet is shut: nothing more leaves through it.
        assert_eq!(socket.send_as_is(&["4late".into()]), Backlog::default());
    }

    /// Kernel buffer asked for on each side of a narrow pair: the kernel's minimum, about
    /// 4 KiB, so a few dozen KiB fill the connection.
    const TINY_BUFFER: usize = 1;
    /// Bounds a narrow pair's tests never reach.
    const ROOMY: Bounds = Bounds {
        frames: 1 << 20,
        bytes: 1 << 30,
        total_bytes: 1 << 30,
    };

    /// A connected pair that holds little in flight: the server's end has the smallest send
    /// buffer. (The client's receive buffer keeps its size: a tiny window makes TCP wait for
    /// delayed acknowledgements, and the test crawl.)
    fn narrow_pair() -> (Arc<TcpStream>, TcpStream) {
        let (server, client) = socket_pair();
        let server_end = socket2::SockRef::from(&*server);
        server_end.set_send_buffer_size(TINY_BUFFER).unwrap();
        (server, client)
    }

    /// Frame `n`: its number, then filler. Frame 0 is far more than a socket holds, so it is
    /// always written in part; the others' lengths vary, so frames end at every offset of the
    /// socket's buffer, and every 100th is over 64 KiB (the 8-byte length form).
    fn numbered(n: usize) -> Frame {
        let len = match n {
            0 => 1 << 20,
            n if n % 100 == 50 => 70_000,
            n => 100 + n % 7 * 300,
        };
        format!("{n:06}{}", "x".repeat(len)).into()
    }

    /// Reads one unmasked text frame, whatever its length form.
    fn read_frame(client: &mut TcpStream) -> String {
        let mut header = [0u8; 2];
        client.read_exact(&mut header).unwrap();
        assert_eq!(header[0], 0x81, "a final text frame");
        let len = match header[1] {
            126 => {
                let mut len = [0u8; 2];
                client.read_exact(&mut len).unwrap();
                u64::from(u16::from_be_bytes(len))
            }
            127 => {
                let mut len = [0u8; 8];
                client.read_exact(&mut len).unwrap();
                u64::from_be_bytes(len)
            }
            short => u64::from(short),
        };
        let mut payload = vec![0u8; len as usize];
        client.read_exact(&mut payload).unwrap();
        String::from_utf8(payload).unwrap_or_else(|_| panic!("a frame cut or spliced"))
    }

    #[test]
    fn what_the_socket_does_not_take_waits_and_leaves_whole_and_in_order() {
        const FRAMES: usize = 300;
        let (server, mut client) = narrow_pair();
        let metrics = Arc::new(Metrics::default());
        let outlet = socket_outlet(server, &metrics, ROOMY);
        let frames: Vec<Frame> = (0..FRAMES).map(numbered).collect();
        let mut forms = SocketIoForms::default();
        let backlog = outlet.send(&frames[..1], &mut forms);
        assert!(backlog.bytes > 0, "the socket took 1 MiB at once");
        assert!(
            backlog.bytes < frames[0].len(),
            "the socket took none of it"
        );
        let (first, second) = frames[1..].split_at(FRAMES / 2);
        for batch in first.chunks(10) {
            outlet.send(batch, &mut forms);
        }
        let backlog = outlet.send(&[], &mut forms);
        assert_eq!(metrics.backlog_bytes.load(Relaxed), backlog.bytes as u64);

        // A reader that takes its time.
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            for n in 0..FRAMES {
                got.push(read_frame(&mut client));
                if n % 10 == 0 {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            got
        });
        // The session's part, while more batches come behind the backlog.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut batches = second.chunks(10);
        loop {
            if let Some(batch) = batches.next() {
                outlet.send(batch, &mut forms);
            }
            let drained = outlet.drain().unwrap();
            if !drained.pending && batches.len() == 0 {
                break;
            }
            let pending = outlet.lock().out.pending();
            let late = std::time::Instant::now() > deadline;
            assert!(!late, "{pending} bytes never drained");
            std::thread::sleep(Duration::from_micros(200));
        }
        let got = reader.join().unwrap();
        let sent: Vec<&str> = frames.iter().map(Frame::as_str).collect();
        assert!(got == sent, "frames arrived changed or out of order");
        assert_eq!(metrics.backlog_bytes.load(Relaxed), 0);
    }

    #[test]
    fn a_reader_that_never_reads_trips_the_frame_and_byte_bounds() {
        let metrics = Arc::new(Metrics::default());
        let mut forms = SocketIoForms::default();
        let mut first_too_slow = |bounds: Bounds, frame: Frame| {
            let (server, _client) = narrow_pair();
            let outlet = socket_outlet(server, &metrics, bounds);
            (0..100_000)
                .map(|_| outlet.send(std::slice::from_ref(&frame), &mut forms))
                .find(|backlog| backlog.too_slow)
                .expect("never too slow")
        };
        let frames = Bounds {
            frames: 20,
            ..ROOMY
        };
        let backlog = first_too_slow(frames, "tiny".into());
        assert_eq!(backlog.frames, 21, "one frame past the bound: {backlog:?}");
        let bytes = Bounds {
            bytes: 64 << 10,
            ..ROOMY
        };
        let backlog = first_too_slow(bytes, numbered(1));
        assert!(
            backlog.bytes > 64 << 10 && backlog.bytes < 66 << 10,
            "{backlog:?}"
        );
    }

    #[test]
    fn past_the_total_budget_only_a_client_holding_a_fair_share_is_too_slow() {
        let bounds = Bounds {
            frames: 1000,
            bytes: 1 << 20,
            total_bytes: 256 << 10,
        };
        let total = 300 << 10;
        assert!(bounds.exceeded(total, 10, FAIR_SHARE_BYTES));
        assert!(!bounds.exceeded(total, 10, FAIR_SHARE_BYTES - 1));
        assert!(!bounds.exceeded(bounds.total_bytes as u64, 10, 200 << 10));
        assert!(bounds.exceeded(0, 1001, 0) && bounds.exceeded(0, 0, (1 << 20) + 1));
    }
}
