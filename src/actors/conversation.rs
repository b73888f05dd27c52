//! The Conversation actor: one per conversation, on the conversation's home node.
//!
//! Owns the message sequence (1, 2, 3... no gaps), the idempotency index
//! (sender + `client_msg_id` -> the first ack), the per-member delivered/read
//! watermarks, and the fan-out of each stored message to every member's inbox.
//!
//! A message's path through here:
//! 1. check membership and limits; a known `client_msg_id` answers the original ack;
//! 2. assign the next seq, write message + idempotency entry in one atomic batch;
//! 3. wait for the group commit, then ack: an ack is never sent for a write that a
//!    kill -9 could lose;
//! 4. fan out to every member's User actor, per member at its own pace: each member has
//!    a confirmed head and at most one append in flight, so a slow or unreachable member
//!    never holds up the others, and failures retry with backoff.
//!
//! Fan-out is at-least-once and the inbox append is idempotent, so every member gets
//! every message exactly once. A persistent "fan-out pending" mark is set before the
//! first message of a burst is written and cleared once all members have it; after a
//! restart the node wakes every marked conversation and the fan-out resumes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::fut::{ready, wrap_future};
use actix::prelude::*;
use uuid::Uuid;

use super::error::ActorError;
use super::messages::*;
use super::registry::Registry;
use super::route::Route;
use crate::ids::{ConversationId, UserId};
use crate::metrics::metrics;
use crate::storage::{
    ConversationKind, ConversationRecord, MessageKind, MessageRecord, StorageError, Watermarks,
};

const IDLE_AFTER: Duration = Duration::from_secs(60);
const TICK: Duration = Duration::from_millis(500);
/// Messages kept in memory for fan-out (by count and by body bytes); older ones are
/// read back from storage.
const RECENT_MESSAGES: usize = 1024;
const RECENT_BYTES: usize = 1024 * 1024;
/// Most messages sent to one member in one append.
const FANOUT_BATCH: u64 = 256;
/// Most media one message may reference.
const MAX_MEDIA_PER_MESSAGE: usize = 32;
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

type Reply = ResponseActFuture<ConversationActor, Result<ConversationReply, ActorError>>;

/// Fan-out progress towards one member.
#[derive(Debug)]
struct Member {
    /// Highest seq durably in the member's inbox.
    done: u64,
    in_flight: bool,
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl Member {
    fn new(done: u64) -> Self {
        Member {
            done,
            in_flight: false,
            retry_at: None,
            backoff: RETRY_MIN,
        }
    }
}

pub struct ConversationActor {
    id: ConversationId,
    registry: Arc<Registry>,
    load_error: Option<ActorError>,
    /// Shared, so fan-out and notifications borrow it without copying the members.
    record: Option<Arc<ConversationRecord>>,
    /// Highest seq assigned.
    last_seq: u64,
    /// Highest seq known flushed: the only ones acked, fanned out or shown in history.
    durable_seq: u64,
    /// Watermarks known durable: what receipts and views show.
    watermarks: HashMap<UserId, Watermarks>,
    /// Watermarks written, possibly not yet flushed: what new marks are compared to,
    /// so that stored values only ever rise.
    written_watermarks: HashMap<UserId, Watermarks>,
    members: HashMap<UserId, Member>,
    /// The newest messages, ascending by seq, for fan-out without reads.
    recent: VecDeque<Arc<MessageRecord>>,
    /// Body bytes held in `recent`.
    recent_bytes: usize,
    /// Whether the persistent fan-out-pending mark is set.
    fanout_marked: bool,
    last_call: Instant,
}

impl ConversationActor {
    pub(crate) fn load(id: ConversationId, registry: Arc<Registry>) -> Self {
        let mut actor = ConversationActor {
            id,
            registry,
            load_error: None,
            record: None,
            last_seq: 0,
            durable_seq: 0,
            watermarks: HashMap::new(),
            written_watermarks: HashMap::new(),
            members: HashMap::new(),
            recent: VecDeque::new(),
            recent_bytes: 0,
            fanout_marked: false,
            last_call: Instant::now(),
        };
        if let Err(e) = actor.load_state() {
            tracing::error!(conversation_id = %id, error = %e, "cannot load conversation");
            actor.load_error = Some(e);
        }
        actor
    }

