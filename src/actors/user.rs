//! The User actor: one per user, on the user's home node.
//!
//! Owns the user's profile and tokens, its inbox (the ordered log of every message in
//! every conversation of the user, with its own `inbox_seq`), the per-conversation
//! heads that make inbox appends idempotent, and the user's live sessions (and so its
//! presence).
//!
//! Invariants:
//! - `inbox_seq` has no gaps; an entry is pushed to sessions only once it is durable,
//!   so no device ever sees an inbox entry that a crash could take back.
//! - a conversation's messages enter the inbox in seq order, each once (see
//!   [`accept_run`]).
//! - a session goes live exactly at the inbox head it was synced to; it then receives
//!   every later entry, in order, once.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::fut::{ready, wrap_future};
use actix::prelude::*;

use super::auth;
use super::error::ActorError;
use super::messages::*;
use super::registry::Registry;
use super::route::Delivery;
use super::sequence::accept_run;
use crate::ids::{ConversationId, UserId};
use crate::metrics::metrics;
use crate::storage::{
    ConversationKind, InboxRun, KeyBundle, MessageRecord, TokenRecord, UserConversation, UserRecord,
};

/// An actor with no sessions and no calls for this long stops.
const IDLE_AFTER: Duration = Duration::from_secs(60);
const IDLE_CHECK: Duration = Duration::from_secs(10);
/// Longest inbox page a sync may ask for.
const MAX_SYNC_PAGE: usize = 512;
/// Inbox entries between two checkpoints of the conversation heads: what a load may
/// have to replay to find them.
const CHECKPOINT_EVERY: u64 = 4096;

type Reply = ResponseActFuture<UserActor, Result<UserReply, ActorError>>;

struct Session {
    session: SessionRef,
    token: TokenHash,
    /// Receives pushes (set once its sync reached the head).
    live: bool,
}

pub struct UserActor {
    id: UserId,
    registry: Arc<Registry>,
    /// Set if loading from storage failed: every call answers it, then the actor stops.
    load_error: Option<ActorError>,
    record: Option<UserRecord>,
    tokens: HashMap<TokenHash, i64>,
    /// Next inbox seq to assign.
    next_inbox: u64,
    /// Highest inbox seq known flushed.
    durable_inbox: u64,
    conversations: HashMap<ConversationId, UserConversation>,
    /// The inbox seq up to which the stored conversation heads are exact, and the
    /// conversations whose head moved past it (see `checkpoint`).
    heads_at: u64,
    dirty_heads: HashSet<ConversationId>,
    /// Appended entries waiting for their flush before they are pushed.
    unflushed: VecDeque<(u64, Arc<MessageRecord>)>,
    sessions: Vec<Session>,
    contacts: BTreeSet<UserId>,
    /// Sessions (of other users) watching this user's presence.
    watchers: Vec<SessionRef>,
    last_call: Instant,
}

/// Most one-time prekeys stored for one user.
pub const MAX_PREKEYS: usize = 10_000;

/// Most sessions that may watch one user's presence at once.
const MAX_WATCHERS: usize = 10_000;

impl UserActor {
    /// Builds the actor from storage; called on its arbiter.
    pub(crate) fn load(id: UserId, registry: Arc<Registry>) -> Self {
        let mut actor = UserActor {
            id,
            registry,
            load_error: None,
            record: None,
            tokens: HashMap::new(),
            next_inbox: 1,
            durable_inbox: 0,
            conversations: HashMap::new(),
            heads_at: 0,
            dirty_heads: HashSet::new(),
            unflushed: VecDeque::new(),
            sessions: Vec::new(),
            contacts: BTreeSet::new(),
            watchers: Vec::new(),
            last_call: Instant::now(),
        };
        if let Err(e) = actor.load_state() {
            tracing::error!(user = %id, error = %e, "cannot load user");
            actor.load_error = Some(e);
        }
        actor
    }

