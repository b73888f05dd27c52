//! This node's live WebSocket sessions, by id.
//!
//! Entity actors push events to sessions through the router, naming them by
//! [`SessionRef`](crate::actors::SessionRef); this table turns the id into the session
//! actor's mailbox. Pushes never wait: a session that cannot take more is reported
//! `Full`, and the caller closes it (the client then resyncs from its cursor).
//!
//! Why the byte count lives here and not in the session: an actix WebSocket actor runs
//! inside its HTTP response stream, which the server polls only while the socket takes
//! data. A client that stops reading therefore freezes its session actor, which can no
//! longer look at its own queue. So the table counts the bytes pushed to each session
//! and not yet taken by it, and refuses pushes past [`MAX_PENDING_BYTES`].
//!
//! A frozen session also cannot run its heartbeat. So each session stamps
//! `alive_at` on every heartbeat tick, and [`SessionTable::sweep`] (run by the node on
//! the heartbeat interval) removes sessions whose stamp is older than the heartbeat
//! timeout; the node then detaches them from their users, who go offline. The socket
//! itself lingers (with its bounded backlog) until the client reads again, when the
//! session finds itself swept and closes, or until TCP gives up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use actix::Recipient;

use crate::actors::{Delivery, SessionEvent, SessionRef};
use crate::ids::UserId;

/// Bytes of events pushed to one session and not yet taken by it.
pub const MAX_PENDING_BYTES: u64 = 4 * 1024 * 1024;

/// Roughly what an event costs in memory until the session takes it.
pub fn event_cost(event: &SessionEvent) -> u64 {
    match event {
        SessionEvent::Inbox { message, .. } => 256 + message.body.len() as u64,
        _ => 256,
    }
}

/// What a session shares with the table.
#[derive(Debug, Default)]
pub struct Gauge {
    /// Bytes pushed to the session and not yet handled by it.
    pub pending: AtomicU64,
    /// When the session's heartbeat last ran (ms since the epoch).
    pub alive_at: AtomicU64,
}

struct Slot {
    recipient: Recipient<SessionEvent>,
    user: UserId,
    gauge: Arc<Gauge>,
}

pub struct SessionTable {
    next_id: AtomicU64,
    sessions: Mutex<HashMap<u64, Slot>>,
}

impl Default for SessionTable {
    /// Session ids start at a random point: another node may still hold a reference to
    /// a session of this node's previous run, and must never reach a new session that
    /// happens to get the same number.
    fn default() -> Self {
        SessionTable {
            next_id: AtomicU64::new(rand::random::<u64>() >> 1),
            sessions: Mutex::new(HashMap::new()),
        }
    }
}

impl SessionTable {
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers a session with the gauge it keeps up to date.
    pub fn insert(
        &self,
        id: u64,
        recipient: Recipient<SessionEvent>,
        user: UserId,
        gauge: Arc<Gauge>,
    ) {
        self.lock().insert(
            id,
            Slot {
                recipient,
                user,
                gauge,
            },
        );
    }

    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    pub fn contains(&self, id: u64) -> bool {
        self.lock().contains_key(&id)
    }

    /// Every session with its user.
    pub fn all(&self) -> Vec<(u64, UserId)> {
        self.lock().iter().map(|(id, s)| (*id, s.user)).collect()
    }

    /// Removes the sessions whose heartbeat has not run since `stale_before` (ms) and
    /// returns them with their users, to be detached.
    pub fn sweep(&self, node: &str, stale_before: u64) -> Vec<(SessionRef, UserId)> {
        let mut map = self.lock();
        let stale: Vec<u64> = map
            .iter()
            .filter(|(_, s)| s.gauge.alive_at.load(Ordering::Relaxed) < stale_before)
            .map(|(id, _)| *id)
            .collect();
        stale
            .into_iter()
            .filter_map(|id| map.remove(&id).map(|s| (id, s.user)))
            .map(|(id, user)| {
                (
                    SessionRef {
                        node: node.to_string(),
                        id,
                    },
                    user,
                )
            })
            .collect()
    }

    pub fn deliver(&self, id: u64, event: SessionEvent) -> Delivery {
        self.deliver_to(id, None, event)
    }

    /// Like `deliver`, for an event meant for a session of `user` only (one pushed
    /// from another node, which names the user): a session of anyone else is `Gone`.
    pub fn deliver_to(&self, id: u64, user: Option<UserId>, event: SessionEvent) -> Delivery {
        let Some((recipient, gauge)) = self
            .lock()
            .get(&id)
            .filter(|s| user.is_none_or(|u| u == s.user))
            .map(|s| (s.recipient.clone(), Arc::clone(&s.gauge)))
        else {
            return Delivery::Gone;
        };
        let cost = event_cost(&event);
        let pending = &gauge.pending;
        if let SessionEvent::Close { .. } = event {
            // A close must get through even to a full mailbox.
            pending.fetch_add(cost, Ordering::Relaxed);
            recipient.do_send(event);
            return Delivery::Delivered;
        }
        if pending.load(Ordering::Relaxed) + cost > MAX_PENDING_BYTES {
            return Delivery::Full;
        }
        // Count before sending: the session may handle (and subtract) it at once.
        pending.fetch_add(cost, Ordering::Relaxed);
        match recipient.try_send(event) {
            Ok(()) => Delivery::Delivered,
            Err(e) => {
                pending.fetch_sub(cost, Ordering::Relaxed);
                match e {
                    actix::prelude::SendError::Full(_) => Delivery::Full,
                    actix::prelude::SendError::Closed(_) => {
                        self.remove(id);
                        Delivery::Gone
                    }
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Slot>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}
