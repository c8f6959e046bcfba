//! Delivery: how the dispatcher's frames reach the clients. It owns each client's [`Outlet`] and
//! mailbox, and the [`courier`] threads; the dispatcher only says who gets which frame
//! ([`Delivery::post`]) and, once per batch, sends them all ([`Delivery::send`]).
//!
//! A batch's frames for one client wait in its mailbox, and leave together, in order, in one
//! write to its outlet: by the dispatcher's own thread (lane 0) or by a courier, always the same
//! lane for the same client, except that a small batch is written by the dispatcher's thread
//! alone while no courier holds anything (so nothing of a client's can be overtaken). A frame
//! is serialised once by the dispatcher and shared (reference counted) by every mailbox it is
//! posted to. Delivery never blocks on a client: an outlet whose backlog passes its bound makes
//! the client *slow*, and [`Delivery::send`] returns it so the dispatcher can drop it. This
//! module knows nothing of rooms, names or history.

mod courier;

use std::collections::HashMap;
use std::sync::Arc;

use courier::{Couriers, Parcel};

use crate::metrics::Metrics;
use crate::outlet::Outlet;
use crate::protocol::{ClientId, Frame};

/// Mailbox capacity a client keeps between batches; a bigger one (after a burst) is released.
const KEEP_MAILBOX_FRAMES: usize = 16;
/// A batch for at most this many clients is written by the dispatcher's own thread, whatever
/// their lanes, when no courier holds anything: waking a courier (a futex and a context switch)
/// costs more than the few writes it would take over. A join's welcome and presence, one chat
/// message to a small room. A broadcast to a crowd still goes to every lane.
const SMALL_BATCH_CLIENTS: usize = 4;

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

    /// Moves each touched client's mailbox into its lane's parcel, or all into this thread's
    /// for a small batch while the couriers hold nothing.
    fn fill_parcels(&mut self) {
        let small = self.touched.len() <= SMALL_BATCH_CLIENTS && self.couriers.all_delivered();
        let lanes = if small {
            1
        } else {
            self.couriers.lanes() as u64
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outlet::testing::{ROOMY, Recorder, recording};

    /// Couriers in these tests: lanes 0 to 3, so clients 1 to 8 use every lane twice.
    const COURIERS: usize = 3;
    const CLIENTS: u64 = 8;

    /// Delivery with couriers, and clients 1 to `CLIENTS` whose outlets record.
    fn with_clients() -> (Delivery, Vec<Arc<Recorder>>) {
        let metrics = Arc::new(Metrics::default());
        let mut delivery = Delivery::with_couriers(COURIERS, metrics.clone()).unwrap();
        let recorders = (1..=CLIENTS)
            .map(|id| {
                let (outlet, recorder) = recording(&metrics, ROOMY);
                delivery.add(id, outlet);
                recorder
            })
            .collect();
        (delivery, recorders)
    }

    #[test]
    fn each_client_gets_its_frames_in_order_across_batches_and_lanes() {
        const BATCHES: usize = 200;
        let (mut delivery, recorders) = with_clients();
        assert_eq!(delivery.couriers.lanes(), COURIERS + 1);
        // Client 2's courier falls behind the others, and behind this thread.
        *recorders[1].pause.lock().unwrap() = std::time::Duration::from_micros(500);
        for batch in 0..BATCHES {
            // A broadcast (the same bytes for all), then one frame of each client's own.
            let shared = Frame::from(format!("all {batch}"));
            for id in 1..=CLIENTS {
                delivery.post(id, shared.clone());
                delivery.post(id, format!("{id}: {batch}").into());
            }
            assert_eq!(delivery.send(), Vec::<ClientId>::new());
        }
        delivery.close_all(1001, "done"); // waits for the couriers to deliver all
        for (id, recorder) in (1..=CLIENTS).zip(&recorders) {
            let expected: Vec<String> = (0..BATCHES)
                .flat_map(|b| [format!("all {b}"), format!("{id}: {b}")])
                .collect();
            assert!(recorder.take() == expected, "client {id}: out of order");
            assert_eq!(*recorder.closed.lock().unwrap(), Some("done"));
        }
    }

    #[test]
    fn a_small_batch_never_overtakes_what_a_courier_still_holds() {
        const BATCHES: usize = 200;
        let (mut delivery, recorders) = with_clients();
        // Client 2's courier is slow: a small batch right after a big one finds it busy.
        *recorders[1].pause.lock().unwrap() = std::time::Duration::from_micros(500);
        let small = 1..=SMALL_BATCH_CLIENTS as u64; // clients 1 and 2 among them
        let mut expected = vec![Vec::new(); CLIENTS as usize];
        for batch in 0..BATCHES {
            let to = if batch % 2 == 0 {
                1..=CLIENTS
            } else {
                small.clone()
            };
            for id in to {
                let text = format!("{id}: {batch}");
                delivery.post(id, text.as_str().into());
                expected[id as usize - 1].push(text);
            }
            assert_eq!(delivery.send(), Vec::<ClientId>::new());
        }
        delivery.close_all(1001, "done");
        for (id, recorder) in (1..=CLIENTS).zip(&recorders) {
            let got: Vec<String> = recorder.take().iter().map(|f| f.to_string()).collect();
            assert!(
                got == expected[id as usize - 1],
                "client {id}: out of order"
            );
        }
    }

    #[test]
    fn a_client_too_slow_on_a_courier_lane_is_reported() {
        let (mut delivery, recorders) = with_clients();
        let slow: ClientId = 6; // lane 2: a courier's
        *recorders[slow as usize - 1].slow.lock().unwrap() = true;
        let mut reported = Vec::new();
        // The courier reports in its own time: the report comes with this send or a later one.
        for _ in 0..1000 {
            (1..=CLIENTS).for_each(|id| delivery.post(id, "hi".into()));
            reported.extend(delivery.send());
            if !reported.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(reported[..1], [slow]);
        delivery.close(slow, 1008, "too slow");
        let closed = *recorders[slow as usize - 1].closed.lock().unwrap();
        assert_eq!(closed, Some("too slow"));
        delivery.post(slow, "after".into());
        delivery.close_all(1001, "done");
        assert!(
            !recorders[slow as usize - 1]
                .take()
                .contains(&"after".into())
        );
    }
}
