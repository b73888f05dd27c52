//! The WebSocket session actor: one per client connection, on the node the client reached.
//!
//! Owns the connection: frame parsing and size limits, the per-connection send rate
//! (token bucket), heartbeats, the connection's inbox cursor, and a bounded outgoing
//! buffer. It forwards requests to entity actors through the router and writes their
//! answers and events back.
//!
//! Ordering: inbox events reach the client strictly in `inbox_seq` order, each once.
//! Replay pages and live pushes both pass through a [`Reorder`] keyed by `inbox_seq`;
//! live pushes that arrive while the replay is still running are held back until
//! `synced` has been written.
//!
//! Memory: two bounds. Events pushed to the session but not yet handled are counted in
//! bytes by the session table (see `sessions`: a session whose client stops reading
//! is frozen by actix and cannot count for itself). Bytes the session has written but
//! the socket has not taken are counted here (`queued` minus `drained`). Past either
//! limit the client is not reading and is disconnected with close code 1013; it
//! reconnects and syncs from its cursor. Replay fetches its next page only once the
//! backlog has drained.

use std::cell::Cell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use actix::fut::wrap_future;
use actix::prelude::*;
use actix_http::ws::{Codec, Item};
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws::{self, CloseCode, CloseReason, Message as WsMessage, ProtocolError};
use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;
use futures_util::Stream;
use uuid::Uuid;

use super::api::ApiError;
use super::http::{authenticate, upgrade_token};
use super::protocol::*;
use super::router::Router;
use super::sessions::{event_cost, Gauge};
use super::AppState;
use crate::actors::sequence::Reorder;
use crate::actors::*;
use crate::config::Limits;
use crate::ids::{ConversationId, UserId};
use crate::metrics::metrics;

/// Events a session may have queued in its mailbox before pushes to it fail (bytes are
/// bounded separately, see `sessions`).
const MAILBOX_CAPACITY: usize = 1024;
/// Outgoing bytes not yet taken by the socket before the client counts as not reading.
const MAX_BACKLOG_BYTES: u64 = 8 * 1024 * 1024;
/// Replay waits for the backlog to fall below this before fetching the next page.
const REPLAY_LOW_WATER: u64 = 256 * 1024;
const REPLAY_PAGE: usize = 128;
const REPLAY_POLL: Duration = Duration::from_millis(10);
/// Inbox events held beyond a gap, or waiting for the replay to finish.
const MAX_HELD_EVENTS: usize = 20_000;
/// `typing` frames one connection may send per second (bursts up to the same).
const TYPING_PER_SECOND: u32 = 5;
/// Users one connection may watch the presence of.
const MAX_WATCHED: usize = 1024;
/// How long `delivered`/`read` frames are gathered before they are applied.
const MARK_WINDOW: Duration = Duration::from_millis(100);
/// Distinct (conversation, status) marks one window may hold.
const MAX_MARKS_PER_WINDOW: usize = 32;
/// How often a session checks that its user's actor still has it.
const ATTACH_CHECK: Duration = Duration::from_secs(10);
/// Sends one connection may have waiting behind checks (the memory they hold is
/// bounded by this times `max_message_bytes`).
const MAX_WAITING_SENDS: usize = 256;
/// Peers known to exist, so a `send` to them skips the existence check.
const KNOWN_PEERS: usize = 1024;

/// `GET /api/v1/ws`: authenticates, then upgrades.
pub async fn connect(
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let me = authenticate(&state, upgrade_token(&req)).await?;
    let mut response = ws::handshake(&req)
        .map_err(|e| ApiError::bad_request(format!("WebSocket handshake failed: {e}")))?;
    let drained = Rc::new(Cell::new(0u64));
    let session = WsSession::new(me.user, me.token, &state, Rc::clone(&drained));
    let codec = Codec::new().max_size(state.limits.max_frame_bytes);
    let frames = ws::WebsocketContext::with_codec(session, stream, codec);
    Ok(response.streaming(Counted {
        inner: Box::pin(frames),
        drained,
    }))
}

/// Counts the bytes the HTTP layer takes from the session, i.e. what left the buffer.
struct Counted<S> {
    inner: Pin<Box<S>>,
    drained: Rc<Cell<u64>>,
}

