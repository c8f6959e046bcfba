//! Couriers: helper threads that write part of each batch's frames to the clients' outlets, so a
//! broadcast to many clients is written from every core at once instead of one client after
//! another. Writing to a local socket also wakes the reader, which is most of its cost.
//!
//! Every client always goes through the same lane (its id modulo the lane count; lane 0 is the
//! dispatcher's own thread, see [`super::Delivery`]), so its frames keep their order. A courier
//! only calls [`Outlet::send`], which never blocks, and reports a client the outlet finds too slow
//! back to the delivery, whose caller alone may drop it. Couriers know nothing of rooms or
//! history.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Acquire, Ordering::Release};
use std::thread::{self, JoinHandle};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::metrics::Metrics;
use crate::outlet::{Outlet, SocketIoForms};
use crate::protocol::{ClientId, Frame};

/// Most courier threads, whatever the core count: past a few, waking them costs more than the
/// writes they share.
const MAX_COURIERS: usize = 3;
/// Parcels waiting for one courier; the dispatcher waits when a courier is this far behind
/// (a courier never waits on a client, so it always catches up).
const PARCELS_IN_FLIGHT: usize = 4;
/// Slow-client reports waiting for the dispatcher; a report that does not fit is made again
/// with the client's next frames.
const SLOW_REPORTS: usize = 1024;

/// One batch's frames for some clients, each client's frames together and in order.
#[derive(Default)]
pub struct Parcel {
    items: Vec<(ClientId, Arc<Outlet>, Range<usize>)>,
    frames: Vec<Frame>,
    /// The frames' socket.io forms, turned once per batch.
    forms: SocketIoForms,
}

impl Parcel {
    pub fn add(&mut self, id: ClientId, outlet: &Arc<Outlet>, frames: impl Iterator<Item = Frame>) {
        let start = self.frames.len();
        self.frames.extend(frames);
        self.items
            .push((id, outlet.clone(), start..self.frames.len()));
    }

    /// Hands every client its frames; calls `slow` for each client its outlet finds too slow.
    /// Returns the number of frames handed over, and leaves the parcel empty for reuse.
    pub fn deliver(&mut self, mut slow: impl FnMut(ClientId)) -> u64 {
        for (id, outlet, range) in self.items.drain(..) {
            if outlet.send(&self.frames[range], &mut self.forms).too_slow {
                slow(id);
            }
        }
        let handed = self.frames.len() as u64;
        self.forms.clear();
        self.frames.clear();
        handed
    }
}

/// The courier threads, and the parcels the dispatcher's thread is filling for them.
pub struct Couriers {
    lanes: Vec<Lane>,
    reports: Receiver<ClientId>,
}

struct Lane {
    filling: Parcel,
    /// Parcels sent to this courier, and (counted by the courier) delivered: when the two are
    /// equal it holds nothing, and the dispatcher's thread may write to its clients itself.
    sent: u64,
    delivered: Arc<AtomicU64>,
    parcels: Sender<Parcel>,
    /// Delivered parcels come back, so their buffers are reused.
    empties: Receiver<Parcel>,
    thread: JoinHandle<()>,
}

/// One courier per core beyond the dispatcher's own, at most `MAX_COURIERS`.
pub fn wanted() -> usize {
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    (cores - 1).min(MAX_COURIERS)
}

impl Couriers {
    /// Starts `count` courier threads (none: the dispatcher's thread writes everything).
    pub fn start(count: usize, metrics: &Arc<Metrics>) -> std::io::Result<Couriers> {
        let (report, reports) = bounded(SLOW_REPORTS);
        let mut lanes = Vec::new();
        for n in 1..=count {
            let (parcels, inbox) = bounded::<Parcel>(PARCELS_IN_FLIGHT);
            let (empty, empties) = bounded(PARCELS_IN_FLIGHT);
            let (report, metrics) = (report.clone(), metrics.clone());
            let delivered = Arc::new(AtomicU64::new(0));
            let done = delivered.clone();
            let thread = thread::Builder::new()
                .name(format!("courier-{n}"))
                .spawn(move || {
                    for mut parcel in inbox {
                        let handed = parcel.deliver(|id| {
                            let _ = report.try_send(id);
                        });
                        Metrics::add(&metrics.messages_sent, handed);
                        // Release: the writes above happen before the dispatcher's thread
                        // sees this count and writes to the same clients itself.
                        done.fetch_add(1, Release);
                        let _ = empty.try_send(parcel);
                    }
                })?;
            lanes.push(Lane {
                filling: Parcel::default(),
                sent: 0,
                delivered,
                parcels,
                empties,
                thread,
            });
        }
        Ok(Couriers { lanes, reports })
    }

    /// Lanes, the dispatcher's own (lane 0) included.
    pub fn lanes(&self) -> usize {
        self.lanes.len() + 1
    }

    /// Whether every parcel sent has been delivered: then no client has frames waiting with a
    /// courier, and frames the caller writes itself cannot overtake any.
    pub fn all_delivered(&self) -> bool {
        self.lanes
            .iter()
            .all(|lane| lane.delivered.load(Acquire) == lane.sent)
    }

    /// The parcel being filled for courier lane `lane` (1 or more).
    pub fn parcel(&mut self, lane: usize) -> &mut Parcel {
        &mut self.lanes[lane - 1].filling
    }

    /// Sends every filled parcel to its courier.
    pub fn send_all(&mut self) {
        for lane in &mut self.lanes {
            if lane.filling.items.is_empty() {
                continue;
            }
            let next = lane.empties.try_recv().unwrap_or_default();
            let parcel = std::mem::replace(&mut lane.filling, next);
            // Fails only once the courier is gone (after `stop`): then nothing is in flight.
            if lane.parcels.send(parcel).is_ok() {
                lane.sent += 1;
            }
        }
    }

    /// Clients the couriers found too slow since the last call.
    pub fn slow_clients(&self) -> impl Iterator<Item = ClientId> + '_ {
        self.reports.try_iter()
    }

    /// Waits until every parcel sent has been delivered, and ends the couriers.
    pub fn stop(&mut self) {
        for lane in self.lanes.drain(..) {
            drop(lane.parcels);
            let _ = lane.thread.join();
        }
    }
}