    fn load_state(&mut self) -> Result<(), ActorError> {
        let store = self.registry.store();
        self.record = store.conversation(self.id)?.map(Arc::new);
        let Some(record) = &self.record else {
            return Ok(());
        };
        // Whatever storage recovered is on disk: it counts as durable.
        self.last_seq = store.last_seq(self.id)?;
        self.durable_seq = self.last_seq;
        self.watermarks = store.watermarks(self.id)?.into_iter().collect();
        self.written_watermarks = self.watermarks.clone();
        let mark = store.fanout_mark(self.id)?;
        self.fanout_marked = mark.is_some();
        let done = mark.unwrap_or(self.last_seq).min(self.last_seq);
        self.members = record
            .members
            .iter()
            .map(|m| (*m, Member::new(done)))
            .collect();
        Ok(())
    }

    fn is_member(&self, user: UserId) -> Result<&ConversationRecord, ActorError> {
        let record = self
            .record
            .as_ref()
            .ok_or(ActorError::UnknownConversation)?;
        if record.members.contains(&user) {
            Ok(record)
        } else {
            Err(ActorError::NotMember)
        }
    }

    fn post(
        &mut self,
        sender: UserId,
        client_msg_id: Uuid,
        body: String,
        media: Vec<Uuid>,
        direct_peer: Option<UserId>,
        ctx: &mut Context<Self>,
    ) -> Reply {
        if self.record.is_none() {
            match direct_peer {
                Some(peer) if ConversationId::direct(sender, peer) == self.id => {
                    if let Err(e) = self.create_direct(sender, peer) {
                        return done(Err(e));
                    }
                }
                _ => return done(Err(ActorError::UnknownConversation)),
            }
        }
        if let Err(e) = self.is_member(sender) {
            return done(Err(e));
        }
        let store = self.registry.store();
        match store.idempotent_seq(self.id, sender, &client_msg_id) {
            Ok(Some(seq)) => return self.ack_existing(seq),
            Ok(None) => {}
            Err(e) => return done(Err(e.into())),
        }
        if media.len() > MAX_MEDIA_PER_MESSAGE {
            return done(Err(ActorError::BadRequest(format!(
                "at most {MAX_MEDIA_PER_MESSAGE} media per message"
            ))));
        }
        for id in &media {
            if let Err(e) = self.registry.check_media_readable(sender, *id) {
                return done(Err(e));
            }
        }
        // References first: a recovered message always has its media readable here.
        for id in &media {
            if let Err(e) = store.add_media_ref(*id, self.id) {
                return done(Err(e.into()));
            }
        }
        let seq = self.last_seq + 1;
        let message = MessageRecord {
            message_id: Uuid::now_v7(),
            conversation_id: self.id,
            seq,
            sender_id: sender,
            kind: MessageKind::User,
            body,
            media,
            client_msg_id: Some(client_msg_id),
            ts: crate::now_ms(),
        };
        if let Err(e) = self.store_message(&message) {
            // Memory may now be ahead of the disk: restart from storage.
            ctx.stop();
            return done(Err(e.into()));
        }
        let ack = ack_of(&message);
        self.remember(message);
        self.after_commit(move |act, ctx| {
            metrics().messages_in.inc();
            act.durable_seq = act.durable_seq.max(seq);
            act.pump(ctx);
            Ok(ConversationReply::Ack(ack))
        })
    }

    fn create_direct(&mut self, a: UserId, b: UserId) -> Result<(), ActorError> {
        let mut members = vec![a, b];
        members.sort();
        members.dedup();
        let record = ConversationRecord {
            conversation_id: self.id,
            kind: ConversationKind::Direct,
            members,
            created_at: crate::now_ms(),
        };
        self.registry.store().put_conversation(&record)?;
        self.members = record
            .members
            .iter()
            .map(|m| (*m, Member::new(0)))
            .collect();
        self.record = Some(Arc::new(record));
        Ok(())
    }

