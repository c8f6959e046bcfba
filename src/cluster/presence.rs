//! This node's members in Redis, for the link thread: each member in its node's hash, its name
//! claimed (one owner per name key across all nodes), every change published; the whole list
//! again after a reconnection; and the sweep that removes nodes whose heartbeat stopped.
//!
//! The Lua scripts touch keys named in their data (a node's name keys), so they need a single
//! Redis, not Redis Cluster.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;

use log::{debug, info};
use redis::{Connection, RedisResult, Script};

use super::wire::{self, Entry, Member};
use super::{Inbound, Shared, keys};
use crate::names;
use crate::protocol::ClientId;

/// Takes a name key for ARGV[1] (`node:client`) unless someone else holds it.
const CLAIM: &str = r"
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
";

/// Records a member and its name key, lets go of its old name key, publishes the change.
const HERE: &str = r"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
if KEYS[4] ~= ARGV[3] and redis.call('GET', KEYS[4]) == ARGV[5] then
  redis.call('DEL', KEYS[4])
end
redis.call('PUBLISH', KEYS[3], ARGV[4])
return 0
";

/// Forgets a member and lets go of its name, publishes it.
const GONE: &str = r"
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('GET', KEYS[4]) == ARGV[3] then redis.call('DEL', KEYS[4]) end
redis.call('PUBLISH', KEYS[3], ARGV[2])
return 0
";

/// Replaces a node's whole member list (ARGV[3..]: client, member, name key), letting go of the
/// names it no longer uses, and publishes the list.
const ROSTER: &str = r"
local new = {}
for i = 3, #ARGV, 3 do new[ARGV[i]] = ARGV[i + 2] end
local old = redis.call('HGETALL', KEYS[2])
for i = 1, #old, 2 do
  if new[old[i]] ~= old[i + 1] and redis.call('GET', old[i + 1]) == ARGV[2] .. ':' .. old[i] then
    redis.call('DEL', old[i + 1])
  end
end
redis.call('DEL', KEYS[1], KEYS[2])
for i = 3, #ARGV, 3 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
end
redis.call('PUBLISH', KEYS[3], ARGV[1])
return 0
";

/// Removes a node whose heartbeat expired (or that retires, having deleted its own), with its
/// members and names, and tells everyone; only the first sweeper to see it does.
const SWEEP: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('SREM', KEYS[3], ARGV[1]) == 0 then return 0 end
local names = redis.call('HGETALL', KEYS[5])
for i = 1, #names, 2 do
  if redis.call('GET', names[i + 1]) == ARGV[1] .. ':' .. names[i] then
    redis.call('DEL', names[i + 1])
  end
end
redis.call('DEL', KEYS[2], KEYS[5])
redis.call('PUBLISH', KEYS[4], ARGV[2])
return 1
";

/// The link's view of this node's members in Redis.
pub(super) struct Presence {
    claim: Script,
    here: Script,
    gone: Script,
    roster: Script,
    sweep: Script,
    /// The name key each member holds in Redis.
    claimed: HashMap<ClientId, String>,
}

impl Presence {
    pub(super) fn new() -> Presence {
        Presence {
            claim: Script::new(CLAIM),
            here: Script::new(HERE),
            gone: Script::new(GONE),
            roster: Script::new(ROSTER),
            sweep: Script::new(SWEEP),
            claimed: HashMap::new(),
        }
    }

    /// Publishes a member's current state (the roster has it), claiming its name first. A name
    /// another node holds is lost: the dispatcher is told, and renames the member.
    pub(super) fn here(
        &mut self,
        shared: &Shared,
        con: &mut Connection,
        client: ClientId,
    ) -> RedisResult<Option<Inbound>> {
        let Some(member) = shared.member(client) else {
            return Ok(None); // gone since
        };
        let key = name_key(&member.name);
        if !self.take_name(shared, con, client, &key)? {
            return Ok(Some(lost(member)));
        }
        let old = self.claimed.insert(client, key.clone());
        let stored = serde_json::to_string(&member).unwrap_or_default();
        self.here
            .key(keys::members(shared.node))
            .key(keys::names(shared.node))
            .key(keys::CHANNEL)
            .key(old.unwrap_or_else(|| key.clone()))
            .arg(client)
            .arg(stored)
            .arg(&key)
            .arg(wire::encode(&Entry::Here { member }))
            .arg(owner(shared.node, client))
            .invoke::<i64>(con)?;
        Ok(None)
    }

