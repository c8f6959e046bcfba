//! A client's outlet: the way out to one client's socket, shared by the dispatcher (which hands
//! it frames), the client's session thread (its own frames: pongs, errors, replies, the close)
//! and the reactor (which writes what could not go out at once).
//!
//! The common case needs no thread switch at all: when nothing is waiting, the dispatcher writes
//! a batch's frames for this client straight to the socket, without blocking, in one `sendmsg`,
//! and the session writes its own frames the same way. Whatever the socket does not take at once
//! waits here, and the outlet asks the [`reactor`](crate::reactor) to write more each time the
//! socket has room; a backlog that the socket takes nothing of for [`WRITE_TIMEOUT`] means the
//! client is not reading, and its session is asked to close. Nobody ever blocks on a write before
//! the session's final close, so a client that sends without reading cannot wedge its session:
//! its backlog grows until the dispatcher drops it as too slow. One lock keeps frames whole and
//! in order; it is held for a copy or a non-blocking write, never for a wait.
//!
//! A close request (the dispatcher's, or the reactor's for a client not reading) interrupts the
//! session wherever it waits: its socket's read side is shut, so a blocked `recv` returns, and
//! its thread is unparked, in case it is pausing its reads.
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
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::metrics::Metrics;
use crate::protocol::Frame;
use crate::reactor::{Backlogged, Watch};
use crate::socketio;
use crate::wire::TlsSession;

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

/// What TLS adds to a record: its header, the tag, and TLS 1.3's content type (enough for one).
const TLS_RECORD_OVERHEAD_BYTES: usize = 32;
/// Frames per `sendmsg`: headers and payloads make two slices each, well under `IOV_MAX` (1024).
/// With TLS, frames per call to encrypt them (the same slices).
const FRAMES_PER_WRITE: usize = 64;
/// A header for a payload of any length: 2 bytes, plus 8 for the length (no mask).
const MAX_HEADER_BYTES: usize = 10;
/// Buffer capacity kept once the backlog is written; a bigger burst's buffer is released.
const KEEP_BUFFER_BYTES: usize = 16 * 1024;
/// Entries of the socket.io forms table kept between batches; a bigger batch's is released.
const KEEP_FORMS: usize = 1024;

/// A backlog the socket takes nothing of for this long means the peer is gone or not reading.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The close asked of a client whose backlog made no progress for [`WRITE_TIMEOUT`].
const NOT_READING: CloseRequest = (1008, "not reading");

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

/// What waits for the client, after a [`Outlet::send`].
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Backlog {
    pub frames: usize,
    pub bytes: usize,
    /// Past the client's bound, or past the total budget with more than a fair share.
    pub too_slow: bool,
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
    /// A WebSocket, written here.
    Socket(Wire),
    /// A polling session's queue (weak: the session owns its outlet, not the other way round).
    Queue(Weak<dyn Queue>),
}

/// A WebSocket's end of the outlet: its socket, the reactor's watch on it (for a backlog), and
/// the session thread that reads it (to interrupt, for a close).
#[derive(Clone)]
struct Wire {
    stream: Arc<TcpStream>,
    /// A TLS client's session: frames are encrypted on their way into the backlog.
    tls: Option<TlsSession>,
    watch: Arc<Watch>,
    session: Thread,
}

impl Wire {
    /// Ends the session's wait: its blocked `recv` returns (the read side is shut: what the
    /// client already sent can still be read, then reads return 0), and a session pausing its
    /// reads wakes.
    fn interrupt(&self) {
        let _ = self.stream.shutdown(Shutdown::Read);
        self.session.unpark();
    }
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
    /// Since when bytes have waited without the socket taking any.
    stalled_since: Option<Instant>,
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

    /// `n` more bytes went out; once all did, the buffer starts over (and is released if a
    /// burst made it large).
    fn advance(&mut self, n: usize) {
        self.sent += n;
        if self.pending() == 0 {
            self.sent = 0;
            self.frames = 0;
            self.waiting.clear();
            if self.waiting.capacity() > KEEP_BUFFER_BYTES {
                self.waiting = Vec::new();
            }
        }
    }
}

