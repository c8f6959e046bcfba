//! Delivery: how the dispatcher's frames reach the clients. It owns each client's [`Outlet`] and
//! mailbox, and the [`courier`] threads; the dispatcher only says who gets which frame
//! ([`Delivery::post`]) and, once per batch, sends them all ([`Delivery::send`]).
//!
//! A batch's frames for one client wait in its mailbox, and leave together, in order, in one
//! write to its outlet: by the dispatcher's own thread (lane 0) or by a courier, always the same
//! lane for the same client. A frame is serialised once by the dispatcher and shared (reference
//! counted) by every mailbox it is posted to. Delivery never blocks on a client: an outlet whose
//! backlog passes its bound makes the client *slow*, and [`Delivery::send`] returns it so the
//! dispatcher can drop it. This module knows nothing of rooms, names or history.

mod courier;

use std::collections::HashMap;
use std::sync::Arc;

use courier::{Couriers, Parcel};

use crate::metrics::Metrics;
use crate::outlet::Outlet;
use crate::protocol::{ClientId, Frame};

/// Mailbox capacity a client keeps between batches; a bigger one (after a burst) is released.
const KEEP_MAILBOX_FRAMES: usize = 16;

/// The way out to every connected client.
pub struct Delivery {
    recipients: HashMap<ClientId, Recipient>,
    /// Clients with frames in their mailbox from this batch, in the order they got their first.
    touched: Vec<ClientId>,
    /// Helper threads that write part of each batch (lanes 1 and up).
    couriers: Couriers,
    /// The frames the caller's thread writes itself (lane 0), kept for its allocation.
    own: Parcel,
    metrics: Arc<Metrics>,
}

struct Recipient {
    outlet: Arc<Outlet>,
    /// This batch's frames for the client, in order, until [`Delivery::send`].
    mailbox: Vec<Frame>,
}

impl Delivery {
    /// Delivery with one courier per spare core (at most a few).
    pub fn start(metrics: Arc<Metrics>) -> std::io::Result<Delivery> {
        Delivery::with_couriers(courier::wanted(), metrics)
    }

    /// Delivery with `couriers` helper threads; with none, [`Delivery::send`] writes every
    /// frame itself, on the caller's thread (what the dispatcher's unit tests use).
    pub fn with_couriers(couriers: usize, metrics: Arc<Metrics>) -> std::io::Result<Delivery> {
        Ok(Delivery {
            recipients: HashMap::new(),
            touched: Vec::new(),
            couriers: Couriers::start(couriers, &metrics)?,
            own: Parcel::default(),
            metrics,
        })
    }

    /// A new client: frames posted to `id` go out through `outlet` from now on.
    pub fn add(&mut self, id: ClientId, outlet: Arc<Outlet>) {
        let mailbox = Vec::new();
        self.recipients.insert(id, Recipient { outlet, mailbox });
    }

    /// Forgets a client (its session is ending): frames still in its mailbox are dropped.
    pub fn remove(&mut self, id: ClientId) {
        self.recipients.remove(&id);
    }

    /// Forgets a client and asks its session to close the connection with `code` and `reason`,
    /// after what its outlet still holds.
    pub fn close(&mut self, id: ClientId, code: u16, reason: &'static str) {
        if let Some(recipient) = self.recipients.remove(&id) {
            recipient.outlet.close(code, reason);
        }
    }

    /// Puts `frame` in the mailbox of client `id`, if it is still connected.
    pub fn post(&mut self, id: ClientId, frame: Frame) {
        if let Some(recipient) = self.recipients.get_mut(&id) {
            if recipient.mailbox.is_empty() {
                self.touched.push(id);
            }
            recipient.mailbox.push(frame);
        }
    }

    /// Hands every mailbox to its outlet, each client's frames together so they leave in one
    /// write, by this thread or a courier. Returns the clients found too slow (by this batch,
    /// or reported by a courier since the last call); they are still registered.
    pub fn send(&mut self) -> Vec<ClientId> {
        self.fill_parcels();
        self.couriers.send_all();
        let mut slow = Vec::new();
        let handed = self.own.deliver(|id| slow.push(id));
        Metrics::add(&self.metrics.messages_sent, handed);
        slow.extend(self.couriers.slow_clients());
        slow
    }

    /// Moves each touched client's mailbox into its lane's parcel.
    fn fill_parcels(&mut self) {
        let lanes = self.couriers.lanes() as u64;
        for id in self.touched.drain(..) {
            let Some(recipient) = self.recipients.get_mut(&id) else {
                continue; // gone since: its frames went with it
            };
            let parcel = match (id % lanes) as usize {
                0 => &mut self.own,
                lane => self.couriers.parcel(lane),
            };
            parcel.add(id, &recipient.outlet, recipient.mailbox.drain(..));
            if recipient.mailbox.capacity() > KEEP_MAILBOX_FRAMES {
                recipient.mailbox = Vec::new(); // an idle client keeps little
            }
        }
    }

    /// For the server's end: waits until the couriers delivered everything they carry, then
    /// asks every client's session to close with `code` and `reason`. Returns how many.
    pub fn close_all(&mut self, code: u16, reason: &'static str) -> usize {
        self.couriers.stop();
        for recipient in self.recipients.values() {
            recipient.outlet.close(code, reason);
        }
        self.recipients.len()
    }
}
