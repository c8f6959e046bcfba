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
//! frames text messages (RFC 6455, unmasked: server to client) and knows nothing of rooms or
//! JSON.

use std::io::{self, IoSlice, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::doorbell::{Doorbell, WAITING};
use crate::metrics::Metrics;
use crate::protocol::Frame;

/// Frames per `sendmsg`: headers and payloads make two slices each, well under `IOV_MAX` (1024).
const FRAMES_PER_WRITE: usize = 64;
/// A header for a payload of any length: 2 bytes, plus 8 for the length (no mask).
const MAX_HEADER_BYTES: usize = 10;
/// Buffer capacity kept once the backlog is written; a bigger burst's buffer is released.
const KEEP_BUFFER_BYTES: usize = 16 * 1024;

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

pub struct Outlet {
    stream: Arc<TcpStream>,
    doorbell: Arc<Doorbell>,
    metrics: Arc<Metrics>,
    bounds: Bounds,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Whole frames that the socket has not taken yet, from offset `sent` on.
    waiting: Vec<u8>,
    sent: usize,
    /// Frames in `waiting`.
    waiting_frames: usize,
    close: Option<CloseRequest>,
    /// The session is ending: frames from the dispatcher are dropped.
    shut: bool,
}

impl State {
    fn pending(&self) -> usize {
        self.waiting.len() - self.sent
    }
}

impl Outlet {
    pub fn new(
        stream: Arc<TcpStream>,
        doorbell: Arc<Doorbell>,
        metrics: Arc<Metrics>,
        bounds: Bounds,
    ) -> Outlet {
        Outlet {
            stream,
            doorbell,
            metrics,
            bounds,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves the all-clients gauge by what this outlet's backlog changed (from `before` bytes to
    /// what waits now), and says where the backlog stands.
    fn account(&self, state: &State, before: usize) -> Backlog {
        let bytes = state.pending();
        let total = if bytes >= before {
            self.metrics
                .backlog_bytes
                .fetch_add((bytes - before) as u64, Relaxed)
                + (bytes - before) as u64
        } else {
            self.metrics
                .backlog_bytes
                .fetch_sub((before - bytes) as u64, Relaxed)
                - (before - bytes) as u64
        };
        let over_total = total as usize > self.bounds.total_bytes && bytes >= FAIR_SHARE_BYTES;
        Backlog {
            frames: state.waiting_frames,
            bytes,
            too_slow: over_total
                || state.waiting_frames > self.bounds.frames
                || bytes > self.bounds.bytes,
        }
    }

    // ----- the dispatcher's side -----

    /// Sends `frames` in order: at once if the socket takes them, else they wait for the session.
    /// Never blocks. Returns what is waiting now.
    pub fn send(&self, frames: &[Frame]) -> Backlog {
        let mut state = self.lock();
        if state.shut {
            return Backlog::default();
        }
        let before = state.pending();
        let mut rest = frames;
        if before == 0 {
            rest = self.write_now(&mut state, frames);
        }
        for frame in rest {
            append_frame(&mut state.waiting, frame);
        }
        state.waiting_frames += rest.len();
        let backlog = self.account(&state, before);
        drop(state);
        if backlog.bytes > 0 {
            self.doorbell.ring(WAITING);
        }
        backlog
    }

    /// Asks the session to close the connection, after what is waiting.
    pub fn close(&self, code: u16, reason: &'static str) {
        self.lock().close.get_or_insert((code, reason));
        self.doorbell.ring(WAITING);
    }

    /// Writes what the socket takes without blocking; a partly written frame's rest goes to
    /// `waiting` (empty on entry). Returns the frames not started.
    fn write_now<'f>(&self, state: &mut State, frames: &'f [Frame]) -> &'f [Frame] {
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
            let Ok(mut written) = self.send_without_blocking(slices) else {
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
                state
                    .waiting
                    .extend_from_slice(&header[written.min(header.len())..]);
                state.waiting.extend_from_slice(&payload[from_payload..]);
                state.waiting_frames += 1;
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
        let before = state.pending();
        state.waiting.extend_from_slice(bytes);
        state.waiting_frames += 1;
        self.account(&state, before)
    }

    /// Writes what the socket takes now, without blocking.
    pub fn drain(&self) -> io::Result<Drained> {
        let mut state = self.lock();
        let before = state.pending();
        let mut drained = Drained {
            close: state.close,
            ..Drained::default()
        };
        if before > 0 {
            let written =
                self.send_without_blocking(&[IoSlice::new(&state.waiting[state.sent..])])?;
            state.sent += written;
            drained.progressed = written > 0;
        }
        if state.pending() == 0 {
            state.sent = 0;
            state.waiting_frames = 0;
            state.waiting.clear();
            if state.waiting.capacity() > KEEP_BUFFER_BYTES {
                state.waiting = Vec::new();
            }
        }
        drained.pending = state.pending() > 0;
        self.account(&state, before);
        Ok(drained)
    }

    /// The session is ending: frames from the dispatcher are dropped from now on.
    pub fn shut(&self) {
        self.lock().shut = true;
    }

    /// For the session's end: writes everything still waiting, blocking, as long as each write
    /// makes progress within `timeout`. Frames from the dispatcher are dropped from now on.
    pub fn finish(&self, timeout: Duration) -> io::Result<()> {
        let (bytes, sent) = {
            let mut state = self.lock();
            state.shut = true;
            let before = state.pending();
            let taken = (
                std::mem::take(&mut state.waiting),
                std::mem::take(&mut state.sent),
            );
            self.account(&state, before);
            taken
        };
        self.stream.set_write_timeout(Some(timeout))?;
        (&*self.stream).write_all(&bytes[sent..])?;
        Metrics::add(&self.metrics.bytes_out, (bytes.len() - sent) as u64);
        Ok(())
    }

    /// `sendmsg` with `MSG_DONTWAIT`: writes what the socket takes now (0 when it is full); the
    /// socket itself stays blocking for [`Outlet::finish`].
    fn send_without_blocking(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: an all-zero msghdr is valid (no address, no control data).
        let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
        // `IoSlice` is guaranteed to be ABI compatible with `iovec` on Unix; sendmsg only reads.
        message.msg_iov = slices.as_ptr() as *mut libc::iovec;
        message.msg_iovlen = slices.len() as _;
        loop {
            // SAFETY: `message` points at `slices`, valid for the call; `stream` keeps the fd open.
            let n = unsafe {
                libc::sendmsg(
                    self.stream.as_raw_fd(),
                    &message,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                Metrics::add(&self.metrics.bytes_out, n as u64);
                return Ok(n as usize);
            }
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(error),
            }
        }
    }
}

impl Drop for Outlet {
    /// What never went out leaves the all-clients gauge with the outlet.
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let pending = state.pending() as u64;
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