impl Outlet {
    /// An outlet to a WebSocket, `watch`ed by the reactor; made on the session's thread, which
    /// a close request interrupts. With TLS, every frame is encrypted on its way into the
    /// backlog: what waits, and counts against the bounds, is what the socket will carry.
    pub fn new(
        (stream, tls): (Arc<TcpStream>, Option<TlsSession>),
        watch: Watch,
        metrics: Arc<Metrics>,
        bounds: Bounds,
    ) -> Outlet {
        let wire = Wire {
            stream,
            tls,
            watch: Arc::new(watch),
            session: thread::current(),
        };
        Outlet::with_way(Way::Socket(wire), metrics, bounds)
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
            stalled_since: None,
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

    /// After bytes were added to a backlog that held `before`: if they are the first to wait,
    /// the reactor is asked to write them once the socket has room. If it cannot watch the
    /// socket, nothing would ever write them: the session is asked to close.
    fn wait_for_room(self: &Arc<Self>, state: &mut State, before: usize) {
        if before > 0 || state.out.pending() == 0 {
            return; // nothing waits, or the reactor already watches
        }
        state.stalled_since = Some(Instant::now());
        self.watch_again(state);
    }

    /// Asks the reactor for one more [`Backlogged::write_some`].
    fn watch_again(self: &Arc<Self>, state: &mut State) {
        let Way::Socket(wire) = &state.way else {
            return;
        };
        let me: Weak<dyn Backlogged> = Arc::downgrade(self) as Weak<Outlet>;
        if let Err(e) = wire.watch.when_writable(me) {
            log::warn!("cannot watch a client's socket for room: {e}");
            request_close(state, (1011, "internal error"));
        }
    }

    // ----- the dispatcher's side -----

    /// Sends `frames` (wschat's frames, turned into the client's form, through `forms`) in
    /// order: at once if the socket takes them, else they wait for room. Never blocks.
    /// Returns what is waiting now.
    pub fn send(self: &Arc<Self>, frames: &[Frame], forms: &mut SocketIoForms) -> Backlog {
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
    pub fn send_as_is(self: &Arc<Self>, frames: &[Frame]) -> Backlog {
        let mut state = self.lock();
        if state.shut {
            return Backlog::default();
        }
        self.deliver(&mut state, frames)
    }

    fn deliver(self: &Arc<Self>, state: &mut State, frames: &[Frame]) -> Backlog {
        let before = state.out.pending();
        let State { way, out, .. } = &mut *state;
        let wire = match way {
            Way::Socket(wire) => wire,
            Way::Queue(queue) => {
                return queue
                    .upgrade()
                    .map_or_else(Backlog::default, |q| q.push(frames));
            }
        };
        if let Some(tls) = &wire.tls {
            self.seal_and_write(tls, &wire.stream, out, frames);
        } else {
            let mut rest = frames;
            if before == 0 {
                rest = self.write_now(&wire.stream, out, frames);
            }
            append_frames(None, &mut out.waiting, rest);
            out.frames += rest.len();
        }
        let mut backlog = self.account(out, before);
        // A client already asked to close (it took nothing for too long) is not dropped twice.
        backlog.too_slow &= state.close.is_none();
        self.wait_for_room(state, before);
        backlog
    }

    /// Asks the session to close the connection, after what is waiting: interrupts its read.
    /// The first request wins.
    pub fn close(&self, code: u16, reason: &'static str) {
        let mut state = self.lock();
        match &state.way {
            Way::Socket(_) => request_close(&mut state, (code, reason)),
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
    pub fn take_over(self: &Arc<Self>, from: &Outlet, leftovers: impl FnOnce() -> Vec<Frame>) {
        let mut mine = self.lock();
        let mut theirs = from.lock();
        theirs.shut = true;
        let (before_mine, before_theirs) = (mine.out.pending(), theirs.out.pending());
        mine.way = theirs.way.clone();
        let moved = &theirs.out.waiting[theirs.out.sent..];
        mine.out.waiting.extend_from_slice(moved);
        mine.out.frames += theirs.out.frames;
        theirs.out = Pending::default();
        theirs.stalled_since = None;
        let leftovers = leftovers();
        let tls = match &mine.way {
            Way::Socket(wire) => wire.tls.clone(),
            Way::Queue(_) => None,
        };
        append_frames(tls.as_ref(), &mut mine.out.waiting, &leftovers);
        mine.out.frames += leftovers.len();
        from.account(&theirs.out, before_theirs);
        self.account(&mine.out, before_mine);
        // What waits goes out now if the socket takes it, or when it has room.
        let left = self.write_waiting(&mut mine);
        if left > 0 {
            mine.stalled_since.get_or_insert_with(Instant::now);
            self.watch_again(&mut mine);
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
            let partly = with_framed(chunk, |slices| {
                let Ok(mut written) = self.send_without_blocking(stream, slices) else {
                    return Err(()); // the connection is broken: the session learns it from its read
                };
                for pair in slices.chunks(2) {
                    let (header, payload) = (&pair[0][..], &pair[1][..]);
                    if written < header.len() + payload.len() {
                        // Partly written (or not at all): its rest waits, before the others.
                        let from_payload = written.saturating_sub(header.len());
                        out.waiting
                            .extend_from_slice(&header[written.min(header.len())..]);
                        out.waiting.extend_from_slice(&payload[from_payload..]);
                        out.frames += 1;
                        return Ok(true);
                    }
                    written -= header.len() + payload.len();
                    done += 1;
                }
                Ok(false)
            });
            match partly {
                Err(()) => return &[],
                Ok(true) => return &frames[done + 1..],
                Ok(false) => {}
            }
        }
        &[]
    }

    /// Writes what the socket takes of the backlog now, without blocking; returns the bytes
    /// still waiting. A broken connection's backlog is dropped: the session learns of the break
    /// from its read.
    fn write_waiting(&self, state: &mut State) -> usize {
        let before = state.out.pending();
        let Way::Socket(wire) = &state.way else {
            return before; // a queue is drained by its polls
        };
        if before == 0 {
            return 0;
        }
        let out = &mut state.out;
        let slice = [IoSlice::new(&out.waiting[out.sent..])];
        match self.send_without_blocking(&wire.stream, &slice) {
            Ok(0) => {}
            Ok(written) => {
                out.advance(written);
                state.stalled_since = Some(Instant::now());
            }
            Err(_) => *out = Pending::default(),
        }
        self.account(&state.out, before);
        if state.out.pending() == 0 {
            state.stalled_since = None;
        }
        state.out.pending()
    }

    // ----- the session's side -----

    /// Sends bytes the session framed itself (pongs, pings, errors, replies, the close) behind
    /// the dispatcher's frames: at once if nothing waits and the socket takes them, else they
    /// wait for room. They count against the same bounds: a client that sends pings and reads
    /// nothing grows its own backlog until it is too slow.
    pub fn append_own(self: &Arc<Self>, bytes: &[u8]) -> Backlog {
        let mut state = self.lock();
        let before = state.out.pending();
        let sealed;
        let bytes = match &state.way {
            Way::Socket(Wire { tls: Some(tls), .. }) => {
                sealed = seal_own(tls, bytes);
                &sealed[..]
            }
            _ => bytes,
        };
        let mut rest = bytes;
        if let (0, Way::Socket(wire)) = (before, &state.way) {
            // A broken connection takes nothing more: the session learns it from its read.
            let written = self.send_without_blocking(&wire.stream, &[IoSlice::new(bytes)]);
            rest = &bytes[written.unwrap_or(bytes.len())..];
        }
        if !rest.is_empty() {
            state.out.waiting.extend_from_slice(rest);
            state.out.frames += 1;
        }
        let backlog = self.account(&state.out, before);
        self.wait_for_room(&mut state, before);
        backlog
    }

    /// A TLS client's frames: encrypted into the backlog, which is then written as far as the
    /// socket takes it without blocking (if nothing waited before: else the reactor is on it).
    fn seal_and_write(
        &self,
        tls: &TlsSession,
        stream: &TcpStream,
        out: &mut Pending,
        frames: &[Frame],
    ) {
        let before = out.pending();
        append_frames(Some(tls), &mut out.waiting, frames);
        out.frames += frames.len();
        if before == 0 && out.pending() > 0 {
            let waiting = [IoSlice::new(&out.waiting[out.sent..])];
            // A broken connection: the session learns it from its read.
            let written = self.send_without_blocking(stream, &waiting).unwrap_or(0);
            out.advance(written);
        }
    }

    /// The close asked of the session, if any (the dispatcher's, or the reactor's for a client
    /// not reading).
    pub fn close_request(&self) -> Option<CloseRequest> {
        self.lock().close
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
            state.stalled_since = None;
            let before = state.out.pending();
            let taken = std::mem::take(&mut state.out);
            self.account(&state.out, before);
            (taken.waiting, taken.sent, state.way.clone())
        };
        let Way::Socket(wire) = way else {
            return Ok(());
        };
        if sent == bytes.len() {
            return Ok(()); // all written already: no timeout to set (a system call)
        }
        wire.stream.set_write_timeout(Some(timeout))?;
        (&*wire.stream).write_all(&bytes[sent..])?;
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

// ----- the reactor's side -----

impl Backlogged for Outlet {
    fn write_some(self: Arc<Self>) {
        let mut state = self.lock();
        if self.write_waiting(&mut state) > 0 {
            self.watch_again(&mut state);
        }
    }

    fn check_progress(&self, now: Instant) {
        let mut state = self.lock();
        let stalled = state
            .stalled_since
            .is_some_and(|since| now.saturating_duration_since(since) >= WRITE_TIMEOUT);
        if stalled && state.close.is_none() {
            // A client that takes nothing is as slow as one whose queue overflowed.
            Metrics::add(&self.metrics.slow_clients_dropped, 1);
            request_close(&mut state, NOT_READING);
        }
    }
}

/// Records a close for the session (the first request wins) and interrupts it.
fn request_close(state: &mut State, request: CloseRequest) {
    if state.close.is_some() {
        return;
    }
    state.close = Some(request);
    if let Way::Socket(wire) = &state.way {
        wire.interrupt();
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

/// Appends `frames` to `out` as WebSocket text frames: as they are, or encrypted by `tls`
/// (several frames to a TLS record, not a record for each header and each payload).
fn append_frames(tls: Option<&TlsSession>, out: &mut Vec<u8>, frames: &[Frame]) {
    let Some(tls) = tls else {
        frames.iter().for_each(|frame| append_frame(out, frame));
        return;
    };
    for chunk in frames.chunks(FRAMES_PER_WRITE) {
        if let Err(e) = with_framed(chunk, |slices| tls.seal(slices, out)) {
            // rustls refuses only once the connection failed; its session sees that too.
            return log::debug!("a TLS client's frames were dropped: {e}");
        }
    }
}

/// Calls `f` with `chunk` (at most [`FRAMES_PER_WRITE`] frames) as WebSocket text frames: for
/// each frame its header, then its bytes, as slices for one vectored write; nothing is copied.
fn with_framed<R>(chunk: &[Frame], f: impl FnOnce(&[IoSlice<'_>]) -> R) -> R {
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
    f(&slices[..2 * chunk.len()])
}

/// The session's own bytes (already framed), encrypted.
fn seal_own(tls: &TlsSession, bytes: &[u8]) -> Vec<u8> {
    let mut sealed = Vec::with_capacity(bytes.len() + TLS_RECORD_OVERHEAD_BYTES);
    if let Err(e) = tls.seal(&[IoSlice::new(bytes)], &mut sealed) {
        log::debug!("a TLS client's own frames were dropped: {e}"); // as in append_frames
    }
    sealed
}

/// For unit tests of whatever hands frames to outlets (delivery, the dispatcher): an outlet whose
/// way is a [`Recorder`], which keeps every frame it is given instead of writing to a socket.
#[cfg(test)]
pub mod testing {
    use super::*;

    /// Bounds no test reaches: a client is too slow only when a test makes it so.
    pub const ROOMY: Bounds = Bounds {
        frames: 1 << 20,
        bytes: 1 << 30,
        total_bytes: 1 << 30,
    };

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
    use super::testing::{ROOMY, Recorder};
    use super::*;
    use crate::reactor::Reactor;
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
        let outlet = Arc::new(Outlet::queued(weak, Arc::new(Metrics::default()), BOUNDS));
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

    /// An outlet to the server's end of a pair, watched by `reactor`, made on this thread (as a
    /// session makes its own).
    fn socket_outlet(
        reactor: &Arc<Reactor>,
        server: Arc<TcpStream>,
        metrics: &Arc<Metrics>,
        bounds: Bounds,
    ) -> Arc<Outlet> {
        let watch = reactor.watch(1, server.clone());
        Arc::new(Outlet::new((server, None), watch, metrics.clone(), bounds))
    }

    /// [`socket_outlet`] with its own metrics and the usual bounds.
    fn plain_outlet(reactor: &Arc<Reactor>, server: Arc<TcpStream>) -> Arc<Outlet> {
        socket_outlet(reactor, server, &Arc::new(Metrics::default()), BOUNDS)
    }

    #[test]
    fn an_upgrade_moves_the_client_to_the_socket_in_order() {
        let (server, mut client) = socket_pair();
        let reactor = Reactor::new().unwrap();
        let socket = plain_outlet(&reactor, server);
        let queue = Arc::new(Recorder::default());
        let weak: Weak<dyn Queue> = Arc::downgrade(&queue) as Weak<Recorder>;
        let polling = Arc::new(Outlet::queued(weak, Arc::new(Metrics::default()), BOUNDS));
        socket.send_as_is(&["3probe".into()]);
        polling.take_over(&socket, || vec!["4left in the queue".into()]);
        let mut forms = SocketIoForms::default();
        polling.send(&[chat_frame("after")], &mut forms);
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
        let reactor = Reactor::new().unwrap();
        let outlet = socket_outlet(&reactor, server, &metrics, ROOMY);
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
        // The reactor writes the backlog as the socket makes room, while more batches come
        // behind it.
        let writer = std::thread::spawn({
            let reactor = reactor.clone();
            move || reactor.run()
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut batches = second.chunks(10);
        loop {
            if let Some(batch) = batches.next() {
                outlet.send(batch, &mut forms);
            }
            let pending = outlet.lock().out.pending();
            if pending == 0 && batches.len() == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{pending} bytes never drained");
            std::thread::sleep(Duration::from_micros(200));
        }
        let got = reader.join().unwrap();
        reactor.stop();
        writer.join().unwrap();
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
            let reactor = Reactor::new().unwrap();
            let outlet = socket_outlet(&reactor, server, &metrics, bounds);
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

    #[test]
    fn what_a_full_socket_did_not_take_the_reactor_writes_in_order() {
        let (server, mut client) = socket_pair();
        socket2::SockRef::from(&*server)
            .set_send_buffer_size(64 * 1024)
            .unwrap();
        socket2::SockRef::from(&client)
            .set_recv_buffer_size(64 * 1024)
            .unwrap();
        let reactor = Reactor::new().unwrap();
        let outlet = plain_outlet(&reactor, server);
        let big = "x".repeat(60_000);
        let frames: Vec<Frame> = (0..64).map(|i| format!("{i} {big}").into()).collect();
        let mut forms = SocketIoForms::default();
        let backlog = outlet.send(&frames, &mut forms);
        assert!(backlog.bytes > 0, "the socket took all 4 MB at once");
        assert!(
            !reactor.is_idle(),
            "a partial write asks the reactor to watch"
        );
        assert!(outlet.lock().stalled_since.is_some());
        let thread = std::thread::spawn({
            let reactor = reactor.clone();
            move || reactor.run()
        });
        // The session's own frame goes behind the dispatcher's.
        outlet.append_own(&[0x81, 3, b'o', b'w', b'n']);
        for i in 0..64 {
            let mut header = [0u8; 4];
            client.read_exact(&mut header).unwrap();
            assert_eq!(&header[..2], &[0x81, 126], "frame {i}'s header");
            let mut payload = vec![0u8; usize::from(u16::from_be_bytes([header[2], header[3]]))];
            client.read_exact(&mut payload).unwrap();
            assert!(
                payload.starts_with(format!("{i} x").as_bytes()),
                "frame {i}"
            );
        }
        assert_eq!(read_text(&mut client), "own");
        let deadline = Instant::now() + Duration::from_secs(5);
        while outlet.lock().out.pending() > 0 || !reactor.is_idle() {
            assert!(Instant::now() < deadline, "the backlog never emptied");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(outlet.lock().stalled_since, None);
        reactor.stop();
        thread.join().unwrap();
    }

    #[test]
    fn a_close_request_interrupts_a_blocked_read() {
        let (server, _client) = socket_pair();
        let reactor = Reactor::new().unwrap();
        let (outlet_tx, outlet_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            // The outlet is made on the thread that reads, as a session's is.
            let outlet = plain_outlet(&reactor, server.clone());
            outlet_tx.send(outlet.clone()).unwrap();
            server
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let started = Instant::now();
            let read = (&*server).read(&mut [0u8; 16]).unwrap();
            (read, started.elapsed(), outlet.close_request())
        });
        let outlet = outlet_rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(50)); // the reader is in `recv` by now
        outlet.close(1008, "too slow");
        outlet.close(1001, "server shutting down"); // the first request wins
        let (read, took, request) = reader.join().unwrap();
        assert_eq!(read, 0, "the read returns as at an end of stream");
        assert!(took < Duration::from_secs(30), "interrupted, not timed out");
        assert_eq!(request, Some((1008, "too slow")));
    }

    #[test]
    fn a_backlog_that_takes_nothing_for_the_write_timeout_asks_for_a_close() {
        let (server, _client) = socket_pair();
        let reactor = Reactor::new().unwrap();
        let outlet = plain_outlet(&reactor, server);
        let big: Frame = "y".repeat(60_000).into();
        let mut forms = SocketIoForms::default();
        while outlet.send(std::slice::from_ref(&big), &mut forms).bytes == 0 {}
        let since = outlet.lock().stalled_since.expect("stalled");
        outlet.check_progress(since + WRITE_TIMEOUT / 2);
        assert_eq!(outlet.close_request(), None, "not yet");
        outlet.check_progress(since + WRITE_TIMEOUT);
        assert_eq!(outlet.close_request(), Some(NOT_READING));
        outlet.check_progress(since + WRITE_TIMEOUT * 2);
        let dropped = outlet.metrics.slow_clients_dropped.load(Relaxed);
        assert_eq!(dropped, 1, "counted as a slow client, once");
    }
}