    fn load_state(&mut self) -> Result<(), ActorError> {
        let store = self.registry.store();
        self.record = store.user(self.id)?;
        if self.record.is_none() {
            return Ok(());
        }
        let now = crate::now_ms();
        for (hash, token) in store.tokens(self.id)? {
            if token.expires_at > now {
                self.tokens.insert(hash, token.expires_at);
            } else {
                // Expired tokens are pruned here, so they never pile up on disk.
                store.remove_token(self.id, &hash)?;
            }
        }
        self.contacts = store.contacts(self.id)?.into_iter().collect();
        let head = store.inbox_head(self.id)?;
        self.durable_inbox = head;
        self.next_inbox = head + 1;
        self.conversations = store
            .user_conversations(self.id)?
            .into_iter()
            .map(|c| (c.conversation_id, c))
            .collect();
        // Heads are stored only at checkpoints: the inbox past the last one says how far
        // each conversation got since.
        self.heads_at = store.heads_at(self.id)?.min(head);
        for (_, entry) in store.inbox_range(self.id, self.heads_at, head, usize::MAX)? {
            let Some(conv) = self.conversations.get_mut(&entry.conversation_id) else {
                return Err(ActorError::Internal(format!(
                    "inbox entry for conversation {} without its record",
                    entry.conversation_id
                )));
            };
            if entry.seq > conv.head {
                conv.head = entry.seq;
                self.dirty_heads.insert(entry.conversation_id);
            }
        }
        Ok(())
    }

    fn profile(&self) -> Option<UserProfile> {
        self.record.as_ref().map(|r| UserProfile {
            user_id: r.user_id,
            handle: r.handle.clone(),
            display_name: r.display_name.clone(),
            online: !self.sessions.is_empty(),
            last_seen: r.last_seen,
        })
    }

    fn token_valid(&self, token: &TokenHash) -> bool {
        self.tokens
            .get(token)
            .is_some_and(|exp| *exp > crate::now_ms())
    }

