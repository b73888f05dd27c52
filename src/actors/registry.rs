//! The registry: one live actor per entity on this node, started on first use.
//!
//! Supervision here means "restart from storage on the next message": an entity actor
//! keeps nothing that is not on disk or re-derivable, so when one stops (idle
//! passivation, a crash, a chaos kill) the registry simply starts a fresh one the next
//! time the entity is called. Idle actors stop themselves, so memory follows the active
//! set, not the total number of users and conversations.
//!
//! Entity actors run on a small pool of arbiters (threads), chosen by hashing the id, so
//! one busy entity never blocks the HTTP workers. The registry is a locked map rather
//! than an actor of its own: a lookup is a hash-map read, and making it an actor would
//! put one mailbox in front of every call on the node.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use actix::{Actor, Addr, Arbiter, ArbiterHandle};

use super::conversation::ConversationActor;
use super::error::ActorError;
use super::group::GroupActor;
use super::messages::{ConversationRequest, Entity, Kill, Retire};
use super::route::Route;
use super::user::UserActor;
use crate::config::Limits;
use crate::ids::{ConversationId, GroupId, UserId};
use crate::metrics::metrics;
use crate::storage::{MediaRecord, MediaWriter, Store};

/// What every entity actor on this node shares.
pub struct Registry {
    store: Store,
    limits: Arc<Limits>,
    route: OnceLock<Weak<dyn Route>>,
    arbiters: Vec<ArbiterHandle>,
    users: Mutex<HashMap<UserId, Addr<UserActor>>>,
    conversations: Mutex<HashMap<ConversationId, Addr<ConversationActor>>>,
    groups: Mutex<HashMap<GroupId, Addr<GroupActor>>>,
    /// Entities whose actor died lately, for crash-loop backoff.
    deaths: Mutex<HashMap<Entity, Deaths>>,
    /// During a handoff: the entities (by ring key) that are moving away, whose actors
    /// must not start here again.
    fence: Mutex<Option<Fence>>,
}

type Fence = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// How an entity's actor has been dying lately.
#[derive(Debug, Clone, Copy)]
struct Deaths {
    /// Deaths in a row, each within [`CRASH_WINDOW`] of the one before and none after
    /// the actor had run [`HEALTHY_AFTER`].
    count: u32,
    last: Instant,
    /// When its current actor was started, if after a death.
    started: Option<Instant>,
    /// No restart before this (a crash loop's backoff).
    not_before: Instant,
    /// The entity has work of its own to resume (a fan-out, a membership change) and
    /// nobody may call it: the node wakes it once the backoff allows (`due_revivals`).
    revive: bool,
}