impl<S, E> Stream for Counted<S>
where
    S: Stream<Item = Result<Bytes, E>>,
{
    type Item = Result<Bytes, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let poll = self.inner.as_mut().poll_next(cx);
        if let Poll::Ready(Some(Ok(bytes))) = &poll {
            self.drained.set(self.drained.get() + bytes.len() as u64);
        }
        poll
    }
}

fn now_ms_u64() -> u64 {
    u64::try_from(crate::now_ms()).unwrap_or(0)
}

/// Bytes of a server frame (unmasked) carrying `len` payload bytes.
fn frame_len(len: usize) -> u64 {
    let header = match len {
        0..=125 => 2,
        126..=65_535 => 4,
        _ => 10,
    };
    (len + header) as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Connected, no `sync` yet.
    Fresh,
    /// Replaying the inbox.
    Syncing,
    /// `synced` written; events flow as they happen.
    Live,
}

/// A token bucket: `rate` sends per second, bursts up to `rate`.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Self {
        Bucket {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct WsSession {
    me: SessionRef,
    user: UserId,
    token: TokenHash,
    router: Arc<Router>,
    limits: Arc<Limits>,
    phase: Phase,
    reorder: Reorder<Arc<MessageRecord>>,
    /// Replayed entries not yet written (`None`: the message could not be read).
    replay: VecDeque<(u64, Option<Arc<MessageRecord>>)>,
    /// Set when the page being written reached the head: go live after it.
    replay_head: Option<u64>,
    /// Live pushes that arrived during replay, written after `synced`.
    early: Vec<(u64, Arc<MessageRecord>)>,
    /// Body bytes held in `early`.
    early_bytes: u64,
    bucket: Bucket,
    typing_bucket: Bucket,
    /// Users whose presence this connection watches.
    watching: HashSet<UserId>,
    last_heard: Instant,
    queued: u64,
    drained: Rc<Cell<u64>>,
    /// Bytes pushed and not yet handled, and heartbeat liveness; shared with the
    /// session table.
    gauge: Arc<Gauge>,
    /// A fragmented message being reassembled: (is text, bytes so far).
    fragments: Option<(bool, BytesMut)>,
    known_peers: HashSet<UserId>,
    /// Watermarks waiting for the end of the current window.
    marks: HashMap<(ConversationId, ReceiptStatus), u64>,
    /// Sends waiting, per conversation and in arrival order, behind a check that must
    /// pass before the first of them is posted (the peer exists; the media may be
    /// attached). Later sends to the same conversation wait too, so a conversation's
    /// sends are stored in the order they arrived.
    waiting: HashMap<ConversationId, VecDeque<PendingSend>>,
    closing: bool,
}

/// A validated `send`, ready to post.
struct PendingSend {
    conversation_id: ConversationId,
    peer: Option<UserId>,
    client_msg_id: Uuid,
    cmid_raw: String,
    body: String,
    media: Vec<Uuid>,
}

impl WsSession {
    fn new(user: UserId, token: TokenHash, state: &AppState, drained: Rc<Cell<u64>>) -> Self {
        let router = Arc::clone(&state.router);
        WsSession {
            me: SessionRef {
                node: router.node_id().to_string(),
                id: router.sessions().next_id(),
            },
            user,
            token,
            router,
            limits: Arc::clone(&state.limits),
            phase: Phase::Fresh,
            reorder: Reorder::new(0, MAX_HELD_EVENTS),
            early: Vec::new(),
            early_bytes: 0,
            replay: VecDeque::new(),
            replay_head: None,
            bucket: Bucket::new(state.limits.sends_per_second),
            typing_bucket: Bucket::new(TYPING_PER_SECOND),
            watching: HashSet::new(),
            last_heard: Instant::now(),
            queued: 0,
            drained,
            gauge: Arc::new(Gauge::default()),
            fragments: None,
            known_peers: HashSet::new(),
            waiting: HashMap::new(),
            marks: HashMap::new(),
            closing: false,
        }
    }

    fn backlog(&self) -> u64 {
        self.queued.saturating_sub(self.drained.get())
    }

    /// Writes a text frame, or disconnects a client whose backlog is over the limit.
    fn write(&mut self, ctx: &mut ws::WebsocketContext<Self>, text: String) {
        if self.closing {
            return;
        }
        self.queued += frame_len(text.len());
        ctx.text(text);
        if self.backlog() > MAX_BACKLOG_BYTES {
            self.close(
                ctx,
                CloseCode::Again,
                "client too slow: reconnect and sync",
                "slow_consumer",
            );
        }
    }

    fn close(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        code: CloseCode,
        why: &str,
        metric: &str,
    ) {
        if self.closing {
            return;
        }
        self.closing = true;
        metrics().disconnects.with_label_values(&[metric]).inc();
        ctx.close(Some(CloseReason {
            code,
            description: Some(why.to_string()),
        }));
        ctx.stop();
    }

    fn error(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        code: &str,
        message: &str,
        client_msg_id: Option<&str>,
    ) {
        metrics().errors.with_label_values(&[code]).inc();
        let text = ServerFrame::Error {
            code,
            message,
            client_msg_id,
        }
        .to_text();
        self.write(ctx, text);
    }

    fn actor_error(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        e: &ActorError,
        client_msg_id: Option<&str>,
    ) {
        let message = e.to_string();
        self.error(ctx, e.code(), &message, client_msg_id);
    }

    fn emit(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        ready: Vec<(u64, Arc<MessageRecord>)>,
    ) {
        for (inbox_seq, message) in ready {
            let text = ServerFrame::Message {
                inbox_seq,
                message: MessageJson::from(message.as_ref()),
            }
            .to_text();
            metrics().messages_out.inc();
            self.write(ctx, text);
        }
    }

    fn offer(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        inbox_seq: u64,
        m: Arc<MessageRecord>,
    ) {
        match self.reorder.offer(inbox_seq, m) {
            Ok(ready) => self.emit(ctx, ready),
            Err(_) => self.close(
                ctx,
                CloseCode::Again,
                "fell behind: reconnect and sync",
                "reorder_overflow",
            ),
        }
    }

    fn on_text(&mut self, ctx: &mut ws::WebsocketContext<Self>, text: &str) {
        let frame = match ClientFrame::parse(text) {
            Ok(f) => f,
            Err(e) => return self.error(ctx, e.code, &e.message, e.client_msg_id.as_deref()),
        };
        match frame {
            ClientFrame::Ping => {
                let text = ServerFrame::Pong.to_text();
                self.write(ctx, text);
            }
            ClientFrame::Sync { after } => self.on_sync(ctx, after),
            ClientFrame::Send(send) => self.on_send(ctx, send),
            ClientFrame::Delivered(m) => self.on_mark(ctx, m, ReceiptStatus::Delivered),
            ClientFrame::Read(m) => self.on_mark(ctx, m, ReceiptStatus::Read),
            ClientFrame::Typing { conversation_id } => self.on_typing(ctx, &conversation_id),
            ClientFrame::SubscribePresence { user_ids } => {
                self.on_subscribe_presence(ctx, user_ids)
            }
        }
    }

    fn on_sync(&mut self, ctx: &mut ws::WebsocketContext<Self>, after: u64) {
        if self.phase != Phase::Fresh {
            return self.error(
                ctx,
                "bad_request",
                "sync was already sent on this connection",
                None,
            );
        }
        self.phase = Phase::Syncing;
        self.reorder = Reorder::new(after, MAX_HELD_EVENTS);
        self.fetch_page(ctx, after);
    }

    /// Fetches the inbox page after `after`, resolves its messages, writes them.
    fn fetch_page(&mut self, ctx: &mut ws::WebsocketContext<Self>, after: u64) {
        let router = Arc::clone(&self.router);
        let (user, session) = (self.user, self.me.clone());
        let fut = async move {
            let reply = router
                .user(
                    user,
                    UserRequest::SyncPage {
                        session,
                        after,
                        limit: REPLAY_PAGE,
                    },
                )
                .await?;
            let UserReply::Page { entries, live_head } = reply else {
                return Err(ActorError::Internal("unexpected reply to sync".into()));
            };
            let mut by_conv: HashMap<ConversationId, Vec<u64>> = HashMap::new();
            for (_, e) in &entries {
                by_conv.entry(e.conversation_id).or_default().push(e.seq);
            }
            let reads = join_all(
                by_conv
                    .into_iter()
                    .map(|(cid, seqs)| router.read_messages(cid, seqs)),
            )
            .await;
            let mut messages: HashMap<(ConversationId, u64), Arc<MessageRecord>> = HashMap::new();
            for read in reads {
                for m in read? {
                    messages.insert((m.conversation_id, m.seq), Arc::new(m));
                }
            }
            Ok((entries, messages, live_head))
        };
        ctx.spawn(wrap_future::<_, Self>(fut).map(move |res, act, ctx| match res {
            Ok((entries, mut messages, live_head)) => {
                act.replay.extend(entries.into_iter().map(|(inbox_seq, e)| {
                    let m = messages.remove(&(e.conversation_id, e.seq));
                    if m.is_none() {
                        tracing::error!(user = %act.user, inbox_seq, conversation_id = %e.conversation_id, seq = e.seq, "inbox entry without its message");
                    }
                    (inbox_seq, m)
                }));
                act.replay_head = live_head;
                act.drain_replay(ctx);
            }
            Err(e) => {
                act.actor_error(ctx, &e, None);
                act.close(ctx, CloseCode::Again, "sync failed: reconnect and sync", "sync_failed");
            }
        }));
    }

    /// Writes replayed entries while the socket keeps up, then fetches the next page or
    /// goes live. A page is never written in one go: a page of large messages would
    /// otherwise trip the backlog limit on a client that reads perfectly well.
    fn drain_replay(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        if self.closing {
            return;
        }
        while self.backlog() <= REPLAY_LOW_WATER {
            let Some((inbox_seq, message)) = self.replay.pop_front() else {
                break;
            };
            match message {
                Some(m) => self.offer(ctx, inbox_seq, m),
                None => {
                    let ready = self.reorder.advance_to(inbox_seq);
                    self.emit(ctx, ready);
                }
            }
        }
        if !self.replay.is_empty() || self.backlog() > REPLAY_LOW_WATER {
            ctx.run_later(REPLAY_POLL, |act, ctx| act.drain_replay(ctx));
            return;
        }
        match self.replay_head.take() {
            Some(head) => self.go_live(ctx, head),
            None => {
                let after = self.reorder.cursor();
                self.fetch_page(ctx, after);
            }
        }
    }

    fn go_live(&mut self, ctx: &mut ws::WebsocketContext<Self>, head: u64) {
        // A cursor past the head (a client that knows more than the server) restarts
        // at the head, so that later entries are not mistaken for duplicates.
        if self.reorder.cursor() > head {
            self.reorder = Reorder::new(head, MAX_HELD_EVENTS);
        }
        // The page ended at the head, so nothing can be held below it.
        let _ = self.reorder.advance_to(head);
        let text = ServerFrame::Synced { inbox_seq: head }.to_text();
        self.write(ctx, text);
        self.phase = Phase::Live;
        self.early_bytes = 0;
        for (seq, m) in std::mem::take(&mut self.early) {
            self.offer(ctx, seq, m);
        }
    }

    fn on_send(&mut self, ctx: &mut ws::WebsocketContext<Self>, send: SendFrame) {
        let cmid_raw = send.client_msg_id.clone();
        let cmid = Some(send.client_msg_id.as_str());
        let Ok(client_msg_id) = Uuid::parse_str(&send.client_msg_id) else {
            return self.error(ctx, "bad_request", "client_msg_id is not a UUID", cmid);
        };
        let (conversation_id, peer) = match (&send.to_user, &send.conversation_id) {
            (Some(to), None) => match to.parse::<UserId>() {
                Ok(peer) => (ConversationId::direct(self.user, peer), Some(peer)),
                Err(_) => return self.error(ctx, "bad_request", "to_user is not a UUID", cmid),
            },
            (None, Some(c)) => match c.parse::<ConversationId>() {
                Ok(cid) => (cid, None),
                Err(_) => {
                    return self.error(ctx, "bad_request", "conversation_id is not a UUID", cmid)
                }
            },
            _ => {
                return self.error(
                    ctx,
                    "bad_request",
                    "give exactly one of to_user and conversation_id",
                    cmid,
                )
            }
        };
        if send.body.len() > self.limits.max_message_bytes {
            let msg = format!("body is over {} bytes", self.limits.max_message_bytes);
            return self.error(ctx, "too_large", &msg, cmid);
        }
        let mut media = Vec::new();
        for m in send.media.iter().flatten() {
            match Uuid::parse_str(m) {
                Ok(id) => media.push(id),
                Err(_) => return self.error(ctx, "bad_request", "media ids must be UUIDs", cmid),
            }
        }
        if !self.bucket.take() {
            let msg = format!("over {} sends per second", self.limits.sends_per_second);
            return self.error(ctx, "rate_limited", &msg, cmid);
        }
        if media.len() > MAX_MEDIA_PER_MESSAGE {
            let msg = format!("at most {MAX_MEDIA_PER_MESSAGE} media per message");
            return self.error(ctx, "bad_request", &msg, cmid);
        }
        let send = PendingSend {
            conversation_id,
            peer,
            client_msg_id,
            cmid_raw,
            body: send.body,
            media,
        };
        if self.waiting.values().map(VecDeque::len).sum::<usize>() >= MAX_WAITING_SENDS {
            let msg = format!("over {MAX_WAITING_SENDS} sends waiting for checks");
            return self.error(ctx, "rate_limited", &msg, Some(&send.cmid_raw));
        }
        if let Some(queue) = self.waiting.get_mut(&conversation_id) {
            return queue.push_back(send);
        }
        if self.needs_check(&send) {
            self.waiting.insert(conversation_id, VecDeque::from([send]));
            self.next_waiting(ctx, conversation_id);
        } else {
            self.post(ctx, send);
        }
    }

    /// A send to a peer not yet known to exist, or with media, is checked first.
    fn needs_check(&self, send: &PendingSend) -> bool {
        send.peer.is_some_and(|p| !self.known_peers.contains(&p)) || !send.media.is_empty()
    }

    /// Posts the sends waiting for `cid` that need no check, up to the first that does,
    /// whose check it starts; that check's end posts (or refuses) it and continues.
    fn next_waiting(&mut self, ctx: &mut ws::WebsocketContext<Self>, cid: ConversationId) {
        loop {
            let Some(head) = self.waiting.get(&cid).and_then(|q| q.front()) else {
                self.waiting.remove(&cid);
                return;
            };
            if self.needs_check(head) {
                break;
            }
            if let Some(send) = self.waiting.get_mut(&cid).and_then(|q| q.pop_front()) {
                self.post(ctx, send);
            }
        }
        let Some(head) = self.waiting.get(&cid).and_then(|q| q.front()) else {
            return;
        };
        let peer = head.peer.filter(|p| !self.known_peers.contains(p));
        let (router, user, media, to) = (
            Arc::clone(&self.router),
            self.user,
            head.media.clone(),
            head.peer,
        );
        let checks = async move {
            if let Some(p) = peer {
                router.user(p, UserRequest::Profile).await?;
            }
            // Only once the peer is known to exist (referencing records durably), and
            // side by side, so a send waits for its slowest media, not their sum.
            let reference = |id| {
                let conversation = cid;
                router.media(
                    id,
                    MediaRequest::Reference {
                        user,
                        conversation,
                        peer: to,
                    },
                )
            };
            for result in join_all(media.into_iter().map(reference)).await {
                result?;
            }
            Ok::<(), ActorError>(())
        };
        ctx.spawn(wrap_future::<_, Self>(checks).map(move |res, act, ctx| {
            let Some(send) = act.waiting.get_mut(&cid).and_then(|q| q.pop_front()) else {
                return;
            };
            match res {
                Ok(()) => {
                    if let Some(p) = peer {
                        if act.known_peers.len() < KNOWN_PEERS {
                            act.known_peers.insert(p);
                        }
                    }
                    act.post(ctx, send);
                }
                Err(e) => act.actor_error(ctx, &e, Some(&send.cmid_raw)),
            }
            act.next_waiting(ctx, cid);
        }));
    }

    /// Posts a validated send to its conversation and answers with the ack or an error.
    /// Posts are issued in the order sends arrived; the conversation's mailbox keeps it.
    fn post(&mut self, ctx: &mut ws::WebsocketContext<Self>, send: PendingSend) {
        let call = self.router.conversation(
            send.conversation_id,
            ConversationRequest::Post {
                sender: self.user,
                client_msg_id: send.client_msg_id,
                body: send.body,
                media: send.media,
                direct_peer: send.peer,
            },
        );
        let cmid_raw = send.cmid_raw;
        ctx.spawn(
            wrap_future::<_, Self>(call).map(move |res, act, ctx| match res {
                Ok(ConversationReply::Ack(ack)) => {
                    let text = ServerFrame::Ack(&ack).to_text();
                    act.write(ctx, text);
                }
                Ok(_) => act.error(ctx, "internal", "unexpected reply", Some(&cmid_raw)),
                Err(e) => act.actor_error(ctx, &e, Some(&cmid_raw)),
            }),
        );
    }

    fn on_typing(&mut self, ctx: &mut ws::WebsocketContext<Self>, conversation_id: &str) {
        let Ok(cid) = conversation_id.parse::<ConversationId>() else {
            return self.error(ctx, "bad_request", "conversation_id is not a UUID", None);
        };
        if !self.typing_bucket.take() {
            let msg = format!("over {TYPING_PER_SECOND} typing frames per second");
            return self.error(ctx, "rate_limited", &msg, None);
        }
        let call = self
            .router
            .conversation(cid, ConversationRequest::Typing { user: self.user });
        ctx.spawn(wrap_future::<_, Self>(call).map(|res, act, ctx| {
            if let Err(e) = res {
                act.actor_error(ctx, &e, None);
            }
        }));
    }

    /// Watches the presence of users who share a conversation with this user or are in
    /// its contacts; anyone else is refused, so presence does not leak.
    fn on_subscribe_presence(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        user_ids: Vec<String>,
    ) {
        let mut targets = Vec::with_capacity(user_ids.len());
        for raw in &user_ids {
            match raw.parse::<UserId>() {
                Ok(u) if !targets.contains(&u) => targets.push(u),
                Ok(_) => {}
                Err(_) => return self.error(ctx, "bad_request", "user_ids must be UUIDs", None),
            }
        }
        if targets.len() + self.watching.len() > MAX_WATCHED {
            let msg = format!("at most {MAX_WATCHED} users watched per connection");
            return self.error(ctx, "bad_request", &msg, None);
        }
        let router = Arc::clone(&self.router);
        let (me, session) = (self.user, self.me.clone());
        let fut = async move {
            let visible = match router
                .user(
                    me,
                    UserRequest::Visible {
                        targets: targets.clone(),
                    },
                )
                .await?
            {
                UserReply::Users(v) => v,
                _ => return Err(ActorError::Internal("unexpected reply".into())),
            };
            let refused: Vec<UserId> = targets
                .iter()
                .copied()
                .filter(|t| !visible.contains(t))
                .collect();
            let watched = join_all(visible.iter().map(|t| {
                router.user(
                    *t,
                    UserRequest::WatchPresence {
                        session: session.clone(),
                    },
                )
            }))
            .await;
            Ok((refused, visible, watched))
        };
        ctx.spawn(wrap_future::<_, Self>(fut).map(|res, act, ctx| match res {
            Ok((refused, visible, watched)) => {
                if !refused.is_empty() {
                    let list: Vec<String> = refused.iter().map(|u| u.to_string()).collect();
                    let msg = format!("no shared conversation or contact: {}", list.join(", "));
                    act.error(ctx, "not_member", &msg, None);
                }
                for (user, res) in visible.into_iter().zip(watched) {
                    match res {
                        Ok(UserReply::Profile(p)) => {
                            act.watching.insert(user);
                            act.presence(ctx, user, p.online, p.last_seen);
                        }
                        Ok(_) => act.error(ctx, "internal", "unexpected reply", None),
                        Err(e) => act.actor_error(ctx, &e, None),
                    }
                }
            }
            Err(e) => act.actor_error(ctx, &e, None),
        }));
    }

    fn presence(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        user: UserId,
        online: bool,
        last_seen: Option<i64>,
    ) {
        let text = ServerFrame::Presence {
            user_id: user.0,
            online,
            last_seen,
        }
        .to_text();
        self.write(ctx, text);
    }

    fn on_mark(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        m: MarkFrame,
        status: ReceiptStatus,
    ) {
        let Ok(cid) = m.conversation_id.parse::<ConversationId>() else {
            return self.error(ctx, "bad_request", "conversation_id is not a UUID", None);
        };
        // Watermarks are cumulative, so a burst of them collapses to the highest per
        // conversation: clients may send one per message received without each costing
        // a call, and a flood costs at most MAX_MARKS_PER_WINDOW calls per window.
        if !self.marks.contains_key(&(cid, status)) && self.marks.len() >= MAX_MARKS_PER_WINDOW {
            let msg = format!(
                "over {MAX_MARKS_PER_WINDOW} conversations marked per {} ms",
                MARK_WINDOW.as_millis()
            );
            return self.error(ctx, "rate_limited", &msg, None);
        }
        let seq = self.marks.entry((cid, status)).or_insert(0);
        *seq = (*seq).max(m.seq);
        if self.marks.len() == 1 {
            ctx.run_later(MARK_WINDOW, |act, ctx| act.flush_marks(ctx));
        }
    }

    fn flush_marks(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        for ((cid, status), seq) in std::mem::take(&mut self.marks) {
            let call = self.router.conversation(
                cid,
                ConversationRequest::Mark {
                    user: self.user,
                    status,
                    seq,
                },
            );
            ctx.spawn(wrap_future::<_, Self>(call).map(|res, act, ctx| {
                if let Err(e) = res {
                    act.actor_error(ctx, &e, None);
                }
            }));
        }
    }

    fn on_frame(&mut self, ctx: &mut ws::WebsocketContext<Self>, msg: WsMessage) {
        match msg {
            WsMessage::Text(text) => self.on_text(ctx, &text),
            WsMessage::Binary(_) => self.error(
                ctx,
                "bad_request",
                "binary frames are not supported: send JSON text",
                None,
            ),
            WsMessage::Ping(p) => ctx.pong(&p),
            WsMessage::Pong(_) | WsMessage::Nop => {}
            WsMessage::Close(reason) => {
                self.closing = true;
                ctx.close(reason);
                ctx.stop();
            }
            WsMessage::Continuation(item) => self.on_fragment(ctx, item),
        }
    }

    /// Reassembles a fragmented message, holding no more than `max_frame_bytes`.
    fn on_fragment(&mut self, ctx: &mut ws::WebsocketContext<Self>, item: Item) {
        let max = self.limits.max_frame_bytes;
        let (first, text, chunk, last) = match item {
            Item::FirstText(b) => (true, true, b, false),
            Item::FirstBinary(b) => (true, false, b, false),
            Item::Continue(b) => (false, false, b, false),
            Item::Last(b) => (false, false, b, true),
        };
        if first {
            self.fragments = Some((text, BytesMut::new()));
        }
        let Some((is_text, buf)) = self.fragments.as_mut() else {
            return self.close(
                ctx,
                CloseCode::Protocol,
                "continuation without a first fragment",
                "protocol",
            );
        };
        if buf.len() + chunk.len() > max {
            return self.close(
                ctx,
                CloseCode::Size,
                "message over max_frame_bytes",
                "frame_too_large",
            );
        }
        buf.extend_from_slice(&chunk);
        if last {
            let (is_text, buf) = (*is_text, std::mem::take(buf));
            self.fragments = None;
            if !is_text {
                return self.error(
                    ctx,
                    "bad_request",
                    "binary frames are not supported: send JSON text",
                    None,
                );
            }
            match std::str::from_utf8(&buf) {
                Ok(text) => self.on_text(ctx, text),
                Err(_) => self.close(ctx, CloseCode::Invalid, "text is not UTF-8", "protocol"),
            }
        }
    }
}

impl Actor for WsSession {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        metrics().ws_connections.inc();
        self.gauge.alive_at.store(now_ms_u64(), Ordering::Relaxed);
        self.router.sessions().insert(
            self.me.id,
            ctx.address().recipient(),
            self.user,
            Arc::clone(&self.gauge),
        );
        let attach = self.router.user(
            self.user,
            UserRequest::Attach {
                session: self.me.clone(),
                token: self.token,
            },
        );
        ctx.wait(wrap_future::<_, Self>(attach).map(|res, act, ctx| {
            if let Err(e) = res {
                act.actor_error(ctx, &e, None);
                act.close(
                    ctx,
                    CloseCode::Policy,
                    "cannot attach session",
                    "attach_failed",
                );
            }
        }));
        let timeout = self.limits.heartbeat_timeout();
        ctx.run_interval(self.limits.heartbeat_interval(), move |act, ctx| {
            if act.last_heard.elapsed() > timeout {
                act.close(
                    ctx,
                    CloseCode::Away,
                    "heartbeat timeout",
                    "heartbeat_timeout",
                );
                return;
            }
            if !act.router.sessions().contains(act.me.id) {
                // Swept while frozen (the client had stopped reading): it was detached
                // and its user went offline, so this connection is over.
                act.close(ctx, CloseCode::Away, "heartbeat timeout", "swept");
                return;
            }
            act.gauge.alive_at.store(now_ms_u64(), Ordering::Relaxed);
            act.queued += frame_len(0);
            ctx.ping(b"");
        });
        // A safety net for what no message tells us: the user's actor on another node
        // may have let this session go (a push it could not deliver, a
        // link it saw drop). Then nothing more would come; close instead, so the client
        // reconnects and syncs.
        ctx.run_interval(ATTACH_CHECK, |act, ctx| {
            // Only another node's actor can drop it unannounced: a user homed here
            // detaches a session only when it is gone or is being closed.
            if act.router.served_here(act.user) {
                return;
            }
            let check = act.router.user(
                act.user,
                UserRequest::Attached {
                    session: act.me.clone(),
                },
            );
            ctx.spawn(wrap_future::<_, Self>(check).map(|res, act, ctx| {
                if let Ok(UserReply::Attached(false)) = res {
                    act.close(
                        ctx,
                        CloseCode::Again,
                        "session lost: reconnect and sync",
                        "detached",
                    );
                }
            }));
        });
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        metrics().ws_connections.dec();
        self.router.sessions().remove(self.me.id);
        let detach = self.router.user(
            self.user,
            UserRequest::Detach {
                session: self.me.clone(),
            },
        );
        actix::spawn(async move {
            let _ = detach.await;
        });
    }
}