    /// Waits for the group commit, then maps the outcome. On a storage failure the
    /// actor stops: its memory may be ahead of the disk, and a fresh start reloads.
    fn after_commit(
        &self,
        weight: u32,
        then: impl FnOnce(&mut Self, &mut Context<Self>) -> Result<UserReply, ActorError> + 'static,
    ) -> Reply {
        let store = self.registry.store().clone();
        Box::pin(
            wrap_future::<_, Self>(async move { store.commit(weight).await }).map(
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

    fn create(&mut self, handle: String, display_name: String, password_hash: String) -> Reply {
        if let Some(r) = &self.record {
            // A retried Create for the same handle is answered, not refused.
            return if r.handle == handle {
                done(
                    self.profile()
                        .map(UserReply::Profile)
                        .ok_or(ActorError::UnknownUser),
                )
            } else {
                done(Err(ActorError::Internal("user id already in use".into())))
            };
        }
        let record = UserRecord {
            user_id: self.id,
            handle,
            display_name,
            password_hash,
            created_at: crate::now_ms(),
            last_seen: None,
        };
        if let Err(e) = self.registry.store().put_user(&record) {
            return done(Err(e.into()));
        }
        self.record = Some(record);
        self.after_commit(1, |act, _| {
            act.profile()
                .ok_or(ActorError::UnknownUser)
                .map(UserReply::Profile)
        })
    }

    /// Checks the password (off the actor's thread): `Done`, or `invalid_credentials`.
    fn check_password(&self, password: String) -> Reply {
        let Some(phc) = self.record.as_ref().map(|r| r.password_hash.clone()) else {
            return done(Err(ActorError::InvalidCredentials));
        };
        let verify = auth::verify_password_bounded(password, phc);
        Box::pin(wrap_future::<_, Self>(verify).map(|ok, _, _| {
            ok.then_some(UserReply::Done)
                .ok_or(ActorError::InvalidCredentials)
        }))
    }

    fn login(&mut self, password: String) -> Reply {
        Box::pin(self.check_password(password).then(|checked, act, _| {
            if let Err(e) = checked {
                return done(Err(e));
            }
            let (token, hash) = auth::new_token(act.id);
            let expires_at = crate::now_ms() + auth::TOKEN_LIFETIME_MS;
            if let Err(e) =
                act.registry
                    .store()
                    .put_token(act.id, &hash, TokenRecord { expires_at })
            {
                return done(Err(e.into()));
            }
            act.tokens.insert(hash, expires_at);
            act.after_commit(1, move |_, _| Ok(UserReply::Token { token, expires_at }))
        }))
    }

    fn logout(&mut self, token: TokenHash) -> Reply {
        if self.tokens.remove(&token).is_none() {
            return done(Err(ActorError::Unauthorized));
        }
        if let Err(e) = self.registry.store().remove_token(self.id, &token) {
            return done(Err(e.into()));
        }
        let route = self.registry.route();
        let mut closed = Vec::new();
        self.sessions.retain(|s| {
            let keep = s.token != token;
            if !keep {
                closed.push(s.session.clone());
            }
            keep
        });
        if let Some(route) = route {
            for s in &closed {
                route.deliver(
                    self.id,
                    s,
                    SessionEvent::Close {
                        code: 1008,
                        reason: "token revoked".into(),
                    },
                );
            }
        }
        if !closed.is_empty() && self.sessions.is_empty() {
            self.went_offline();
        }
        self.after_commit(1, |_, _| Ok(UserReply::Done))
    }

    fn attach(&mut self, session: SessionRef, token: TokenHash) -> Result<UserReply, ActorError> {
        if !self.token_valid(&token) {
            return Err(ActorError::Unauthorized);
        }
        if !self.sessions.iter().any(|s| s.session == session) {
            self.sessions.push(Session {
                session,
                token,
                live: false,
            });
            if self.sessions.len() == 1 {
                self.publish_presence();
            }
        }
        Ok(UserReply::Done)
    }

    /// Forgets a session: one of the user's own, or one watching its presence.
    fn detach(&mut self, session: &SessionRef) {
        self.forget_sessions(|s| s == session);
    }

    /// Forgets every session on `node`, which this node can no longer reach: their
    /// clients were disconnected there and will reconnect and sync.
    fn detach_node(&mut self, node: &str) {
        self.forget_sessions(|s| s.node == node);
    }

    /// Drops the sessions (own and watching) that `gone` picks; the user goes offline
    /// if that was its last.
    /// Closes (1012) every live session of this user, and every session watching its
    /// presence, wherever they are.
    fn close_sessions(&mut self, reason: &str) {
        let Some(route) = self.registry.route() else {
            return;
        };
        let close = SessionEvent::Close {
            code: 1012,
            reason: reason.to_string(),
        };
        for s in self.sessions.drain(..) {
            route.deliver(self.id, &s.session, close.clone());
        }
        for w in self.watchers.drain(..) {
            route.deliver_to_watcher(&w, close.clone());
        }
    }

    fn forget_sessions(&mut self, gone: impl Fn(&SessionRef) -> bool) {
        self.watchers.retain(|w| !gone(w));
        let before = self.sessions.len();
        self.sessions.retain(|s| !gone(&s.session));
        if before > 0 && self.sessions.is_empty() {
            self.went_offline();
        }
    }

    /// The last session ended: persist `last_seen`. Not waited on: the next group
    /// commit (or sled's periodic flush) carries it.
    fn went_offline(&mut self) {
        if let Some(r) = &mut self.record {
            r.last_seen = Some(crate::now_ms());
            if let Err(e) = self.registry.store().put_user(r) {
                tracing::warn!(user = %self.id, error = %e, "cannot persist last_seen");
            }
        }
        self.publish_presence();
    }

    /// Pushes the current presence to every watcher; forgets the ones that are gone.
    fn publish_presence(&mut self) {
        let (Some(route), Some(p)) = (self.registry.route(), self.profile()) else {
            return;
        };
        let event = SessionEvent::Presence {
            user_id: self.id,
            online: p.online,
            last_seen: p.last_seen,
        };
        self.watchers
            .retain(|w| route.deliver_to_watcher(w, event.clone()) != Delivery::Gone);
    }

    fn watch_presence(&mut self, session: SessionRef) -> Result<UserReply, ActorError> {
        if !self.watchers.contains(&session) {
            if self.watchers.len() >= MAX_WATCHERS {
                return Err(ActorError::BadRequest("too many presence watchers".into()));
            }
            self.watchers.push(session);
        }
        self.profile()
            .map(UserReply::Profile)
            .ok_or(ActorError::UnknownUser)
    }

    /// Whose presence this user may watch among `targets`: itself, its contacts, the
    /// peers of its direct conversations, and the members of its groups (asked of each
    /// group's conversation, which knows the current members).
    fn visible(&self, targets: Vec<UserId>) -> Reply {
        let peers: BTreeSet<UserId> = self
            .conversations
            .values()
            .filter_map(|c| c.peer_id)
            .collect();
        let (mut seen, rest): (Vec<UserId>, Vec<UserId>) = targets
            .into_iter()
            .partition(|t| *t == self.id || peers.contains(t) || self.contacts.contains(t));
        let groups: Vec<ConversationId> = self
            .conversations
            .values()
            .filter(|c| matches!(c.kind, ConversationKind::Group { .. }))
            .map(|c| c.conversation_id)
            .collect();
        if rest.is_empty() || groups.is_empty() {
            return done(Ok(UserReply::Users(seen)));
        }
        let Some(route) = self.registry.route() else {
            return done(Ok(UserReply::Users(seen)));
        };
        let asks = groups.into_iter().map(|cid| {
            route.conversation(
                cid,
                ConversationRequest::SharedMembers {
                    user: self.id,
                    targets: rest.clone(),
                },
            )
        });
        let all = futures_util::future::join_all(asks);
        Box::pin(wrap_future::<_, Self>(all).map(move |answers, _, _| {
            let mut shared = BTreeSet::new();
            for answer in answers {
                match answer {
                    Ok(ConversationReply::Users(users)) => shared.extend(users),
                    Ok(_) => {}
                    // A group that cannot answer now hides its members; the caller
                    // hears `not_member` for them and may subscribe again.
                    Err(e) => {
                        tracing::debug!(error = %e, "group did not answer a visibility check")
                    }
                }
            }
            seen.extend(rest.into_iter().filter(|t| shared.contains(t)));
            Ok(UserReply::Users(seen))
        }))
    }

    fn add_contact(&mut self, contact: UserId) -> Reply {
        if contact == self.id {
            return done(Err(ActorError::BadRequest(
                "cannot add yourself as a contact".into(),
            )));
        }
        let Some(route) = self.registry.route() else {
            return done(Err(ActorError::Unavailable));
        };
        // The contact must exist; ask its owner, then record it.
        let check = route.user(contact, UserRequest::Profile);
        Box::pin(wrap_future::<_, Self>(check).then(move |res, act, _| {
            if let Err(e) = res {
                return done(Err(e));
            }
            if let Err(e) = act
                .registry
                .store()
                .put_contact(act.id, contact, crate::now_ms())
            {
                return done(Err(e.into()));
            }
            act.contacts.insert(contact);
            act.after_commit(1, |act, _| Ok(act.contact_list()))
        }))
    }

    fn remove_contact(&mut self, contact: UserId) -> Reply {
        if self.contacts.remove(&contact) {
            if let Err(e) = self.registry.store().remove_contact(self.id, contact) {
                return done(Err(e.into()));
            }
        }
        self.after_commit(1, |act, _| Ok(act.contact_list()))
    }

    fn put_keys(&mut self, bundle: KeyBundle, prekeys: Vec<String>) -> Reply {
        let store = self.registry.store();
        let result = store.key_bundle(self.id).and_then(|old| {
            // A new identity key makes the old one-time prekeys useless: replace them.
            let replace = old.is_none_or(|o| o.identity_key != bundle.identity_key);
            let kept = if replace {
                0
            } else {
                store.prekey_count(self.id)?
            };
            if kept + prekeys.len() > MAX_PREKEYS {
                return Ok(Err(ActorError::BadRequest(format!(
                    "at most {MAX_PREKEYS} one-time prekeys may be stored ({kept} are)"
                ))));
            }
            store.put_keys(self.id, &bundle, &prekeys, replace).map(Ok)
        });
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return done(Err(e)),
            Err(e) => return done(Err(e.into())),
        }
        self.after_commit(1, |_, _| Ok(UserReply::Done))
    }

    /// Hands out the bundle with one prekey. The prekey is removed and the removal
    /// flushed before the answer, so not even a crash hands it out twice; claims are
    /// serialised by this actor's mailbox.
    fn claim_keys(&mut self) -> Reply {
        let store = self.registry.store();
        let bundle = match store.key_bundle(self.id) {
            Ok(Some(b)) => b,
            Ok(None) => return done(Err(ActorError::NoKeys)),
            Err(e) => return done(Err(e.into())),
        };
        let prekey = match store.take_prekey(self.id) {
            Ok(p) => p,
            Err(e) => return done(Err(e.into())),
        };
        self.after_commit(1, move |_, _| Ok(UserReply::Keys { bundle, prekey }))
    }

    fn contact_list(&self) -> UserReply {
        UserReply::Users(self.contacts.iter().copied().collect())
    }

    fn sync_page(
        &mut self,
        session: &SessionRef,
        after: u64,
        limit: usize,
    ) -> Result<UserReply, ActorError> {
        let head = self.durable_inbox;
        let Some(idx) = self.sessions.iter().position(|s| &s.session == session) else {
            return Err(ActorError::Unauthorized);
        };
        let entries = self.registry.store().inbox_range(
            self.id,
            after,
            head,
            limit.clamp(1, MAX_SYNC_PAGE),
        )?;
        let last = entries.last().map_or(after, |e| e.0);
        let live_head = (last >= head).then(|| {
            self.sessions[idx].live = true;
            head
        });
        Ok(UserReply::Page { entries, live_head })
    }

    fn append_inbox(
        &mut self,
        conversation_id: ConversationId,
        kind: ConversationKind,
        peer: Option<UserId>,
        prev: u64,
        mut messages: Vec<Arc<MessageRecord>>,
    ) -> Reply {
        messages.sort_by_key(|m| m.seq);
        let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
        let known = self.conversations.get(&conversation_id);
        let head = known.map_or(0, |c| c.head);
        let (skip, take) = accept_run(head, prev, &seqs);
        if take == 0 {
            // Nothing new; answer the head once whatever made it is durable.
            return self.after_commit(0, move |act, _| Ok(act.appended(conversation_id)));
        }
        let first = self.next_inbox;
        let taken = &messages[skip..skip + take];
        let run = InboxRun {
            conversation_id,
            seqs: taken.iter().map(|m| m.seq).collect(),
        };
        // A conversation is on disk once its first run is: head 0 means new to the user.
        let new_conversation = head == 0;
        let mut updated = known.cloned().unwrap_or(UserConversation {
            conversation_id,
            peer_id: peer,
            kind,
            head,
        });
        updated.head = taken.last().map_or(head, |m| m.seq);
        let upto = first + take as u64 - 1;
        // The conversation's record is written when it is new to the user (its kind and
        // peer must be on disk before any of its entries), and every head at a
        // checkpoint; otherwise the run alone records the progress.
        let checkpoint = upto - self.heads_at >= CHECKPOINT_EVERY;
        let mut records = if checkpoint {
            self.dirty_records(Some(conversation_id))
        } else {
            Vec::new()
        };
        if checkpoint || new_conversation {
            records.push(&updated);
        }
        if let Err(e) = self.registry.store().append_inbox(
            self.id,
            first,
            &run,
            &records,
            checkpoint.then_some(upto),
        ) {
            return done(Err(e.into()));
        }
        if checkpoint {
            self.heads_at = upto;
            self.dirty_heads.clear();
        } else {
            self.dirty_heads.insert(conversation_id);
        }
        self.conversations.insert(conversation_id, updated);
        self.next_inbox += take as u64;
        self.unflushed
            .extend(taken.iter().cloned().zip(first..).map(|(m, s)| (s, m)));
        let stored_at = taken
            .iter()
            .map(|m| m.ts)
            .min()
            .unwrap_or_else(crate::now_ms);
        // Kept for push notifications, in case no session is live once this is durable.
        let appended: Vec<(u64, Arc<MessageRecord>)> =
            (first..).zip(taken.iter().cloned()).collect();
        self.after_commit(take as u32, move |act, _| {
            let lag = (crate::now_ms() - stored_at).max(0) as f64 / 1000.0;
            metrics()
                .fanout_seconds
                .with_label_values(&["inbox"])
                .observe(lag);
            act.durable_inbox = act.durable_inbox.max(upto);
            act.push_durable();
            // Push unless a synced session will show it: a connection that has not
            // sent `sync` receives nothing yet, so it does not count.
            if !act.sessions.iter().any(|s| s.live) {
                act.notify_offline(&appended);
            }
            Ok(act.appended(conversation_id))
        })
    }

    /// Stores every conversation head that moved since the last checkpoint, so the next
    /// load replays nothing. Not awaited: if it is lost, the next load replays the runs
    /// past the previous checkpoint instead. (Not on a crash or a handoff, which may
    /// already be copying this user's records.)
    fn checkpoint(&mut self) {
        let at = self.next_inbox - 1;
        if self.dirty_heads.is_empty() && self.heads_at >= at {
            return;
        }
        let records = self.dirty_records(None);
        match self
            .registry
            .store()
            .checkpoint_heads(self.id, &records, at)
        {
            Ok(()) => {
                self.heads_at = at;
                self.dirty_heads.clear();
            }
            Err(e) => {
                tracing::warn!(user = %self.id, error = %e, "cannot store conversation heads")
            }
        }
    }

    /// The stored records of the conversations whose head moved since the last
    /// checkpoint, but `except` (whose record the caller writes itself).
    fn dirty_records(&self, except: Option<ConversationId>) -> Vec<&UserConversation> {
        self.dirty_heads
            .iter()
            .filter(|c| Some(**c) != except)
            .filter_map(|c| self.conversations.get(c))
            .collect()
    }

    /// Push notifications for messages others sent, while no session of ours is live.
    fn notify_offline(&self, appended: &[(u64, Arc<MessageRecord>)]) {
        let Some(route) = self.registry.route() else {
            return;
        };
        for (inbox_seq, m) in appended.iter().filter(|(_, m)| m.sender_id != self.id) {
            route.push(OfflineNotice {
                user_id: self.id,
                conversation_id: m.conversation_id,
                seq: m.seq,
                inbox_seq: *inbox_seq,
                sender_id: m.sender_id,
                message_id: m.message_id,
                ts: m.ts,
            });
        }
    }

    fn appended(&self, conversation_id: ConversationId) -> UserReply {
        UserReply::Appended {
            head: self
                .conversations
                .get(&conversation_id)
                .map_or(0, |c| c.head),
        }
    }

    /// Pushes every entry that became durable to the live sessions, in inbox order.
    fn push_durable(&mut self) {
        let Some(route) = self.registry.route() else {
            return;
        };
        let mut gone = Vec::new();
        while self
            .unflushed
            .front()
            .is_some_and(|(seq, _)| *seq <= self.durable_inbox)
        {
            let Some((inbox_seq, message)) = self.unflushed.pop_front() else {
                break;
            };
            for s in self.sessions.iter().filter(|s| s.live) {
                let event = SessionEvent::Inbox {
                    inbox_seq,
                    message: Arc::clone(&message),
                };
                match route.deliver(self.id, &s.session, event) {
                    Delivery::Delivered => {}
                    Delivery::Gone => gone.push(s.session.clone()),
                    Delivery::Full => {
                        route.deliver(
                            self.id,
                            &s.session,
                            SessionEvent::Close {
                                code: 1013,
                                reason: "client too slow: reconnect and sync".into(),
                            },
                        );
                        gone.push(s.session.clone());
                    }
                }
            }
            for s in gone.drain(..) {
                self.detach(&s);
            }
        }
    }

    fn notify(&mut self, event: SessionEvent) {
        let Some(route) = self.registry.route() else {
            return;
        };
        let gone: Vec<SessionRef> = self
            .sessions
            .iter()
            .filter(|s| {
                s.live && route.deliver(self.id, &s.session, event.clone()) == Delivery::Gone
            })
            .map(|s| s.session.clone())
            .collect();
        for s in gone {
            self.detach(&s);
        }
    }
}

fn done(r: Result<UserReply, ActorError>) -> Reply {
    Box::pin(ready(r))
}

impl Actor for UserActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        metrics().actors.with_label_values(&["user"]).inc();
        // What we loaded may be in sled's memory but not yet on disk: serve nothing
        // until a flush covers it (see `Registry::wait_durable`).
        let registry = Arc::clone(&self.registry);
        registry.wait_durable(ctx, |act: &mut Self, e| act.load_error = Some(e), |_, _| {});
        ctx.run_interval(IDLE_CHECK, |act, ctx| {
            if act.sessions.is_empty()
                && act.watchers.is_empty()
                && act.unflushed.is_empty()
                && act.last_call.elapsed() >= IDLE_AFTER
            {
                act.checkpoint();
                ctx.stop();
            }
        });
    }

