//! Admission: who gets a connection thread, and who may become a WebSocket client.
//!
//! Every accepted TCP connection costs a thread, a file descriptor and some memory, so each is
//! counted from `accept` to its end, in three ways:
//! * in total, against the file-descriptor budget ([`fd_budget`]): the server never runs out of
//!   descriptors because of its clients, and every accept loop survives the limit;
//! * while it is *at the door* (reading a request head, an HTTP exchange, a handshake), in total
//!   and per address, so that one address holding silent sockets never locks others out;
//! * once it is a WebSocket client, in total (`--max-clients`) and per address
//!   (`--max-clients-per-ip`).
//!
//! New connections are also rate-limited per address. An IPv6 client counts by its /64 (see
//! [`crate::ratelimit::address_key`]). The trusted proxy's own address is exempt from the
//! per-address shares: behind it, `X-Forwarded-For` tells clients apart once the head is read.
//! This module only counts and decides; the listener answers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use crate::handshake::Refusal;
use crate::ratelimit::{AddressBuckets, address_key};

/// File descriptors kept back from connections: the history file and its compaction, the
/// epoll instance, the listener, logging, and a margin for the libraries.
pub const FD_RESERVE: u64 = 64;

/// How many connections the descriptor limit allows: raises the soft limit to the hard one
/// first (as Go's runtime does), then keeps [`FD_RESERVE`] back.
pub fn fd_budget() -> usize {
    let soft = rlimit::increase_nofile_limit(u64::MAX)
        .or_else(|_| rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft))
        .unwrap_or(1024);
    soft.saturating_sub(FD_RESERVE).max(16) as usize
}

/// The numbers admission enforces (0 means "no limit" for the client caps and the rate).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections of every kind at once: the descriptor budget.
    pub connections: usize,
    /// Connections at the door at once, in total and from one address.
    pub at_door: usize,
    pub at_door_per_address: usize,
    /// New connections per second from one address, and at once.
    pub rate_per_address: f64,
    pub burst_per_address: f64,
    /// WebSocket clients at once, in total and from one address.
    pub clients: usize,
    pub clients_per_address: usize,
    /// Exempt from the per-address shares (the trusted proxy).
    pub exempt: Option<IpAddr>,
}

/// Why a new connection was turned away before anything was read.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum Turned {
    #[error("the server is at its connection limit (file descriptors)")]
    Connections,
    #[error("too many connections waiting at the door")]
    AtDoor,
    #[error("too many connections waiting at the door from this address")]
    AtDoorFromAddress,
    #[error("connection rate per address exceeded (--conn-rate-per-ip)")]
    Rate,
}

pub struct Admission {
    limits: Limits,
    rates: AddressBuckets,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    connections: usize,
    at_door: usize,
    at_door_from: HashMap<IpAddr, usize>,
    clients: usize,
    clients_from: HashMap<IpAddr, usize>,
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Admission {
            rates: AddressBuckets::new(limits.rate_per_address, limits.burst_per_address),
            limits,
            counts: Mutex::new(Counts::default()),
        }
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        // Every update below is whole before the lock is let go: a poisoned lock is still sound.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connections now, of every kind.
    #[cfg(test)]
    pub fn connections(&self) -> usize {
        self.counts().connections
    }

    /// Admits a new connection from `peer` at the door, or says why not.
    pub fn admit(self: &Arc<Self>, peer: IpAddr, now: Instant) -> Result<Ticket, Turned> {
        let key = address_key(peer);
        let exempt = self.limits.exempt.map(address_key) == Some(key);
        let mut counts = self.counts();
        if counts.connections >= self.limits.connections {
            return Err(Turned::Connections);
        }
        if counts.at_door >= self.limits.at_door {
            return Err(Turned::AtDoor);
        }
        let from = counts.at_door_from.get(&key).copied().unwrap_or(0);
        if !exempt && from >= self.limits.at_door_per_address {
            return Err(Turned::AtDoorFromAddress);
        }
        if !exempt && !self.rates.try_take(key, 1.0, now) {
            return Err(Turned::Rate);
        }
        counts.connections += 1;
        counts.at_door += 1;
        *counts.at_door_from.entry(key).or_default() += 1;
        Ok(Ticket {
            admission: self.clone(),
            door: Some(key),
            client: None,
        })
    }
}

/// One admitted connection: dropping it gives back what it counted against.
pub struct Ticket {
    admission: Arc<Admission>,
    /// Set while the connection is at the door.
    door: Option<IpAddr>,
    /// Set once it is a WebSocket client.
    client: Option<ClientSlot>,
}

impl Ticket {
    /// Leaves the door and becomes a WebSocket client from `client_ip`, if the client caps allow.
    pub fn become_client(&mut self, client_ip: IpAddr) -> Result<(), Refusal> {
        self.client = Some(self.admission.client_slot(client_ip)?);
        self.leave_door();
        Ok(())
    }

