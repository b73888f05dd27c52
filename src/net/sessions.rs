//! This node's live WebSocket sessions, by id.
//!
//! Entity actors push events to sessions through the router, naming them by
//! [`SessionRef`]; this table turns the id into the session actor's mailbox. Pushes
//! never wait: a full mailbox means the client is not keeping up, and the caller
//! closes it (the client then resyncs from its cursor).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use actix::Recipient;

use crate::actors::{Delivery, SessionEvent};

#[derive(Default)]
pub struct SessionTable {
    next_id: AtomicU64,
    sessions: Mutex<HashMap<u64, Recipient<SessionEvent>>>,
}

impl SessionTable {
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn insert(&self, id: u64, recipient: Recipient<SessionEvent>) {
        self.lock().insert(id, recipient);
    }

    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    pub fn deliver(&self, id: u64, event: SessionEvent) -> Delivery {
        let Some(recipient) = self.lock().get(&id).cloned() else {
            return Delivery::Gone;
        };
        if let SessionEvent::Close { .. } = event {
            // A close must get through even to a full mailbox.
            recipient.do_send(event);
            return Delivery::Delivered;
        }
        match recipient.try_send(event) {
            Ok(()) => Delivery::Delivered,
            Err(actix::prelude::SendError::Full(_)) => Delivery::Full,
            Err(actix::prelude::SendError::Closed(_)) => {
                self.remove(id);
                Delivery::Gone
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Recipient<SessionEvent>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}