    fn take_name(
        &self,
        shared: &Shared,
        con: &mut Connection,
        client: ClientId,
        key: &str,
    ) -> RedisResult<bool> {
        if self.claimed.get(&client).is_some_and(|k| k == key) {
            return Ok(true);
        }
        let owner = owner(shared.node, client);
        let taken: i64 = self.claim.key(key).arg(owner).invoke(con)?;
        Ok(taken == 1)
    }

    pub(super) fn gone(
        &mut self,
        shared: &Shared,
        con: &mut Connection,
        client: ClientId,
    ) -> RedisResult<()> {
        let node = shared.node;
        let key = self.claimed.remove(&client).unwrap_or_else(|| name_key(""));
        self.gone
            .key(keys::members(node))
            .key(keys::names(node))
            .key(keys::CHANNEL)
            .key(key)
            .arg(client)
            .arg(wire::encode(&Entry::Gone { node, client }))
            .arg(owner(node, client))
            .invoke::<i64>(con)
            .map(drop)
    }

    /// Claims every member's name again and replaces this node's list in Redis (after a
    /// reconnection, or when a change could not be queued). Returns the names lost meanwhile.
    pub(super) fn republish(
        &mut self,
        shared: &Shared,
        con: &mut Connection,
    ) -> RedisResult<Vec<Inbound>> {
        shared.roster_stale.store(false, Relaxed);
        let mut members = shared.roster_snapshot();
        self.claimed.clear();
        let mut lost_names = Vec::new();
        let mut kept = Vec::new();
        for member in members.drain(..) {
            let key = name_key(&member.name);
            if self.take_name(shared, con, member.client, &key)? {
                self.claimed.insert(member.client, key);
                kept.push(member);
            } else {
                lost_names.push(lost(member));
            }
        }
        let node = shared.node;
        let entry = Entry::Roster {
            node,
            members: kept.clone(),
        };
        let mut call = self.roster.key(keys::members(node));
        call.key(keys::names(node))
            .key(keys::CHANNEL)
            .arg(wire::encode(&entry))
            .arg(node);
        for member in &kept {
            let stored = serde_json::to_string(member).unwrap_or_default();
            call.arg(member.client)
                .arg(stored)
                .arg(name_key(&member.name));
        }
        call.invoke::<i64>(con)?;
        Ok(lost_names)
    }

    /// Removes every other node whose heartbeat expired.
    pub(super) fn sweep(&self, shared: &Shared, con: &mut Connection) -> RedisResult<()> {
        let nodes: Vec<u64> = redis::cmd("SMEMBERS").arg(keys::NODES).query(con)?;
        for node in nodes.into_iter().filter(|&n| n != shared.node) {
            if self.remove_node(con, node)? {
                info!("redis: node {node} missed its heartbeats: its users are gone");
            }
        }
        Ok(())
    }

    fn remove_node(&self, con: &mut Connection, node: u64) -> RedisResult<bool> {
        let removed: i64 = self
            .sweep
            .key(keys::alive(node))
            .key(keys::members(node))
            .key(keys::NODES)
            .key(keys::CHANNEL)
            .key(keys::names(node))
            .arg(node)
            .arg(wire::encode(&Entry::NodeGone { node }))
            .invoke(con)?;
        Ok(removed == 1)
    }

    /// At shutdown: takes this node and its members out at once (best effort: otherwise they
    /// go when its heartbeat expires).
    pub(super) fn retire(&self, shared: &Shared) {
        let node = shared.node;
        let gone = super::connect(&shared.client).and_then(|mut con| {
            redis::cmd("DEL")
                .arg(keys::alive(node))
                .query::<i64>(&mut con)?;
            self.remove_node(&mut con, node)
        });
        if let Err(e) = gone {
            debug!("redis: could not retire node {node}: {e}");
        }
    }
}

/// The Redis key of a name: look-alike names (one [`names::key`]) share it.
fn name_key(name: &str) -> String {
    format!("wschat:name:{}", names::key(name))
}

fn owner(node: u64, client: ClientId) -> String {
    format!("{node}:{client}")
}

fn lost(member: Member) -> Inbound {
    Inbound::NameLost {
        client: member.client,
        name: member.name,
    }
}