impl StreamHandler<Result<WsMessage, ProtocolError>> for WsSession {
    fn handle(&mut self, msg: Result<WsMessage, ProtocolError>, ctx: &mut Self::Context) {
        self.last_heard = Instant::now();
        match msg {
            Ok(msg) => self.on_frame(ctx, msg),
            Err(ProtocolError::Overflow) => self.close(
                ctx,
                CloseCode::Size,
                "frame over max_frame_bytes",
                "frame_too_large",
            ),
            // actix-web-actors reports a text frame that is not UTF-8 as an I/O error
            // carrying the `Utf8Error`'s text (its `ws.rs`, `Frame::Text`); the other I/O
            // errors are transport failures, after which no close code reaches anyone.
            Err(ProtocolError::Io(e)) if e.to_string().contains("utf-8") => {
                self.close(ctx, CloseCode::Invalid, "text is not UTF-8", "protocol")
            }
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket protocol error");
                self.close(ctx, CloseCode::Protocol, "protocol error", "protocol");
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        // The client went away (cleanly or mid-frame).
        ctx.stop();
    }
}

impl Handler<SessionEvent> for WsSession {
    type Result = ();

    fn handle(&mut self, event: SessionEvent, ctx: &mut Self::Context) {
        let cost = event_cost(&event);
        let pending = &self.gauge.pending;
        pending.fetch_sub(cost.min(pending.load(Ordering::Relaxed)), Ordering::Relaxed);
        match event {
            SessionEvent::Inbox { inbox_seq, message } => match self.phase {
                Phase::Live => self.offer(ctx, inbox_seq, message),
                Phase::Syncing
                    if self.early.len() < MAX_HELD_EVENTS
                        && self.early_bytes < MAX_BACKLOG_BYTES =>
                {
                    self.early_bytes += message.body.len() as u64;
                    self.early.push((inbox_seq, message))
                }
                Phase::Syncing => self.close(
                    ctx,
                    CloseCode::Again,
                    "fell behind: reconnect and sync",
                    "reorder_overflow",
                ),
                Phase::Fresh => {}
            },
            SessionEvent::Receipt {
                conversation_id,
                user_id,
                status,
                seq,
            } => {
                let text = ServerFrame::Receipt {
                    conversation_id: conversation_id.0,
                    user_id: user_id.0,
                    status: status_name(status),
                    seq,
                }
                .to_text();
                self.write(ctx, text);
            }
            SessionEvent::Presence {
                user_id,
                online,
                last_seen,
            } => self.presence(ctx, user_id, online, last_seen),
            SessionEvent::Typing {
                conversation_id,
                user_id,
            } => {
                let text = ServerFrame::Typing {
                    conversation_id: conversation_id.0,
                    user_id: user_id.0,
                }
                .to_text();
                self.write(ctx, text);
            }
            SessionEvent::Close { code, reason } => {
                self.close(ctx, CloseCode::from(code), &reason, "server_close")
            }
        }
    }
}