    /// Writes the fan-out mark (first, so a recovered message always has it) and the
    /// message with its idempotency entry.
    fn store_message(&mut self, message: &MessageRecord) -> Result<(), StorageError> {
        let store = self.registry.store();
        if !self.fanout_marked {
            let done = self.members.values().map(|m| m.done).min().unwrap_or(0);
            store.mark_fanout(self.id, done)?;
            self.fanout_marked = true;
        }
        store.put_message(message)?;
        self.last_seq = message.seq;
        Ok(())
    }

    fn remember(&mut self, message: MessageRecord) {
        self.recent_bytes += message.body.len();
        self.recent.push_back(Arc::new(message));
        while self.recent.len() > RECENT_MESSAGES
            || (self.recent_bytes > RECENT_BYTES && self.recent.len() > 1)
        {
            if let Some(old) = self.recent.pop_front() {
                self.recent_bytes -= old.body.len();
            }
        }
    }

    /// A retried send: the original ack, once the original is durable.
    fn ack_existing(&mut self, seq: u64) -> Reply {
        let message = match self.message(seq) {
            Ok(Some(m)) => m,
            Ok(None) => {
                return done(Err(ActorError::Internal(format!(
                    "idempotency entry points at missing seq {seq}"
                ))))
            }
            Err(e) => return done(Err(e.into())),
        };
        let ack = ack_of(&message);
        if seq <= self.durable_seq {
            return done(Ok(ConversationReply::Ack(ack)));
        }
        self.after_commit(move |_, _| Ok(ConversationReply::Ack(ack)))
    }

    fn message(&self, seq: u64) -> Result<Option<Arc<MessageRecord>>, StorageError> {
        if let Some(first) = self.recent.front() {
            if seq >= first.seq {
                let idx = (seq - first.seq) as usize;
                if let Some(m) = self.recent.get(idx) {
                    return Ok(Some(Arc::clone(m)));
                }
            }
        }
        Ok(self.registry.store().message(self.id, seq)?.map(Arc::new))
    }

    fn after_commit(
        &self,
        then: impl FnOnce(&mut Self, &mut Context<Self>) -> Result<ConversationReply, ActorError>
            + 'static,
    ) -> Reply {
        let store = self.registry.store().clone();
        Box::pin(
            wrap_future::<_, Self>(async move { store.commit(1).await }).map(
                move |res, act, ctx| match res {
                    Ok(()) => then(act, ctx),
                    Err(e) => {
                        ctx.stop();
                        Err(e.into())
                    }
                },
            ),
        )
    }