    /// Leaves the door without becoming a client of its own: a socket.io session's WebSocket,
    /// whose session already holds a [`ClientSlot`].
    pub fn leave_door(&mut self) {
        if let Some(door) = self.door.take() {
            let mut counts = self.admission.counts();
            let counts = &mut *counts;
            leave(&mut counts.at_door, &mut counts.at_door_from, door);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.client = None; // gives the client slot back first: the lock is not reentrant
        let mut counts = self.admission.counts();
        counts.connections -= 1;
        let counts = &mut *counts;
        if let Some(door) = self.door {
            leave(&mut counts.at_door, &mut counts.at_door_from, door);
        }
    }
}

/// A client counted against `--max-clients` and `--max-clients-per-ip` until dropped: held by a
/// WebSocket connection's [`Ticket`], or by a socket.io session that lives across requests.
pub struct ClientSlot {
    admission: Arc<Admission>,
    key: IpAddr,
}

impl Admission {
    /// A client slot for `client_ip`, if the client caps allow.
    pub fn client_slot(self: &Arc<Self>, client_ip: IpAddr) -> Result<ClientSlot, Refusal> {
        let limits = &self.limits;
        let key = address_key(client_ip);
        let mut counts = self.counts();
        if limits.clients > 0 && counts.clients >= limits.clients {
            return Err(Refusal::TooManyClients(limits.clients));
        }
        let from = counts.clients_from.get(&key).copied().unwrap_or(0);
        if limits.clients_per_address > 0 && from >= limits.clients_per_address {
            return Err(Refusal::TooManyFromAddress(
                client_ip,
                limits.clients_per_address,
            ));
        }
        counts.clients += 1;
        *counts.clients_from.entry(key).or_default() += 1;
        Ok(ClientSlot {
            admission: self.clone(),
            key,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self.admission.counts();
        let counts = &mut *counts;
        leave(&mut counts.clients, &mut counts.clients_from, self.key);
    }
}

/// Takes one off a total and off an address's count, forgetting the address at zero.
fn leave(total: &mut usize, from: &mut HashMap<IpAddr, usize>, key: IpAddr) {
    *total -= 1;
    if let Some(n) = from.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            from.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            connections: 10,
            at_door: 6,
            at_door_per_address: 3,
            rate_per_address: 1000.0,
            burst_per_address: 1000.0,
            clients: 4,
            clients_per_address: 2,
            exempt: None,
        }
    }

    #[test]
    fn one_address_gets_only_its_share_of_the_door() {
        let admission = Arc::new(Admission::new(limits()));
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let now = Instant::now();
        let held: Vec<_> = (0..3).map(|_| admission.admit(a, now).unwrap()).collect();
        assert_eq!(
            admission.admit(a, now).err(),
            Some(Turned::AtDoorFromAddress)
        );
        let others: Vec<_> = (0..3).map(|_| admission.admit(b, now).unwrap()).collect();
        assert_eq!(admission.admit(b, now).err(), Some(Turned::AtDoor));
        drop(held);
        assert!(admission.admit(a, now).is_ok());
        drop(others);
        assert_eq!(admission.connections(), 0);
    }

    #[test]
    fn clients_leave_the_door_and_count_per_address() {
        let admission = Arc::new(Admission::new(limits()));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let now = Instant::now();
        let mut tickets: Vec<_> = (0..3).map(|_| admission.admit(a, now).unwrap()).collect();
        assert!(tickets[0].become_client(a).is_ok());
        assert!(tickets[1].become_client(a).is_ok());
        assert!(matches!(
            tickets[2].become_client(a),
            Err(Refusal::TooManyFromAddress(_, 2))
        ));
        // The two clients no longer hold the door: three more may wait there.
        let more: Vec<_> = (0..2).map(|_| admission.admit(a, now).unwrap()).collect();
        assert_eq!(admission.connections(), 5);
        drop((tickets, more));
        assert_eq!(admission.connections(), 0);
    }

    #[test]
    fn rate_and_descriptor_budget() {
        let admission = Arc::new(Admission::new(Limits {
            rate_per_address: 1.0,
            burst_per_address: 2.0,
            ..limits()
        }));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let now = Instant::now();
        let _t = (
            admission.admit(a, now).unwrap(),
            admission.admit(a, now).unwrap(),
        );
        assert_eq!(admission.admit(a, now).err(), Some(Turned::Rate));
        let full = Arc::new(Admission::new(Limits {
            connections: 1,
            ..limits()
        }));
        let _one = full.admit(a, now).unwrap();
        assert_eq!(full.admit(a, now).err(), Some(Turned::Connections));
    }

    #[test]
    fn the_trusted_proxy_is_exempt_from_address_shares() {
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        let admission = Arc::new(Admission::new(Limits {
            exempt: Some(proxy),
            ..limits()
        }));
        let now = Instant::now();
        let held: Vec<_> = (0..6)
            .map(|_| admission.admit(proxy, now).unwrap())
            .collect();
        assert_eq!(held.len(), 6);
    }
}