/// Deaths further apart than this are not a loop (longer than the longest backoff, so
/// an actor dying on every start stays at the longest).
const CRASH_WINDOW: Duration = Duration::from_secs(90);
/// An actor that served this long before dying was healthy, not looping: its count
/// starts again. (A crash loop dies as it starts, on its first call; an actor killed
/// after it has served, however often, is restarted at once.)
const HEALTHY_AFTER: Duration = Duration::from_secs(1);
/// Deaths in a row restarted at once; past this, restarts back off.
const FREE_RESTARTS: u32 = 3;
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Registry {
    /// Creates the registry and its arbiter pool. Must run inside an actix system.
    pub fn new(store: Store, limits: Limits, threads: usize) -> Arc<Self> {
        let arbiters = (0..threads.max(1))
            .map(|_| Arbiter::new().handle())
            .collect();
        Arc::new(Registry {
            store,
            limits: Arc::new(limits),
            route: OnceLock::new(),
            arbiters,
            users: Mutex::new(HashMap::new()),
            conversations: Mutex::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
            deaths: Mutex::new(HashMap::new()),
            fence: Mutex::new(None),
        })
    }

    /// Wires the router in; called once, right after both exist.
    pub fn set_route(&self, route: Weak<dyn Route>) {
        let _ = self.route.set(route);
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The router, while the node runs.
    pub fn route(&self) -> Option<Arc<dyn Route>> {
        self.route.get().and_then(Weak::upgrade)
    }

    /// The user's actor, started if it is not running (`Unavailable` while a crash
    /// loop backs off).
    pub fn user(self: &Arc<Self>, id: UserId) -> Result<Addr<UserActor>, ActorError> {
        let arbiter = self.arbiter_for(id.as_bytes());
        let registry = Arc::clone(self);
        self.get_or_start(&self.users, id, Entity::User(id), move || {
            start_on(&arbiter, USER_MAILBOX, move || {
                UserActor::load(id, registry)
            })
        })
    }

    /// The conversation's actor, started if it is not running.
    pub fn conversation(
        self: &Arc<Self>,
        id: ConversationId,
    ) -> Result<Addr<ConversationActor>, ActorError> {
        let arbiter = self.arbiter_for(id.as_bytes());
        let registry = Arc::clone(self);
        self.get_or_start(
            &self.conversations,
            id,
            Entity::Conversation(id),
            move || {
                start_on(&arbiter, CONVERSATION_MAILBOX, move || {
                    ConversationActor::load(id, registry)
                })
            },
        )
    }

    /// The group's actor, started if it is not running.
    pub fn group(self: &Arc<Self>, id: GroupId) -> Result<Addr<GroupActor>, ActorError> {
        let arbiter = self.arbiter_for(id.as_bytes());
        let registry = Arc::clone(self);
        self.get_or_start(&self.groups, id, Entity::Group(id), move || {
            start_on(&arbiter, GROUP_MAILBOX, move || {
                GroupActor::load(id, registry)
            })
        })
    }

    /// The running actor for `id`, or a fresh one from storage. An actor found dead (it
    /// stopped without deregistering: a panic, a chaos kill) is restarted at once the
    /// first few times in a row; after that each restart waits longer (200 ms doubling
    /// to 30 s), and calls meanwhile answer `Unavailable`, so an actor that dies on
    /// every start is not spun on. Logged and counted (`actor_crash_loops_total`).
    fn get_or_start<K: Eq + Hash + Copy, A: Actor>(
        &self,
        map: &Mutex<HashMap<K, Addr<A>>>,
        id: K,
        entity: Entity,
        start: impl FnOnce() -> Addr<A>,
    ) -> Result<Addr<A>, ActorError> {
        let kind = match entity {
            Entity::User(_) => "user",
            Entity::Conversation(_) => "conversation",
            Entity::Group(_) => "group",
        };
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(addr) = map.get(&id) {
            if addr.connected() {
                return Ok(addr.clone());
            }
            map.remove(&id);
            self.died(entity, kind);
        }
        let fenced = self
            .fence
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|leaving| leaving(&entity.ring_key()));
        if fenced {
            return Err(ActorError::Unavailable);
        }
        let now = Instant::now();
        let backing_off = self
            .deaths
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&entity)
            .is_some_and(|d| now < d.not_before);
        if backing_off {
            return Err(ActorError::Unavailable);
        }
        let addr = start();
        map.insert(id, addr.clone());
        if let Some(d) = self
            .deaths
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&entity)
        {
            d.started = Some(now);
        }
        Ok(addr)
    }

    /// Entities that died with work of their own (conversations, groups) and may start
    /// again now: the node calls them so they resume it (a killed conversation with a
    /// fan-out in flight would otherwise wait for the next call to it).
    pub fn due_revivals(&self) -> Vec<Entity> {
        let now = Instant::now();
        let mut deaths = self.deaths.lock().unwrap_or_else(|p| p.into_inner());
        deaths
            .iter_mut()
            .filter(|(_, d)| d.revive && now >= d.not_before)
            .map(|(e, d)| {
                d.revive = false;
                *e
            })
            .collect()
    }

    /// Records that `entity`'s actor died, and decides when it may start again.
    fn died(&self, entity: Entity, kind: &'static str) {
        let now = Instant::now();
        metrics().actor_restarts.with_label_values(&[kind]).inc();
        let mut deaths = self.deaths.lock().unwrap_or_else(|p| p.into_inner());
        if deaths.len() > 10_000 {
            deaths.retain(|_, d| now.duration_since(d.last) < CRASH_WINDOW);
        }
        let d = deaths.entry(entity).or_insert(Deaths {
            count: 0,
            last: now,
            started: None,
            not_before: now,
            revive: false,
        });
        let healthy = d
            .started
            .is_some_and(|s| now.duration_since(s) >= HEALTHY_AFTER);
        if healthy || now.duration_since(d.last) > CRASH_WINDOW {
            d.count = 0;
        }
        d.count += 1;
        d.last = now;
        d.started = None;
        d.revive = !matches!(entity, Entity::User(_));
        if d.count <= FREE_RESTARTS {
            tracing::warn!(%entity, "entity actor died; restarting it from storage");
            return;
        }
        let doublings = (d.count - FREE_RESTARTS - 1).min(16);
        let delay = (BACKOFF_FIRST * 2u32.pow(doublings)).min(BACKOFF_MAX);
        d.not_before = now + delay;
        metrics().actor_crash_loops.with_label_values(&[kind]).inc();
        tracing::error!(%entity, deaths = d.count, delay_ms = delay.as_millis() as u64, "entity actor keeps dying; restarting it after a delay");
    }

    /// Stops `entity`'s actor abruptly, as a panic would (chaos testing). An actor that
    /// is not running is left as it is: there is nothing to stop (and a kill must not
    /// count as a crash of an actor nobody was using).
    pub fn kill(&self, entity: Entity) {
        fn stop<K: Eq + Hash, A>(map: &Mutex<HashMap<K, Addr<A>>>, id: &K)
        where
            A: Actor<Context = actix::Context<A>> + actix::Handler<Kill>,
        {
            let map = map.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(addr) = map.get(id).filter(|a| a.connected()) {
                addr.do_send(Kill);
            }
        }
        match entity {
            Entity::User(id) => stop(&self.users, &id),
            Entity::Conversation(id) => stop(&self.conversations, &id),
            Entity::Group(id) => stop(&self.groups, &id),
        }
    }

    /// A running entity actor picked at random, if any runs here.
    pub fn random_running(&self) -> Option<Entity> {
        fn live<K: Copy, A: Actor>(
            map: &Mutex<HashMap<K, Addr<A>>>,
            wrap: fn(K) -> Entity,
        ) -> Vec<Entity> {
            let map = map.lock().unwrap_or_else(|p| p.into_inner());
            map.iter()
                .filter(|(_, a)| a.connected())
                .map(|(k, _)| wrap(*k))
                .collect()
        }
        let mut all = live(&self.users, Entity::User);
        all.extend(live(&self.conversations, Entity::Conversation));
        all.extend(live(&self.groups, Entity::Group));
        if all.is_empty() {
            return None;
        }
        let pick = usize::from_le_bytes(
            uuid::Uuid::new_v4().as_bytes()[..8]
                .try_into()
                .unwrap_or_default(),
        );
        Some(all[pick % all.len()])
    }

    /// The user's actor if it is running. A user with a live session always has a
    /// running actor (sessions keep it from idling out), so a user without one has no
    /// session to notify.
    pub fn running_user(&self, id: UserId) -> Option<Addr<UserActor>> {
        let map = self.users.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&id).filter(|a| a.connected()).cloned()
    }

    /// How many entities this node stores, counted on the blocking pool (it seeks
    /// through the whole key space, one seek per entity).
    pub async fn entity_count(&self) -> Result<u64, ActorError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.entity_counts().map(|c| c.total()))
            .await
            .map_err(|e| ActorError::Internal(e.to_string()))?
            .map_err(ActorError::from)
    }

    /// Every running user actor on this node.
    pub fn running_users(&self) -> Vec<Addr<UserActor>> {
        let map = self.users.lock().unwrap_or_else(|p| p.into_inner());
        map.values().filter(|a| a.connected()).cloned().collect()
    }

    /// Makes a starting actor wait (mailbox held) for a flush, so that what it loaded
    /// is durable before it serves anything: sled may hold writes in memory that a
    /// failed or killed predecessor never flushed. If the flush fails, `failed`
    /// records the error and the actor stops; once it succeeds, `ready` runs (work the
    /// actor starts on its own, such as fan-out, must wait for it too).
    pub(crate) fn wait_durable<A>(
        &self,
        ctx: &mut actix::Context<A>,
        failed: fn(&mut A, ActorError),
        ready: fn(&mut A, &mut actix::Context<A>),
    ) where
        A: Actor<Context = actix::Context<A>>,
    {
        use actix::{ActorContext, ActorFutureExt, AsyncContext};
        let store = self.store.clone();
        ctx.wait(
            actix::fut::wrap_future::<_, A>(async move { store.commit(0).await }).map(
                move |res, act, ctx| match res {
                    Ok(()) => ready(act, ctx),
                    Err(e) => {
                        tracing::error!(error = %e, "flush failed while starting an entity actor");
                        failed(act, e.into());
                        ctx.stop();
                    }
                },
            ),
        );
    }

    /// Starts an upload into the media store.
    pub async fn media_writer(&self) -> Result<MediaWriter, ActorError> {
        Ok(self.store.media_writer().await?)
    }

    /// Makes a finished upload durable and records it; the answer for `POST /media`.
    pub async fn save_media(
        &self,
        writer: MediaWriter,
        media_id: uuid::Uuid,
        content_type: String,
        uploader: UserId,
    ) -> Result<MediaRecord, ActorError> {
        // The file and its record together, so a handoff never removes bytes a new
        // record is about to name.
        let _media = self.store.lock_media().await;
        let (sha256, size) = writer.finish().await?;
        let rec = MediaRecord {
            media_id,
            sha256,
            size,
            content_type,
            uploader,
            created_at: crate::now_ms(),
        };
        self.store.put_media(&rec)?;
        self.store.commit(1).await?;
        Ok(rec)
    }

    /// The media `user` may read, with the path of its bytes. Readable by its uploader
    /// and by members of a conversation holding a message that references it.
    pub async fn readable_media(
        &self,
        user: UserId,
        id: uuid::Uuid,
    ) -> Result<(MediaRecord, std::path::PathBuf), ActorError> {
        let rec = self.store.media(id)?.ok_or(ActorError::UnknownMedia)?;
        if !self.can_read(user, &rec).await? {
            return Err(ActorError::MediaForbidden);
        }
        let path = self.store.media_path(&rec.sha256);
        Ok((rec, path))
    }

    /// The media access rule: its uploader, and the members of a conversation holding
    /// a message that references it (asked of each conversation's home).
    async fn can_read(&self, user: UserId, rec: &MediaRecord) -> Result<bool, ActorError> {
        if rec.uploader == user {
            return Ok(true);
        }
        let route = self.route().ok_or(ActorError::Unavailable)?;
        // Asked side by side: a media forwarded into many conversations costs one
        // round of calls, not one per conversation in a row.
        let asks = self
            .store
            .media_refs(rec.media_id)?
            .into_iter()
            .map(|c| route.conversation(c, ConversationRequest::IsMember { user }));
        Ok(futures_util::future::join_all(asks)
            .await
            .iter()
            .any(Result::is_ok))
    }

    /// Lets `user` attach the media to a message in `conversation`: the media exists,
    /// `user` uploaded it or is a member of a conversation already holding it, and
    /// `user` is a member of `conversation` (a direct chat with `peer` counts: this very
    /// send creates it). Then records, durably, that `conversation` references it, so
    /// the message, once stored, is readable by its members. Runs at the media's home.
    ///
    /// If the send then fails, the reference stays: the conversation's members may read
    /// a media its sender meant to share with them.
    pub async fn reference_media(
        &self,
        user: UserId,
        id: uuid::Uuid,
        conversation: ConversationId,
        peer: Option<UserId>,
    ) -> Result<(), ActorError> {
        let rec = self.store.media(id)?.ok_or(ActorError::UnknownMedia)?;
        let route = self.route().ok_or(ActorError::Unavailable)?;
        let direct = peer.is_some_and(|p| ConversationId::direct(user, p) == conversation);
        if !direct {
            route
                .conversation(conversation, ConversationRequest::IsMember { user })
                .await?;
        }
        if !self.can_read(user, &rec).await? {
            return Err(ActorError::MediaForbidden);
        }
        self.store.add_media_ref(id, conversation)?;
        self.store.commit(1).await?;
        Ok(())
    }

    /// Claims `handle` for `user`, durably. `Some(owner)` if someone else holds it.
    /// Handles are entities with no state beyond their owner, so a compare-and-swap at
    /// their home node is all the "actor" they need.
    pub async fn claim_handle(
        &self,
        handle: &str,
        user: UserId,
    ) -> Result<Option<UserId>, ActorError> {
        let owner = self.store.claim_handle(handle, user)?;
        self.store.commit(1).await?;
        Ok(owner)
    }

    pub fn release_handle(&self, handle: &str, user: UserId) -> Result<(), ActorError> {
        Ok(self.store.release_handle(handle, user)?)
    }

    pub fn resolve_handle(&self, handle: &str) -> Result<Option<UserId>, ActorError> {
        Ok(self.store.handle_owner(handle)?)
    }

    /// Conversations whose fan-out was still pending when the node last stopped.
    pub fn pending_fanouts(&self) -> Result<Vec<ConversationId>, ActorError> {
        Ok(self.store.pending_fanouts()?)
    }

    /// Groups with a membership change not yet announced when the node last stopped.
    pub fn pending_groups(&self) -> Result<Vec<GroupId>, ActorError> {
        Ok(self.store.pending_groups()?)
    }

    /// The disk's last failure, while it keeps failing (for `/healthz`).
    pub fn storage_failure(&self) -> Option<String> {
        self.store.failure()
    }

    /// Stops, for good, the running actors of the entities whose ring key `leaving`
    /// picks (they are moving to another node), and waits until each has stopped. Until
    /// `unfence`, such actors are not started here again (a lookup answers
    /// `Unavailable`), whatever path asks.
    pub async fn retire(&self, leaving: impl Fn(&str) -> bool + Send + Sync + 'static) {
        let leaving: Fence = Arc::new(leaving);
        *self.fence.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&leaving));
        async fn stop_all<K, A>(map: &Mutex<HashMap<K, Addr<A>>>, pick: impl Fn(&K) -> bool)
        where
            K: Eq + Hash + Copy,
            A: Actor<Context = actix::Context<A>> + actix::Handler<Retire>,
        {
            let addrs: Vec<Addr<A>> = {
                let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
                let keys: Vec<K> = map.keys().filter(|k| pick(k)).copied().collect();
                keys.iter().filter_map(|k| map.remove(k)).collect()
            };
            let stops = addrs.iter().map(|a| a.send(Retire));
            // An actor already dead answers with an error: it is stopped either way.
            let _ = futures_util::future::join_all(stops).await;
        }
        stop_all(&self.users, |id: &UserId| leaving(&id.ring_key())).await;
        stop_all(&self.conversations, |id: &ConversationId| {
            leaving(&id.ring_key())
        })
        .await;
        stop_all(&self.groups, |id: &GroupId| leaving(&id.ring_key())).await;
    }

    /// Ends the fence of `retire` (the ring change is committed).
    pub fn unfence(&self) {
        *self.fence.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Called by a stopping user actor: later calls start a fresh one. An actor that
    /// stops because it panicked (actix still runs `stopping` while the panic unwinds)
    /// is recorded as a death, for crash-loop backoff.
    pub(crate) fn forget_user(&self, id: UserId, addr: &Addr<UserActor>) {
        if forget(&self.users, id, addr) && std::thread::panicking() {
            self.died(Entity::User(id), "user");
        }
    }

    pub(crate) fn forget_group(&self, id: GroupId, addr: &Addr<GroupActor>) {
        if forget(&self.groups, id, addr) && std::thread::panicking() {
            self.died(Entity::Group(id), "group");
        }
    }

    pub(crate) fn forget_conversation(&self, id: ConversationId, addr: &Addr<ConversationActor>) {
        if forget(&self.conversations, id, addr) && std::thread::panicking() {
            self.died(Entity::Conversation(id), "conversation");
        }
    }

    fn arbiter_for(&self, id: &[u8; 16]) -> ArbiterHandle {
        let h = id
            .iter()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(*b as usize));
        self.arbiters[h % self.arbiters.len()].clone()
    }
}

