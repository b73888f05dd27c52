//! The Conversation actor: one per conversation, on the conversation's home node.
//!
//! Owns the message sequence (1, 2, 3... no gaps), the idempotency index
//! (sender + `client_msg_id` -> the first ack), the per-member delivered/read
//! watermarks, and the fan-out of each stored message to every member's inbox. For a
//! group's conversation it also holds the member list the Group actor gives it and
//! each member's stays (which seqs it may receive): a membership change is a `system`
//! message written in the same batch as the new member list, so it takes its place in
//! the seq order like any other message.
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
//! every message of its stays exactly once (a member removed gets its removal, then
//! nothing more). A persistent "fan-out pending" mark is set before the
//! first message of a burst is written and cleared once all members have it; after a
//! restart the node wakes every marked conversation and the fan-out resumes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::fut::{ready, wrap_future};
use actix::prelude::*;
use uuid::Uuid;

use super::error::ActorError;
use super::messages::*;
use super::registry::Registry;
use super::route::Route;
use super::sequence::{change_spans, next_run, prev_entitled, Span};
use crate::ids::{ConversationId, GroupId, UserId};
use crate::metrics::metrics;
use crate::storage::{
    ConversationKind, ConversationRecord, GroupMembership, MemberSpan, MessageKind, MessageRecord,
    StorageError, Watermarks,
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
pub const MAX_MEDIA_PER_MESSAGE: usize = 32;
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How far fan-out may get past the fan-out mark's resume point before the mark is
/// moved up (so a restart does not re-send a long-running conversation from its start).
const MARK_REFRESH: u64 = 1024;

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
    /// Fan-out progress of every member, and of former members until they have
    /// everything up to their removal.
    members: HashMap<UserId, Member>,
    /// Members with something left to receive: added when a pump finds them behind,
    /// removed when one finds them caught up.
    behind: HashSet<UserId>,
    /// Group conversations: the group's membership version applied here, and each
    /// (former) member's stays. Empty for direct conversations, whose members are
    /// there from seq 1 on.
    membership_version: u64,
    spans: HashMap<UserId, Vec<Span>>,
    /// The newest messages, ascending by seq, for fan-out without reads.
    recent: VecDeque<Arc<MessageRecord>>,
    /// Body bytes held in `recent`.
    recent_bytes: usize,
    /// Whether the persistent fan-out-pending mark is set, and the resume point it
    /// holds.
    fanout_marked: bool,
    mark_done: u64,
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
            behind: HashSet::new(),
            membership_version: 0,
            spans: HashMap::new(),
            recent: VecDeque::new(),
            recent_bytes: 0,
            fanout_marked: false,
            mark_done: 0,
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
        self.mark_done = done;
        let membership = store.membership(self.id)?;
        self.membership_version = membership.version;
        for s in membership.spans {
            self.spans.entry(s.user).or_default().push(Span {
                from: s.from,
                until: s.until,
            });
        }
        // Everyone who may still be owed messages restarts from the mark; the idempotent
        // inbox append skips what they already have.
        self.members = record
            .members
            .iter()
            .chain(self.spans.keys())
            .map(|m| (*m, Member::new(done)))
            .collect();
        Ok(())
    }

    fn is_group(&self) -> bool {
        matches!(
            self.record.as_ref().map(|r| &r.kind),
            Some(ConversationKind::Group { .. })
        )
    }

    /// `user`'s stays: for a direct conversation, the whole of it.
    fn stays(&self, user: UserId) -> &[Span] {
        if self.is_group() {
            self.spans.get(&user).map_or(&[][..], Vec::as_slice)
        } else {
            std::slice::from_ref(&Span::ALWAYS)
        }
    }

    /// The next run of seqs `user` should receive after `done`: `(from, upto, prev)`,
    /// `prev` being the entitled seq its inbox must already hold.
    ///
    /// A member served on this node may be sent messages that are written but not yet
    /// flushed: its inbox append lands in the same store after them, and it shows
    /// nothing until a flush covers the append, which then covers the messages too.
    /// Delivery so waits for one flush, not two. A member elsewhere (or being moved,
    /// or handed off, in a ring change) gets only flushed messages: another node's
    /// flush covers nothing of ours. (A call that starts here and is then held for a
    /// move is safe too: the move commits here before held calls go on.)
    fn run_for(&self, user: UserId, done: u64) -> Option<(u64, u64, u64)> {
        let stays = self.stays(user);
        let written_here = || {
            self.registry
                .route()
                .is_some_and(|route| route.served_here(user))
        };
        let upto = if self.durable_seq < self.last_seq && written_here() {
            self.last_seq
        } else {
            self.durable_seq
        };
        next_run(stays, done, upto, FANOUT_BATCH)
            .map(|(from, upto)| (from, upto, prev_entitled(stays, from)))
    }

    /// Where `user`'s current stay began: the first seq its history may show.
    fn joined_at(&self, user: UserId) -> u64 {
        self.spans
            .get(&user)
            .and_then(|s| s.last())
            .filter(|s| s.until.is_none())
            .map_or(1, |s| s.from)
    }

    /// The seq of a former member's removal (the end of its last stay).
    fn removed_at(&self, user: UserId) -> Option<u64> {
        self.spans
            .get(&user)
            .and_then(|s| s.last())
            .and_then(|s| s.until)
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
        // A retry of a stored send gets its ack even if the sender has since left the
        // group: the message was sent while it was a member. (Only the sender's own
        // ids are looked up, so this tells a stranger nothing.)
        let store = self.registry.store();
        match store.idempotent_seq(self.id, sender, &client_msg_id) {
            Ok(Some(seq)) => return self.ack_existing(seq),
            Ok(None) => {}
            Err(e) => return done(Err(e.into())),
        }
        if let Err(e) = self.is_member(sender) {
            return done(Err(e));
        }
        // The media were checked, and their references to this conversation recorded
        // durably, at their home node before the session posted (see
        // `Registry::reference_media`): a stored message's media are always readable by
        // the conversation's members.
        if media.len() > MAX_MEDIA_PER_MESSAGE {
            return done(Err(ActorError::BadRequest(format!(
                "at most {MAX_MEDIA_PER_MESSAGE} media per message"
            ))));
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
        // Members on this node get it now (see `run_for`); the others once it is flushed.
        self.pump(ctx);
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
        self.mark_pending()?;
        self.registry.store().put_message(message)?;
        self.last_seq = message.seq;
        Ok(())
    }

    /// Sets the persistent fan-out-pending mark, unless it is set: written before the
    /// message it covers, so a recovered message always has it.
    fn mark_pending(&mut self) -> Result<(), StorageError> {
        if !self.fanout_marked {
            let done = self.members.values().map(|m| m.done).min().unwrap_or(0);
            self.registry.store().mark_fanout(self.id, done)?;
            self.fanout_marked = true;
            self.mark_done = done;
        }
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

    /// Finds every member with messages to receive and sends each one that is not
    /// already waiting on an append its next run of durable messages.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        let users: Vec<UserId> = self.members.keys().copied().collect();
        for user in users {
            self.pump_one(user, ctx);
        }
    }

    /// Sends `user` its next run, if it has one and no append is in flight.
    fn pump_one(&mut self, user: UserId, ctx: &mut Context<Self>) {
        let Some(m) = self.members.get(&user) else {
            return;
        };
        let Some((from, upto, prev)) = self.run_for(user, m.done) else {
            self.behind.remove(&user);
            // A former member that has everything up to its removal is done with. (Not
            // merely "nothing due now": its removal may not be durable yet.)
            let delivered = self
                .removed_at(user)
                .is_some_and(|until| m.done >= until && until <= self.durable_seq);
            if delivered {
                self.members.remove(&user);
            }
            return;
        };
        self.behind.insert(user);
        if m.in_flight || m.retry_at.is_some_and(|t| t > Instant::now()) {
            return;
        }
        let (Some(record), Some(route)) = (self.record.clone(), self.registry.route()) else {
            return;
        };
        let messages = match (from..=upto)
            .map(|s| self.message(s))
            .collect::<Result<Option<Vec<_>>, _>>()
        {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => {
                tracing::error!(conversation_id = %self.id, from, upto, "cannot read messages for fan-out");
                self.retry_later(user);
                return;
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
                prev,
                messages,
            },
        );
        // Each append runs as its own task and reports back through the mailbox. Not
        // `ctx.spawn`: an actix context polls every future it holds each time any of
        // them wakes, so a thousand appends in flight cost a thousand polls per wake.
        // (Measured: no visible change in the fan-out figure, which other costs bound;
        // see docs/BENCHMARKS.md.)
        let me = ctx.address();
        actix::spawn(async move {
            me.do_send(Appended {
                user,
                result: call.await,
            });
        });
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
            // The inbox refused the run: it lacks an earlier seq (its data was restored
            // or moved behind us). Go back to its head; the next run fills the gap.
            Ok(UserReply::Appended { head }) if head < m.done => {
                tracing::warn!(conversation_id = %self.id, user = %user, head, done = m.done, "inbox behind fan-out; re-sending from its head");
                m.done = head;
            }
            Ok(_) => self.retry_later(user),
            Err(e) => {
                tracing::debug!(conversation_id = %self.id, user = %user, error = %e, "fan-out failed; will retry");
                self.retry_later(user);
            }
        }
        self.pump_one(user, ctx);
    }

    fn retry_later(&mut self, user: UserId) {
        if let Some(m) = self.members.get_mut(&user) {
            m.retry_at = Some(Instant::now() + m.backoff);
            m.backoff = (m.backoff * 2).min(RETRY_MAX);
        }
    }

    fn fanout_complete(&self) -> bool {
        self.durable_seq == self.last_seq && self.behind.is_empty()
    }

    /// Clears the fan-out mark once every member has everything, or moves its resume
    /// point up once fan-out is far past it. Done on the tick, not per message: a
    /// conversation that keeps talking would otherwise write and remove its mark
    /// around every message.
    fn settle_mark(&mut self) {
        if !self.fanout_marked {
            return;
        }
        let result = if self.fanout_complete() {
            self.registry
                .store()
                .clear_fanout(self.id)
                .map(|()| self.fanout_marked = false)
        } else {
            // Every member's `done` is a head its inbox confirmed durable, so the
            // smallest is a safe place to resume from.
            let done = self.members.values().map(|m| m.done).min().unwrap_or(0);
            if done < self.mark_done + MARK_REFRESH {
                return;
            }
            self.registry
                .store()
                .mark_fanout(self.id, done)
                .map(|()| self.mark_done = done)
        };
        if let Err(e) = result {
            tracing::warn!(conversation_id = %self.id, error = %e, "cannot update fan-out mark");
        }
    }

    /// Applies the group's membership change `version` (see
    /// [`ConversationRequest::ApplyMembership`]).
    fn apply_membership(
        &mut self,
        group_id: GroupId,
        version: u64,
        members: Vec<UserId>,
        by: UserId,
        body: String,
        ctx: &mut Context<Self>,
    ) -> Reply {
        match self.record.as_ref().map(|r| &r.kind) {
            None if version == 1 && group_id.conversation() == self.id => {}
            Some(ConversationKind::Group { group_id: g }) if *g == group_id => {}
            _ => {
                return done(Err(ActorError::Internal(format!(
                    "conversation {} does not belong to group {group_id}",
                    self.id
                ))))
            }
        }
        if version <= self.membership_version {
            // Already applied (a retry): answer once it is durable.
            return self.after_commit(|_, _| Ok(ConversationReply::Done));
        }
        let seq = self.last_seq + 1;
        let mut spans = self.spans.clone();
        change_spans(&mut spans, &members, seq);
        // Stays that fan-out has delivered in full need not be kept, except each
        // member's latest: its end is the `prev` of the member's next run.
        for (user, stays) in spans.iter_mut() {
            let done = self.members.get(user).map_or(u64::MAX, |m| m.done);
            let latest = stays.pop();
            stays.retain(|s| s.until.is_none_or(|until| until > done));
            stays.extend(latest);
        }
        let record = ConversationRecord {
            conversation_id: self.id,
            kind: ConversationKind::Group { group_id },
            members,
            created_at: self
                .record
                .as_ref()
                .map_or_else(crate::now_ms, |r| r.created_at),
        };
        let membership = GroupMembership {
            version,
            spans: spans
                .iter()
                .flat_map(|(user, stays)| {
                    stays.iter().map(|s| MemberSpan {
                        user: *user,
                        from: s.from,
                        until: s.until,
                    })
                })
                .collect(),
        };
        let message = MessageRecord {
            message_id: Uuid::now_v7(),
            conversation_id: self.id,
            seq,
            sender_id: by,
            kind: MessageKind::System,
            body,
            media: Vec::new(),
            client_msg_id: None,
            ts: crate::now_ms(),
        };
        let written = self.mark_pending().and_then(|()| {
            self.registry
                .store()
                .apply_membership(&record, &membership, &message)
        });
        if let Err(e) = written {
            ctx.stop();
            return done(Err(e.into()));
        }
        // Newcomers start just before their arrival; a former member coming back
        // keeps its progress, so it still gets the rest of its earlier stay.
        for user in &record.members {
            self.members
                .entry(*user)
                .or_insert_with(|| Member::new(seq - 1));
        }
        self.spans = spans;
        self.membership_version = version;
        self.record = Some(Arc::new(record));
        self.last_seq = seq;
        self.remember(message);
        self.after_commit(move |act, ctx| {
            act.durable_seq = act.durable_seq.max(seq);
            act.pump(ctx);
            Ok(ConversationReply::Done)
        })
    }

    /// The conversation as `user` sees it: a member, up to the last seq; a former
    /// member of the group, up to its removal, with the watermarks it had.
    fn view(&self, user: UserId) -> Result<ConversationReply, ActorError> {
        let last_seq = match self.is_member(user) {
            Ok(_) => self.durable_seq,
            Err(ActorError::NotMember) => self
                .removed_at(user)
                .map(|until| until.min(self.durable_seq))
                .ok_or(ActorError::NotMember)?,
            Err(e) => return Err(e),
        };
        Ok(ConversationReply::View {
            last_seq,
            watermarks: self.watermarks.get(&user).copied().unwrap_or_default(),
        })
    }

    fn shared_members(&self, user: UserId, targets: Vec<UserId>) -> ConversationReply {
        let shared = match &self.record {
            Some(r) if r.members.contains(&user) => {
                let members: HashSet<&UserId> = r.members.iter().collect();
                targets
                    .into_iter()
                    .filter(|t| members.contains(t))
                    .collect()
            }
            _ => Vec::new(),
        };
        ConversationReply::Users(shared)
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
        // Reading implies delivery: a read that raises the delivered watermark too
        // announces both, delivered first.
        let delivered_rose = seq > wm.delivered;
        wm.delivered = wm.delivered.max(seq);
        if status == ReceiptStatus::Read {
            wm.read = seq;
        }
        let mut statuses = Vec::with_capacity(2);
        if delivered_rose {
            statuses.push(ReceiptStatus::Delivered);
        }
        if status == ReceiptStatus::Read {
            statuses.push(ReceiptStatus::Read);
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
            for status in statuses {
                let event = SessionEvent::Receipt {
                    conversation_id: act.id,
                    user_id: user,
                    status,
                    seq,
                };
                notify_others(route.as_ref(), &record.members, user, event);
            }
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
        // A group member reads from its arrival on, as its inbox does.
        let floor = self.joined_at(user) - 1;
        let messages = self.registry.store().messages_between(
            self.id,
            after.unwrap_or(0).max(floor),
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
/// receipts and typing are best-effort signals, not stored state (receipts can be read
/// back over HTTP).
fn notify_others(route: &dyn Route, members: &[UserId], except: UserId, event: SessionEvent) {
    for member in members.iter().filter(|m| **m != except) {
        route.notify(*member, event.clone());
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
        // Fan-out starts only then: a message in sled's memory but not on disk must not
        // reach an inbox (a crash would give its seq to another message).
        registry.wait_durable(
            ctx,
            |act: &mut Self, e| act.load_error = Some(e),
            |act, ctx| act.pump(ctx),
        );
        ctx.run_interval(TICK, |act, ctx| {
            act.pump(ctx);
            act.settle_mark();
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

/// The outcome of one member's inbox append, reported by its task.
#[derive(Message)]
#[rtype(result = "()")]
struct Appended {
    user: UserId,
    result: Result<UserReply, ActorError>,
}

impl Handler<Appended> for ConversationActor {
    type Result = ();

    fn handle(&mut self, Appended { user, result }: Appended, ctx: &mut Context<Self>) {
        self.appended(user, result, ctx);
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
            ConversationRequest::View { user } => done(self.view(user)),
            ConversationRequest::IsMember { user } => {
                done(self.is_member(user).map(|_| ConversationReply::Done))
            }
            ConversationRequest::Typing { user } => done(self.typing(user)),
            ConversationRequest::ApplyMembership {
                group_id,
                version,
                members,
                by,
                body,
            } => self.apply_membership(group_id, version, members, by, body, ctx),
            ConversationRequest::SharedMembers { user, targets } => {
                done(Ok(self.shared_members(user, targets)))
            }
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

impl Handler<Kill> for ConversationActor {
    type Result = ();

    fn handle(&mut self, _: Kill, _: &mut Context<Self>) {
        panic!("chaos: killed by POST /admin/chaos/kill");
    }
}

impl Handler<Retire> for ConversationActor {
    type Result = ();

    /// What fan-out was in flight resumes at the new home, from the stored mark.
    fn handle(&mut self, _: Retire, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