    fn stopping(&mut self, ctx: &mut Context<Self>) -> Running {
        self.registry.forget_user(self.id, &ctx.address());
        // An actor that stops with sessions (a crash: actix runs this while the panic
        // unwinds; a failed flush; a handoff) loses them and its presence watchers:
        // close them all, so their clients reconnect, attach to the fresh actor, sync
        // and subscribe again, rather than sit on a connection nothing is pushed to.
        // (An idle stop has neither.)
        self.close_sessions("the server restarted this user's state: reconnect and sync");
        Running::Stop
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        metrics().actors.with_label_values(&["user"]).dec();
    }
}

impl Handler<UserCall> for UserActor {
    type Result = Reply;

    fn handle(&mut self, UserCall(req): UserCall, ctx: &mut Context<Self>) -> Reply {
        self.last_call = Instant::now();
        if let Some(e) = &self.load_error {
            ctx.stop();
            return done(Err(e.clone()));
        }
        if self.record.is_none() {
            return match req {
                UserRequest::Create {
                    handle,
                    display_name,
                    password_hash,
                } => self.create(handle, display_name, password_hash),
                UserRequest::Login { .. } => done(Err(ActorError::InvalidCredentials)),
                UserRequest::Authenticate { .. }
                | UserRequest::Logout { .. }
                | UserRequest::Attach { .. } => done(Err(ActorError::Unauthorized)),
                _ => done(Err(ActorError::UnknownUser)),
            };
        }
        match req {
            UserRequest::Create {
                handle,
                display_name,
                password_hash,
            } => self.create(handle, display_name, password_hash),
            UserRequest::Login { password } => self.login(password),
            UserRequest::Authenticate { token } => done(if self.token_valid(&token) {
                Ok(UserReply::Done)
            } else {
                Err(ActorError::Unauthorized)
            }),
            UserRequest::Logout { token } => self.logout(token),
            UserRequest::Profile => done(
                self.profile()
                    .map(UserReply::Profile)
                    .ok_or(ActorError::UnknownUser),
            ),
            UserRequest::Attach { session, token } => done(self.attach(session, token)),
            UserRequest::Detach { session } => {
                self.detach(&session);
                done(Ok(UserReply::Done))
            }
            UserRequest::Attached { session } => done(Ok(UserReply::Attached(
                self.sessions.iter().any(|s| s.session == session),
            ))),
            UserRequest::DetachNode { node } => {
                self.detach_node(&node);
                done(Ok(UserReply::Done))
            }
            UserRequest::SyncPage {
                session,
                after,
                limit,
            } => done(self.sync_page(&session, after, limit)),
            UserRequest::AppendInbox {
                conversation_id,
                kind,
                peer,
                prev,
                messages,
            } => self.append_inbox(conversation_id, kind, peer, prev, messages),
            UserRequest::Conversations => done(Ok(UserReply::Conversations(
                self.conversations.values().cloned().collect(),
            ))),
            UserRequest::Notify { event } => {
                self.notify(event);
                done(Ok(UserReply::Done))
            }
            UserRequest::AddContact { contact } => self.add_contact(contact),
            UserRequest::RemoveContact { contact } => self.remove_contact(contact),
            UserRequest::Contacts => done(Ok(self.contact_list())),
            UserRequest::Visible { targets } => self.visible(targets),
            UserRequest::WatchPresence { session } => done(self.watch_presence(session)),
            UserRequest::PutKeys { bundle, prekeys } => self.put_keys(bundle, prekeys),
            UserRequest::ClaimKeys => self.claim_keys(),
        }
    }
}

impl Handler<Kill> for UserActor {
    type Result = ();

    fn handle(&mut self, _: Kill, _: &mut Context<Self>) {
        panic!("chaos: killed by POST /admin/chaos/kill");
    }
}

impl Handler<Retire> for UserActor {
    type Result = ();

    /// The user's sessions are closed so that their clients reconnect and attach at the
    /// user's new home. (Presence watchers are not carried over: a watcher's
    /// subscription ends with the move, written down as a limit.)
    fn handle(&mut self, _: Retire, ctx: &mut Context<Self>) {
        self.close_sessions("this user moved to another node: reconnect and sync");
        ctx.stop();
    }
}