/// Calls waiting at one user actor before senders wait for room.
pub(crate) const USER_MAILBOX: usize = 1024;
/// Calls waiting at one conversation actor before senders wait for room.
pub(crate) const CONVERSATION_MAILBOX: usize = 4096;
/// Calls waiting at one group actor (membership changes are rare and serialised).
pub(crate) const GROUP_MAILBOX: usize = 256;

/// Starts an actor on `arbiter` with its mailbox created at `capacity`.
///
/// Not `Actor::start_in_arbiter`: that creates the mailbox with actix's default of 16
/// and the actor can raise it only once it runs. Calls sent in between find a "full"
/// mailbox, park, and are enqueued when woken, in no particular order, which would
/// reorder a burst of sends to a conversation that was just started.
fn start_on<A>(
    arbiter: &ArbiterHandle,
    capacity: usize,
    make: impl FnOnce() -> A + Send + 'static,
) -> Addr<A>
where
    A: Actor<Context = actix::Context<A>>,
{
    let (tx, rx) = actix::dev::channel::channel(capacity);
    arbiter.spawn_fn(move || {
        let ctx = actix::Context::with_receiver(rx);
        actix::spawn(ctx.into_future(make()));
    });
    Addr::new(tx)
}

/// Removes `addr` as `id`'s actor, if it still is; whether it was.
fn forget<K: Eq + Hash, A: Actor>(map: &Mutex<HashMap<K, Addr<A>>>, id: K, addr: &Addr<A>) -> bool {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if map.get(&id) == Some(addr) {
        map.remove(&id);
        true
    } else {
        false
    }
}