    /// Sends each member that is behind (and not already waiting on an append) the next
    /// batch of durable messages.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        let Some(record) = self.record.clone() else {
            return;
        };
        let Some(route) = self.registry.route() else {
            return;
        };
        let now = Instant::now();
        let due: Vec<(UserId, u64)> = self
            .members
            .iter()
            .filter(|(_, m)| {
                !m.in_flight && m.done < self.durable_seq && m.retry_at.is_none_or(|t| t <= now)
            })
            .map(|(u, m)| (*u, m.done))
            .collect();
        for (user, from) in due {
            let upto = self.durable_seq.min(from + FANOUT_BATCH);
            let messages = match (from + 1..=upto)
                .map(|s| self.message(s))
                .collect::<Result<Option<Vec<_>>, _>>()
            {
                Ok(Some(m)) => m,
                Ok(None) | Err(_) => {
                    tracing::error!(conversation_id = %self.id, from, upto, "cannot read messages for fan-out");
                    self.retry_later(user);
                    continue;
                }
            };
            if let Some(m) = self.members.get_mut(&user) {
                m.in_flight = true;
            }
            let call = route.user(
                user,
                UserRequest::AppendInbox {
                    conversation_id: self.id,
                    kind: record.kind.clone(),
                    peer: direct_peer(&record, user),
                    messages,
                },
            );
            ctx.spawn(wrap_future::<_, Self>(call).map(move |res, act, ctx| {
                act.appended(user, res, ctx);
            }));
        }
    }

    fn appended(
        &mut self,
        user: UserId,
        res: Result<UserReply, ActorError>,
        ctx: &mut Context<Self>,
    ) {
        let Some(m) = self.members.get_mut(&user) else {
            return;
        };
        m.in_flight = false;
        match res {
            Ok(UserReply::Appended { head }) if head > m.done => {
                m.done = head;
                m.retry_at = None;
                m.backoff = RETRY_MIN;
            }
            Ok(_) => self.retry_later(user),
            Err(e) => {
                tracing::debug!(conversation_id = %self.id, user = %user, error = %e, "fan-out failed; will retry");
                self.retry_later(user);
            }
        }
        self.clear_mark_if_done();
        self.pump(ctx);
    }

    fn retry_later(&mut self, user: UserId) {
        if let Some(m) = self.members.get_mut(&user) {
            m.retry_at = Some(Instant::now() + m.backoff);
            m.backoff = (m.backoff * 2).min(RETRY_MAX);
        }
    }

    fn fanout_complete(&self) -> bool {
        self.durable_seq == self.last_seq && self.members.values().all(|m| m.done >= self.last_seq)
    }

    fn clear_mark_if_done(&mut self) {
        if self.fanout_marked && self.fanout_complete() {
            match self.registry.store().clear_fanout(self.id) {
                Ok(()) => self.fanout_marked = false,
                Err(e) => {
                    tracing::warn!(conversation_id = %self.id, error = %e, "cannot clear fan-out mark")
                }
            }
        }
    }

    fn mark(&mut self, user: UserId, status: ReceiptStatus, seq: u64) -> Reply {
        if let Err(e) = self.is_member(user) {
            return done(Err(e));
        }
        let seq = seq.min(self.durable_seq);
        let mut wm = self
            .written_watermarks
            .get(&user)
            .copied()
            .unwrap_or_default();
        let rose = match status {
            ReceiptStatus::Delivered => seq > wm.delivered,
            ReceiptStatus::Read => seq > wm.read,
        };
        if !rose {
            return done(Ok(ConversationReply::Done));
        }
        // Reading implies delivery.
        wm.delivered = wm.delivered.max(seq);
        if status == ReceiptStatus::Read {
            wm.read = seq;
        }
        if let Err(e) = self.registry.store().put_watermarks(self.id, user, wm) {
            return done(Err(e.into()));
        }
        self.written_watermarks.insert(user, wm);
        // Receipts go out (and views change) only once durable, so they never go
        // backwards after a crash.
        self.after_commit(move |act, _| {
            let shown = act.watermarks.entry(user).or_default();
            shown.delivered = shown.delivered.max(wm.delivered);
            shown.read = shown.read.max(wm.read);
            let (Some(route), Some(record)) = (act.registry.route(), &act.record) else {
                return Ok(ConversationReply::Done);
            };
            notify_others(
                route.as_ref(),
                &record.members,
                user,
                SessionEvent::Receipt {
                    conversation_id: act.id,
                    user_id: user,
                    status,
                    seq,
                },
            );
            Ok(ConversationReply::Done)
        })
    }

    /// Relays "typing" to the other members' live sessions, without storing anything.
    fn typing(&self, user: UserId) -> Result<ConversationReply, ActorError> {
        let record = self.is_member(user)?;
        if let Some(route) = self.registry.route() {
            let event = SessionEvent::Typing {
                conversation_id: self.id,
                user_id: user,
            };
            notify_others(route.as_ref(), &record.members, user, event);
        }
        Ok(ConversationReply::Done)
    }

    fn history(
        &self,
        user: UserId,
        after: Option<u64>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<ConversationReply, ActorError> {
        self.is_member(user)?;
        let ceiling = self.durable_seq.saturating_add(1);
        let before = before.map_or(ceiling, |b| b.min(ceiling));
        let messages = self.registry.store().messages_between(
            self.id,
            after.unwrap_or(0),
            before,
            limit,
            after.is_none(),
        )?;
        Ok(ConversationReply::Messages(messages))
    }

    fn receipts(&self, user: UserId) -> Result<ConversationReply, ActorError> {
        let record = self.is_member(user)?;
        Ok(ConversationReply::Receipts(
            record
                .members
                .iter()
                .map(|m| (*m, self.watermarks.get(m).copied().unwrap_or_default()))
                .collect(),
        ))
    }
}

/// `user`'s peer in a direct conversation (itself for notes to self).
fn direct_peer(record: &ConversationRecord, user: UserId) -> Option<UserId> {
    match record.kind {
        ConversationKind::Direct => Some(
            record
                .members
                .iter()
                .copied()
                .find(|m| *m != user)
                .unwrap_or(user),
        ),
        ConversationKind::Group { .. } => None,
    }
}

/// Pushes `event` to the live sessions of every member but `except`, without waiting:
/// receipts and typing are best-effort signals, not stored state.
fn notify_others(route: &dyn Route, members: &[UserId], except: UserId, event: SessionEvent) {
    for member in members.iter().filter(|m| **m != except) {
        let call = route.user(
            *member,
            UserRequest::Notify {
                event: event.clone(),
            },
        );
        actix::spawn(async move {
            let _ = call.await;
        });
    }
}

fn ack_of(m: &MessageRecord) -> Ack {
    Ack {
        client_msg_id: m.client_msg_id.unwrap_or_default(),
        message_id: m.message_id,
        conversation_id: m.conversation_id,
        seq: m.seq,
        ts: m.ts,
    }
}

fn done(r: Result<ConversationReply, ActorError>) -> Reply {
    Box::pin(ready(r))
}

/// Reads durable messages straight from storage. Messages never change once stored,
/// so this needs no actor: it serves inbox replay without waking conversations.
pub fn read_messages(
    registry: &Registry,
    id: ConversationId,
    seqs: &[u64],
) -> Result<Vec<MessageRecord>, ActorError> {
    let store = registry.store();
    let mut out = Vec::with_capacity(seqs.len());
    for seq in seqs {
        if let Some(m) = store.message(id, *seq)? {
            out.push(m);
        }
    }
    Ok(out)
}

impl Actor for ConversationActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        metrics().actors.with_label_values(&["conversation"]).inc();
        // What we loaded may be in sled's memory but not yet on disk: serve nothing
        // until a flush covers it (see `Registry::wait_durable`).
        let registry = Arc::clone(&self.registry);
        registry.wait_durable(ctx, |act: &mut Self, e| act.load_error = Some(e));
        self.pump(ctx);
        ctx.run_interval(TICK, |act, ctx| {
            act.pump(ctx);
            let busy = act.members.values().any(|m| m.in_flight) || !act.fanout_complete();
            if !busy && act.last_call.elapsed() >= IDLE_AFTER {
                ctx.stop();
            }
        });
    }

    fn stopping(&mut self, ctx: &mut Context<Self>) -> Running {
        self.registry.forget_conversation(self.id, &ctx.address());
        Running::Stop
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        metrics().actors.with_label_values(&["conversation"]).dec();
    }
}

impl Handler<ConversationCall> for ConversationActor {
    type Result = Reply;

    fn handle(
        &mut self,
        ConversationCall(req): ConversationCall,
        ctx: &mut Context<Self>,
    ) -> Reply {
        self.last_call = Instant::now();
        if let Some(e) = &self.load_error {
            ctx.stop();
            return done(Err(e.clone()));
        }
        match req {
            ConversationRequest::Post {
                sender,
                client_msg_id,
                body,
                media,
                direct_peer,
            } => self.post(sender, client_msg_id, body, media, direct_peer, ctx),
            ConversationRequest::Mark { user, status, seq } => self.mark(user, status, seq),
            ConversationRequest::History {
                user,
                after,
                before,
                limit,
            } => done(self.history(user, after, before, limit)),
            ConversationRequest::Receipts { user } => done(self.receipts(user)),
            ConversationRequest::View { user } => {
                done(self.is_member(user).map(|_| ConversationReply::View {
                    last_seq: self.durable_seq,
                    watermarks: self.watermarks.get(&user).copied().unwrap_or_default(),
                }))
            }
            ConversationRequest::Typing { user } => done(self.typing(user)),
            ConversationRequest::Resume => {
                // A crash between the two writes of `clear_fanout` can leave the node's
                // index entry without the mark: clear it, or it wakes us at every start.
                if !self.fanout_marked {
                    if let Err(e) = self.registry.store().clear_fanout(self.id) {
                        tracing::warn!(conversation_id = %self.id, error = %e, "cannot clear fan-out index");
                    }
                }
                self.pump(ctx);
                done(Ok(ConversationReply::Done))
            }
        }
    }
}
