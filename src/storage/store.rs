//! The typed storage API over sled. Key layouts are in `keys`, value encoding in `codec`.
//!
//! Methods that write several records of one entity use one `sled::Batch`, which sled
//! applies atomically: a crash never leaves a message without its idempotency entry, or
//! an inbox run without the conversation record its recovery needs.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use sled::{Batch, IVec, Tree};

use super::codec::{decode, encode};
use super::commit::Committer;
use super::error::StorageError;
use super::keys::{self, *};
use super::records::*;
use crate::ids::{ConversationId, GroupId, UserId};

type Result<T> = std::result::Result<T, StorageError>;

/// Memory sled may use for its page cache.
const CACHE_BYTES: u64 = 256 * 1024 * 1024;

/// The layout this build writes, kept in the `meta` tree. 1 (no key): one inbox record
/// per entry; 2: one per append (`InboxRun`). Older data is rewritten when opened.
const FORMAT: u32 = 2;
const FORMAT_KEY: &[u8] = b"format";
/// Inbox records rewritten per batch by the format upgrade.
const UPGRADE_CHUNK: usize = 10_000;

/// A node's database. Cheap to clone; all clones share one sled instance and flusher.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    users: Tree,
    handles: Tree,
    conversations: Tree,
    fanout: Tree,
    media: Tree,
    groups: Tree,
    /// Groups with a change their conversation has not confirmed.
    groups_pending: Tree,
    meta: Tree,
    media_dir: std::path::PathBuf,
    /// See `lock_media`.
    media_lock: tokio::sync::Mutex<()>,
    committer: Committer,
}

impl Store {
    /// Opens (or creates) the database under `dir` and starts its group-commit thread.
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir)?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let committer = Committer::start(db.clone(), dir)?;
        let media_dir = dir.join("media");
        std::fs::create_dir_all(&media_dir)?;
        super::media::sweep_tmp(&media_dir);
        let store = Store {
            inner: Arc::new(Inner {
                users: db.open_tree("users")?,
                handles: db.open_tree("handles")?,
                conversations: db.open_tree("conversations")?,
                fanout: db.open_tree("fanout")?,
                media: db.open_tree("media")?,
                groups: db.open_tree("groups")?,
                groups_pending: db.open_tree("groups_pending")?,
                meta: db.open_tree("meta")?,
                media_dir,
                media_lock: tokio::sync::Mutex::new(()),
                committer,
            }),
        };
        store.upgrade()?;
        Ok(store)
    }

    /// Brings data written by an older build to `FORMAT`, durably, before anything
    /// reads it.
    fn upgrade(&self) -> Result<()> {
        let format: u32 = get(&self.inner.meta, "meta", FORMAT_KEY)?.unwrap_or(1);
        if format > FORMAT {
            return Err(corrupt(
                "meta",
                FORMAT_KEY,
                &format!("storage format {format} is newer than this build's ({FORMAT})"),
            ));
        }
        if format == FORMAT {
            return Ok(());
        }
        // Format 1 kept one `InboxEntry` per inbox seq: each becomes a run of one. Its
        // conversation heads were exact, so each user gets a heads checkpoint at its
        // inbox head. Written in chunks (a node's inboxes need not fit in memory), and
        // safe to run again after a crash part-way: a value that already reads as a run
        // is left alone, and the format key is written last.
        let users = &self.inner.users;
        let mut batch = Batch::default();
        let mut in_batch = 0usize;
        let mut rewritten = 0u64;
        let mut last: Option<([u8; 16], u64)> = None;
        let checkpoint = |batch: &mut Batch, last: Option<([u8; 16], u64)>| -> Result<()> {
            if let Some((user, head)) = last {
                batch.insert(tagged(&user, USER_HEADS), encode(&head)?);
            }
            Ok(())
        };
        for item in users.iter() {
            let (k, v) = item?;
            let Some(inbox_seq) = seq_suffix(&k).filter(|_| k.get(16) == Some(&USER_INBOX)) else {
                continue;
            };
            let user: [u8; 16] = k[..16]
                .try_into()
                .map_err(|_| corrupt("users", &k, "key length"))?;
            if last.is_some_and(|(u, _)| u != user) {
                checkpoint(&mut batch, last)?;
            }
            if decode::<InboxRun>("users", &k, &v).is_err() {
                let old: InboxEntry = decode("users", &k, &v)?;
                let run = InboxRun {
                    conversation_id: old.conversation_id,
                    seqs: vec![old.seq],
                };
                batch.insert(k, encode(&run)?);
                rewritten += 1;
            }
            last = Some((user, inbox_seq));
            in_batch += 1;
            if in_batch >= UPGRADE_CHUNK {
                users.apply_batch(std::mem::take(&mut batch))?;
                in_batch = 0;
            }
        }
        checkpoint(&mut batch, last)?;
        users.apply_batch(batch)?;
        // The rewritten records reach the disk before the key that says they are done.
        self.inner.meta.flush()?;
        self.inner.meta.insert(FORMAT_KEY, encode(&FORMAT)?)?;
        self.inner.meta.flush()?;
        tracing::info!(
            from = format,
            to = FORMAT,
            inbox_entries = rewritten,
            "storage format upgraded"
        );
        Ok(())
    }

    /// Resolves when every write made before the call is flushed to disk (group commit).
    /// `weight` is how many writes the caller stands for, for the batch-size metric.
    pub async fn commit(&self, weight: u32) -> Result<()> {
        self.inner.committer.commit(weight).await
    }

    /// The last flush failure, while the disk keeps failing.
    /// Chaos testing: every commit fails for the next `for_ms` milliseconds, as if the
    /// disk returned an I/O error (nothing is flushed meanwhile).
    pub fn inject_failures(&self, for_ms: u64) {
        self.inner.committer.inject_failures(for_ms);
    }

    pub fn failure(&self) -> Option<String> {
        self.inner.committer.failure()
    }

    // ---- media ----------------------------------------------------------------------

    /// Starts writing an upload into the media store.
    pub async fn media_writer(&self) -> Result<super::MediaWriter> {
        super::MediaWriter::create(&self.inner.media_dir).await
    }

    /// Where the bytes with this hash live.
    pub fn media_path(&self, sha256: &str) -> std::path::PathBuf {
        self.inner.media_dir.join(sha256)
    }

    pub fn put_media(&self, rec: &MediaRecord) -> Result<()> {
        let key = tagged(rec.media_id.as_bytes(), MEDIA_RECORD);
        self.inner.media.insert(key, encode(rec)?)?;
        Ok(())
    }

    pub fn media(&self, id: uuid::Uuid) -> Result<Option<MediaRecord>> {
        get(
            &self.inner.media,
            "media",
            &tagged(id.as_bytes(), MEDIA_RECORD),
        )
    }

    /// Records that a message in `conversation` references the media.
    pub fn add_media_ref(&self, id: uuid::Uuid, conversation: ConversationId) -> Result<()> {
        let key = with_parts(id.as_bytes(), MEDIA_REF, &[conversation.as_bytes()]);
        self.inner.media.insert(key, &[])?;
        Ok(())
    }

    /// Conversations holding a message that references the media.
    pub fn media_refs(&self, id: uuid::Uuid) -> Result<Vec<ConversationId>> {
        let prefix = tagged(id.as_bytes(), MEDIA_REF);
        let mut out = Vec::new();
        for item in self.inner.media.scan_prefix(&prefix).keys() {
            let k = item?;
            let raw: [u8; 16] = key_suffix("media", &k, "reference key length")?;
            out.push(ConversationId(uuid::Uuid::from_bytes(raw)));
        }
        Ok(out)
    }

    // ---- users ----------------------------------------------------------------------

    pub fn user(&self, id: UserId) -> Result<Option<UserRecord>> {
        get(
            &self.inner.users,
            "users",
            &tagged(id.as_bytes(), USER_PROFILE),
        )
    }

    pub fn put_user(&self, rec: &UserRecord) -> Result<()> {
        let key = tagged(rec.user_id.as_bytes(), USER_PROFILE);
        self.inner.users.insert(key, encode(rec)?)?;
        Ok(())
    }

    /// Claims `handle` for `user`. `Ok(None)` if it is now (or already was) theirs,
    /// `Ok(Some(owner))` if someone else holds it.
    pub fn claim_handle(&self, handle: &str, user: UserId) -> Result<Option<UserId>> {
        let swapped = self.inner.handles.compare_and_swap(
            handle.as_bytes(),
            None as Option<&[u8]>,
            Some(&user.as_bytes()[..]),
        )?;
        match swapped {
            Ok(()) => Ok(None),
            Err(current) => {
                let owner = current
                    .current
                    .map(|v| user_id_value(handle, &v))
                    .transpose()?;
                Ok(owner.filter(|o| *o != user))
            }
        }
    }

    /// Frees `handle` if `user` holds it (undoing a registration that failed half-way).
    pub fn release_handle(&self, handle: &str, user: UserId) -> Result<()> {
        let _ = self.inner.handles.compare_and_swap(
            handle.as_bytes(),
            Some(&user.as_bytes()[..]),
            None as Option<&[u8]>,
        )?;
        Ok(())
    }

    pub fn handle_owner(&self, handle: &str) -> Result<Option<UserId>> {
        self.inner
            .handles
            .get(handle.as_bytes())?
            .map(|v| user_id_value(handle, &v))
            .transpose()
    }

    pub fn tokens(&self, user: UserId) -> Result<Vec<([u8; 32], TokenRecord)>> {
        let prefix = tagged(user.as_bytes(), USER_TOKEN);
        let mut out = Vec::new();
        for item in self.inner.users.scan_prefix(&prefix) {
            let (k, v) = item?;
            let hash: [u8; 32] = key_suffix("users", &k, "token key length")?;
            out.push((hash, decode("users", &k, &v)?));
        }
        Ok(out)
    }

    pub fn put_token(&self, user: UserId, hash: &[u8; 32], rec: TokenRecord) -> Result<()> {
        let key = with_parts(user.as_bytes(), USER_TOKEN, &[hash]);
        self.inner.users.insert(key, encode(&rec)?)?;
        Ok(())
    }

    pub fn remove_token(&self, user: UserId, hash: &[u8; 32]) -> Result<()> {
        let key = with_parts(user.as_bytes(), USER_TOKEN, &[hash]);
        self.inner.users.remove(key)?;
        Ok(())
    }

    pub fn contacts(&self, user: UserId) -> Result<Vec<UserId>> {
        let prefix = tagged(user.as_bytes(), USER_CONTACT);
        let mut out = Vec::new();
        for item in self.inner.users.scan_prefix(&prefix) {
            let (k, _) = item?;
            let raw: [u8; 16] = key_suffix("users", &k, "contact key length")?;
            out.push(UserId(uuid::Uuid::from_bytes(raw)));
        }
        Ok(out)
    }

    pub fn put_contact(&self, user: UserId, contact: UserId, added_at: i64) -> Result<()> {
        let key = with_parts(user.as_bytes(), USER_CONTACT, &[contact.as_bytes()]);
        self.inner.users.insert(key, encode(&added_at)?)?;
        Ok(())
    }

    pub fn remove_contact(&self, user: UserId, contact: UserId) -> Result<()> {
        let key = with_parts(user.as_bytes(), USER_CONTACT, &[contact.as_bytes()]);
        self.inner.users.remove(key)?;
        Ok(())
    }

    pub fn key_bundle(&self, user: UserId) -> Result<Option<KeyBundle>> {
        get(
            &self.inner.users,
            "users",
            &tagged(user.as_bytes(), USER_KEYS),
        )
    }

    /// Publishes a key bundle. With `replace_prekeys` the one-time prekey pool is
    /// emptied first (a new identity key invalidates the old ones); `prekeys` are then
    /// added after the highest existing one. One atomic batch.
    pub fn put_keys(
        &self,
        user: UserId,
        bundle: &KeyBundle,
        prekeys: &[String],
        replace_prekeys: bool,
    ) -> Result<()> {
        let users = &self.inner.users;
        let prefix = tagged(user.as_bytes(), USER_PREKEY);
        let mut batch = Batch::default();
        let mut next = 1;
        if replace_prekeys {
            for item in users.scan_prefix(&prefix) {
                batch.remove(item?.0);
            }
        } else if let Some(item) = users.scan_prefix(&prefix).next_back() {
            let (k, _) = item?;
            next = seq_suffix(&k).ok_or_else(|| corrupt("users", &k, "prekey key length"))? + 1;
        }
        batch.insert(tagged(user.as_bytes(), USER_KEYS), encode(bundle)?);
        for (seq, prekey) in (next..).zip(prekeys) {
            batch.insert(with_seq(user.as_bytes(), USER_PREKEY, seq), encode(prekey)?);
        }
        users.apply_batch(batch)?;
        Ok(())
    }

    pub fn prekey_count(&self, user: UserId) -> Result<usize> {
        let prefix = tagged(user.as_bytes(), USER_PREKEY);
        let mut n = 0;
        for item in self.inner.users.scan_prefix(&prefix).keys() {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// Removes and returns the oldest one-time prekey, if any. Callers serialise claims
    /// (the user's actor does), so no prekey is returned twice.
    pub fn take_prekey(&self, user: UserId) -> Result<Option<String>> {
        let prefix = tagged(user.as_bytes(), USER_PREKEY);
        let Some(item) = self.inner.users.scan_prefix(&prefix).next() else {
            return Ok(None);
        };
        let (k, v) = item?;
        let prekey = decode("users", &k, &v)?;
        self.inner.users.remove(k)?;
        Ok(Some(prekey))
    }

    /// The highest inbox seq of `user` (0 for an empty inbox).
    pub fn inbox_head(&self, user: UserId) -> Result<u64> {
        let prefix = tagged(user.as_bytes(), USER_INBOX);
        match self.inner.users.scan_prefix(&prefix).next_back() {
            Some(item) => {
                let (k, v) = item?;
                let (first, run) = decode_run(&k, &v)?;
                Ok(first + run.seqs.len() as u64 - 1)
            }
            None => Ok(0),
        }
    }

    /// Up to `limit` inbox entries with `after < inbox_seq <= upto`, in order.
    pub fn inbox_range(
        &self,
        user: UserId,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, InboxEntry)>> {
        if after >= upto || limit == 0 {
            return Ok(Vec::new());
        }
        let id = user.as_bytes();
        let want = after.saturating_add(1);
        // The run holding `want` starts at or before it: the last run key <= want.
        let start = match self
            .inner
            .users
            .range(with_seq(id, USER_INBOX, 0)..=with_seq(id, USER_INBOX, want))
            .next_back()
        {
            Some(item) => item?.0.to_vec(),
            None => with_seq(id, USER_INBOX, want),
        };
        let mut out = Vec::new();
        for item in self
            .inner
            .users
            .range(start..=with_seq(id, USER_INBOX, upto))
        {
            let (k, v) = item?;
            let (first, run) = decode_run(&k, &v)?;
            for (inbox_seq, seq) in (first..).zip(run.seqs) {
                if inbox_seq <= after {
                    continue;
                }
                if inbox_seq > upto || out.len() == limit {
                    return Ok(out);
                }
                out.push((
                    inbox_seq,
                    InboxEntry {
                        conversation_id: run.conversation_id,
                        seq,
                    },
                ));
            }
        }
        Ok(out)
    }

    /// The inbox seq up to which the stored conversation heads of `user` are exact (see
    /// [`UserConversation`]).
    pub fn heads_at(&self, user: UserId) -> Result<u64> {
        Ok(get(
            &self.inner.users,
            "users",
            &tagged(user.as_bytes(), USER_HEADS),
        )?
        .unwrap_or(0))
    }

    /// Appends one run to the inbox, from inbox seq `first` on, with the conversation
    /// records in `records` (a conversation new to the user, or every head of a
    /// checkpoint) and the new checkpoint `heads_at`, all atomically.
    pub fn append_inbox(
        &self,
        user: UserId,
        first: u64,
        run: &InboxRun,
        records: &[&UserConversation],
        heads_at: Option<u64>,
    ) -> Result<()> {
        let mut batch = heads_batch(user, records, heads_at)?;
        batch.insert(with_seq(user.as_bytes(), USER_INBOX, first), encode(run)?);
        self.inner.users.apply_batch(batch)?;
        Ok(())
    }

    /// Writes a heads checkpoint: `records`' heads are exact up to inbox seq `at`.
    pub fn checkpoint_heads(
        &self,
        user: UserId,
        records: &[&UserConversation],
        at: u64,
    ) -> Result<()> {
        self.inner
            .users
            .apply_batch(heads_batch(user, records, Some(at))?)?;
        Ok(())
    }

    pub fn user_conversations(&self, user: UserId) -> Result<Vec<UserConversation>> {
        let prefix = tagged(user.as_bytes(), USER_CONVERSATION);
        self.inner
            .users
            .scan_prefix(&prefix)
            .map(|item| {
                let (k, v) = item?;
                decode("users", &k, &v)
            })
            .collect()
    }

    // ---- conversations --------------------------------------------------------------

    pub fn conversation(&self, id: ConversationId) -> Result<Option<ConversationRecord>> {
        get(
            &self.inner.conversations,
            "conversations",
            &tagged(id.as_bytes(), CONV_RECORD),
        )
    }

    pub fn put_conversation(&self, rec: &ConversationRecord) -> Result<()> {
        let key = tagged(rec.conversation_id.as_bytes(), CONV_RECORD);
        self.inner.conversations.insert(key, encode(rec)?)?;
        Ok(())
    }

    /// The highest message seq of the conversation (0 if it has none).
    pub fn last_seq(&self, id: ConversationId) -> Result<u64> {
        let prefix = tagged(id.as_bytes(), CONV_MESSAGE);
        match self.inner.conversations.scan_prefix(&prefix).next_back() {
            Some(item) => {
                let (k, _) = item?;
                seq_suffix(&k).ok_or_else(|| corrupt("conversations", &k, "message key length"))
            }
            None => Ok(0),
        }
    }

    /// Stores a message and, for user messages, its idempotency entry, atomically.
    pub fn put_message(&self, msg: &MessageRecord) -> Result<()> {
        let cid = msg.conversation_id.as_bytes();
        let mut batch = Batch::default();
        batch.insert(with_seq(cid, CONV_MESSAGE, msg.seq), encode(msg)?);
        if let Some(cmid) = msg.client_msg_id {
            let key = with_parts(
                cid,
                CONV_IDEMPOTENCY,
                &[msg.sender_id.as_bytes(), cmid.as_bytes()],
            );
            batch.insert(key, encode(&msg.seq)?);
        }
        self.inner.conversations.apply_batch(batch)?;
        Ok(())
    }

    /// The seq already assigned to `sender`'s `client_msg_id` in this conversation.
    pub fn idempotent_seq(
        &self,
        id: ConversationId,
        sender: UserId,
        client_msg_id: &uuid::Uuid,
    ) -> Result<Option<u64>> {
        let key = with_parts(
            id.as_bytes(),
            CONV_IDEMPOTENCY,
            &[sender.as_bytes(), client_msg_id.as_bytes()],
        );
        get(&self.inner.conversations, "conversations", &key)
    }

    pub fn message(&self, id: ConversationId, seq: u64) -> Result<Option<MessageRecord>> {
        get(
            &self.inner.conversations,
            "conversations",
            &with_seq(id.as_bytes(), CONV_MESSAGE, seq),
        )
    }

    /// Up to `limit` messages with `after < seq < before`, ascending. With `newest` the
    /// window is the last `limit` of the range, else the first.
    pub fn messages_between(
        &self,
        id: ConversationId,
        after: u64,
        before: u64,
        limit: usize,
        newest: bool,
    ) -> Result<Vec<MessageRecord>> {
        if before <= after.saturating_add(1) {
            return Ok(Vec::new());
        }
        let lo = Bound::Excluded(with_seq(id.as_bytes(), CONV_MESSAGE, after));
        let hi = Bound::Excluded(with_seq(id.as_bytes(), CONV_MESSAGE, before));
        let range = self.inner.conversations.range::<Vec<u8>, _>((lo, hi));
        let decode_item = |item: sled::Result<(IVec, IVec)>| -> Result<MessageRecord> {
            let (k, v) = item?;
            decode("conversations", &k, &v)
        };
        let mut out: Vec<MessageRecord> = if newest {
            range
                .rev()
                .take(limit)
                .map(decode_item)
                .collect::<Result<_>>()?
        } else {
            range.take(limit).map(decode_item).collect::<Result<_>>()?
        };
        if newest {
            out.reverse();
        }
        Ok(out)
    }

    pub fn watermarks(&self, id: ConversationId) -> Result<Vec<(UserId, Watermarks)>> {
        let prefix = tagged(id.as_bytes(), CONV_WATERMARK);
        let mut out = Vec::new();
        for item in self.inner.conversations.scan_prefix(&prefix) {
            let (k, v) = item?;
            let user: [u8; 16] = key_suffix("conversations", &k, "watermark key length")?;
            out.push((
                UserId(uuid::Uuid::from_bytes(user)),
                decode("conversations", &k, &v)?,
            ));
        }
        Ok(out)
    }

    pub fn put_watermarks(&self, id: ConversationId, user: UserId, wm: Watermarks) -> Result<()> {
        let key = with_parts(id.as_bytes(), CONV_WATERMARK, &[user.as_bytes()]);
        self.inner.conversations.insert(key, encode(&wm)?)?;
        Ok(())
    }

    /// A group conversation's membership (empty for direct conversations).
    pub fn membership(&self, id: ConversationId) -> Result<GroupMembership> {
        Ok(get(
            &self.inner.conversations,
            "conversations",
            &tagged(id.as_bytes(), CONV_MEMBERSHIP),
        )?
        .unwrap_or_default())
    }

    /// Applies a membership change to a group conversation: its `system` message, the
    /// new member list and the spans, in one atomic batch, so a crash never leaves a
    /// membership without the message that announces it (or the reverse).
    pub fn apply_membership(
        &self,
        record: &ConversationRecord,
        membership: &GroupMembership,
        message: &MessageRecord,
    ) -> Result<()> {
        let cid = record.conversation_id.as_bytes();
        let mut batch = Batch::default();
        batch.insert(tagged(cid, CONV_RECORD), encode(record)?);
        batch.insert(tagged(cid, CONV_MEMBERSHIP), encode(membership)?);
        batch.insert(with_seq(cid, CONV_MESSAGE, message.seq), encode(message)?);
        self.inner.conversations.apply_batch(batch)?;
        Ok(())
    }

    /// If fan-out was pending when last recorded: the seq up to which every member
    /// (current or former) had everything of its stays in its inbox; fan-out resumes
    /// after it.
    pub fn fanout_mark(&self, id: ConversationId) -> Result<Option<u64>> {
        get(
            &self.inner.conversations,
            "conversations",
            &tagged(id.as_bytes(), CONV_FANOUT),
        )
    }

    /// Records that fan-out beyond `done` is pending, so a restart resumes it.
    pub fn mark_fanout(&self, id: ConversationId, done: u64) -> Result<()> {
        self.inner.fanout.insert(id.as_bytes(), &[])?;
        self.inner
            .conversations
            .insert(tagged(id.as_bytes(), CONV_FANOUT), encode(&done)?)?;
        Ok(())
    }

    /// Fan-out has reached every member.
    pub fn clear_fanout(&self, id: ConversationId) -> Result<()> {
        self.inner
            .conversations
            .remove(tagged(id.as_bytes(), CONV_FANOUT))?;
        self.inner.fanout.remove(id.as_bytes())?;
        Ok(())
    }

    /// Conversations whose fan-out was pending when the node last stopped.
    pub fn pending_fanouts(&self) -> Result<Vec<ConversationId>> {
        marked_ids(&self.inner.fanout, "fanout", ConversationId)
    }
}

// ---- the node as a whole ---------------------------------------------------------------

/// How many entities of each kind this database holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntityCounts {
    pub users: u64,
    pub conversations: u64,
    pub groups: u64,
    pub handles: u64,
    pub media: u64,
}

impl EntityCounts {
    pub fn total(&self) -> u64 {
        self.users + self.conversations + self.groups + self.handles + self.media
    }
}

impl Store {
    /// The ring this node serves, as last committed (`None` on a fresh data dir).
    pub fn ring_record(&self) -> Result<Option<RingRecord>> {
        get(&self.inner.meta, "meta", RING_KEY)
    }

    /// Records the ring this node serves (durable at the next commit).
    pub fn put_ring_record(&self, rec: &RingRecord) -> Result<()> {
        self.inner.meta.insert(RING_KEY, encode(rec)?)?;
        Ok(())
    }

    /// Counts the entities stored here. Each entity's keys are one contiguous range
    /// under its id, so this seeks from one id to the next instead of reading every
    /// key (an inbox of a million entries costs one seek).
    pub fn entity_counts(&self) -> Result<EntityCounts> {
        Ok(EntityCounts {
            users: count_ids(&self.inner.users)?,
            conversations: count_ids(&self.inner.conversations)?,
            groups: count_ids(&self.inner.groups)?,
            handles: self.inner.handles.len() as u64,
            media: count_ids(&self.inner.media)?,
        })
    }
}

// ---- moving an entity -------------------------------------------------------------------

/// Where the ring this node serves is kept, in the `meta` tree.
const RING_KEY: &[u8] = b"ring_state";

/// One entity, named the way its keys are: what moves when its home changes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EntityKey {
    User(UserId),
    Conversation(ConversationId),
    Group(GroupId),
    Handle(String),
    Media(uuid::Uuid),
}

/// Every stored record of one entity, tree by tree, as raw keys and values (already
/// encoded: moving an entity never decodes it). Media bytes are files and move apart.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EntityDump {
    pub records: Vec<(String, Vec<u8>, Vec<u8>)>,
}

impl Store {
    /// The trees holding `entity`'s records, and in each the key prefix its keys start
    /// with (or, for a handle, the exact key: another handle may extend it).
    fn entity_ranges(&self, entity: &EntityKey) -> Vec<(&Tree, Vec<u8>, bool)> {
        let i = &self.inner;
        match entity {
            EntityKey::User(id) => vec![(&i.users, id.as_bytes().to_vec(), true)],
            EntityKey::Conversation(id) => vec![
                (&i.conversations, id.as_bytes().to_vec(), true),
                (&i.fanout, id.as_bytes().to_vec(), true),
            ],
            EntityKey::Group(id) => vec![
                (&i.groups, id.as_bytes().to_vec(), true),
                (&i.groups_pending, id.as_bytes().to_vec(), true),
            ],
            EntityKey::Handle(h) => vec![(&i.handles, h.as_bytes().to_vec(), false)],
            EntityKey::Media(id) => vec![(&i.media, id.as_bytes().to_vec(), true)],
        }
    }

    /// The keys and values of one range of `entity_ranges`.
    fn range_records(tree: &Tree, key: &[u8], prefix: bool) -> Result<Vec<(IVec, IVec)>> {
        if prefix {
            Ok(tree.scan_prefix(key).collect::<sled::Result<_>>()?)
        } else {
            Ok(tree
                .get(key)?
                .map(|v| (IVec::from(key), v))
                .into_iter()
                .collect())
        }
    }

    /// Reads every record of `entity`.
    pub fn export_entity(&self, entity: &EntityKey) -> Result<EntityDump> {
        let mut dump = EntityDump::default();
        for (tree, key, prefix) in self.entity_ranges(entity) {
            let name = String::from_utf8_lossy(&tree.name()).into_owned();
            for (k, v) in Self::range_records(tree, &key, prefix)? {
                dump.records.push((name.clone(), k.to_vec(), v.to_vec()));
            }
        }
        Ok(dump)
    }

    /// Writes an exported entity (one atomic batch per tree). Not durable until a
    /// commit; a dump naming a tree that entities do not live in is refused whole.
    pub fn import_entity(&self, dump: &EntityDump) -> Result<()> {
        let i = &self.inner;
        let trees = [
            &i.users,
            &i.conversations,
            &i.fanout,
            &i.groups,
            &i.groups_pending,
            &i.handles,
            &i.media,
        ];
        let mut batches: Vec<(&Tree, Batch)> = Vec::new();
        for (name, k, v) in &dump.records {
            let Some(tree) = trees.iter().find(|t| *t.name() == *name.as_bytes()) else {
                return Err(corrupt("import", k, &format!("unknown tree {name:?}")));
            };
            let at = match batches.iter().position(|(t, _)| t.name() == tree.name()) {
                Some(at) => at,
                None => {
                    batches.push((tree, Batch::default()));
                    batches.len() - 1
                }
            };
            batches[at].1.insert(k.as_slice(), v.as_slice());
        }
        for (tree, batch) in batches {
            tree.apply_batch(batch)?;
        }
        Ok(())
    }

    /// Removes every record of `entity` (once its new home has confirmed a copy).
    pub fn delete_entity(&self, entity: &EntityKey) -> Result<()> {
        for (tree, key, prefix) in self.entity_ranges(entity) {
            let mut batch = Batch::default();
            for (k, _) in Self::range_records(tree, &key, prefix)? {
                batch.remove(k);
            }
            tree.apply_batch(batch)?;
        }
        Ok(())
    }
}

impl EntityKey {
    /// The entity's key on the ring (see `crate::ids`).
    pub fn ring_key(&self) -> String {
        match self {
            EntityKey::User(id) => id.ring_key(),
            EntityKey::Conversation(id) => id.ring_key(),
            EntityKey::Group(id) => id.ring_key(),
            EntityKey::Handle(h) => crate::ids::handle_ring_key(h),
            EntityKey::Media(id) => crate::ids::media_ring_key(id),
        }
    }
}

impl EntityDump {
    /// The conversations with a fan-out to finish and the groups with a change to
    /// announce among these records (their marks), to resume where they arrive.
    pub fn marks(&self) -> (Vec<ConversationId>, Vec<GroupId>) {
        let id = |k: &[u8]| -> Option<uuid::Uuid> {
            Some(uuid::Uuid::from_bytes(k.get(..16)?.try_into().ok()?))
        };
        let mut conversations = Vec::new();
        let mut groups = Vec::new();
        for (tree, k, _) in &self.records {
            match tree.as_str() {
                "fanout" => conversations.extend(id(k).map(ConversationId)),
                "groups_pending" => groups.extend(id(k).map(GroupId)),
                _ => {}
            }
        }
        (conversations, groups)
    }
}

impl Store {
    /// Every entity stored here, kind by kind, each once (one seek per entity, as in
    /// `entity_counts`). An entity whose only record is a mark (fan-out, pending
    /// group change) is listed too: the mark moves with it.
    pub fn entities(&self) -> Result<Vec<EntityKey>> {
        let i = &self.inner;
        let mut out = Vec::new();
        for id in ids_in(&i.users)? {
            out.push(EntityKey::User(UserId(id)));
        }
        let mut conversations = ids_in(&i.conversations)?;
        conversations.extend(ids_in(&i.fanout)?);
        conversations.sort();
        conversations.dedup();
        out.extend(
            conversations
                .into_iter()
                .map(|id| EntityKey::Conversation(ConversationId(id))),
        );
        let mut groups = ids_in(&i.groups)?;
        groups.extend(ids_in(&i.groups_pending)?);
        groups.sort();
        groups.dedup();
        out.extend(groups.into_iter().map(|id| EntityKey::Group(GroupId(id))));
        for k in i.handles.iter().keys() {
            let k = k?;
            let handle =
                std::str::from_utf8(&k).map_err(|_| corrupt("handles", &k, "not UTF-8"))?;
            out.push(EntityKey::Handle(handle.to_string()));
        }
        out.extend(ids_in(&i.media)?.into_iter().map(EntityKey::Media));
        Ok(out)
    }

    /// Whether the bytes with this hash are stored here.
    pub fn has_media_file(&self, sha256: &str) -> bool {
        valid_sha(sha256) && self.media_path(sha256).is_file()
    }

    /// Serialises the steps that decide whether a media file is needed: an upload
    /// (its file, then its record) and the removal of files whose media moved away.
    pub async fn lock_media(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.inner.media_lock.lock().await
    }

    /// Deletes those of `files` (hashes) that no media record here names; how many
    /// went. Call with `lock_media` held.
    pub fn remove_media_files(&self, files: &[String]) -> Result<usize> {
        let mut named = std::collections::HashSet::new();
        for item in self.inner.media.iter() {
            let (k, v) = item?;
            // Reference entries (id | tag | conversation) sit beside the records.
            if k.len() == 17 && k[16] == MEDIA_RECORD {
                let rec: MediaRecord = decode("media", &k, &v)?;
                named.insert(rec.sha256);
            }
        }
        let mut removed = 0;
        for sha in files {
            if valid_sha(sha) && !named.contains(sha) && self.media_path(sha).is_file() {
                std::fs::remove_file(self.media_path(sha))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// A media file name: 64 lowercase hex digits, nothing that could leave the directory.
fn valid_sha(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The distinct 16-byte ids that keys of `tree` start with, in order.
fn ids_in(tree: &Tree) -> Result<Vec<uuid::Uuid>> {
    let mut ids = Vec::new();
    let mut from: Vec<u8> = Vec::new();
    while let Some(item) = tree.range(from.as_slice()..).next() {
        let (k, _) = item?;
        let Some(id) = k.get(..16) else {
            return Err(corrupt("entities", &k, "key shorter than an id"));
        };
        let raw: [u8; 16] = id.try_into().map_err(|_| corrupt("entities", &k, "id"))?;
        ids.push(uuid::Uuid::from_bytes(raw));
        match successor(id) {
            Some(next) => from = next,
            None => break,
        }
    }
    Ok(ids)
}

/// The ids a mark tree (one 16-byte id per key) holds.
fn marked_ids<T>(tree: &Tree, name: &'static str, wrap: fn(uuid::Uuid) -> T) -> Result<Vec<T>> {
    tree.iter()
        .keys()
        .map(|k| {
            let k = k?;
            let raw: [u8; 16] = k
                .as_ref()
                .try_into()
                .map_err(|_| corrupt(name, &k, "key length"))?;
            Ok(wrap(uuid::Uuid::from_bytes(raw)))
        })
        .collect()
}

/// Number of distinct 16-byte entity ids that keys of `tree` start with.
fn count_ids(tree: &Tree) -> Result<u64> {
    Ok(ids_in(tree)?.len() as u64)
}

/// The smallest 16-byte id greater than `id`, if any.
fn successor(id: &[u8]) -> Option<Vec<u8>> {
    let mut next = id.to_vec();
    for byte in next.iter_mut().rev() {
        if *byte == u8::MAX {
            *byte = 0;
        } else {
            *byte += 1;
            return Some(next);
        }
    }
    None
}

// ---- groups -------------------------------------------------------------------------

impl Store {
    pub fn group(&self, id: GroupId) -> Result<Option<GroupRecord>> {
        get(
            &self.inner.groups,
            "groups",
            &tagged(id.as_bytes(), GROUP_RECORD),
        )
    }

    /// Writes the group's record with a change its conversation has yet to confirm: the
    /// pending mark goes first, so a recovered record always has it.
    pub fn put_group(&self, rec: &GroupRecord) -> Result<()> {
        self.inner
            .groups_pending
            .insert(rec.group_id.as_bytes(), &[])?;
        let key = tagged(rec.group_id.as_bytes(), GROUP_RECORD);
        self.inner.groups.insert(key, encode(rec)?)?;
        Ok(())
    }

    /// Groups whose last change their conversation had not confirmed.
    pub fn pending_groups(&self) -> Result<Vec<GroupId>> {
        marked_ids(&self.inner.groups_pending, "groups_pending", GroupId)
    }

    /// The membership version the group's conversation has confirmed (0: none).
    pub fn group_applied(&self, id: GroupId) -> Result<u64> {
        Ok(get(
            &self.inner.groups,
            "groups",
            &tagged(id.as_bytes(), GROUP_APPLIED),
        )?
        .unwrap_or(0))
    }

    /// Records that the conversation confirmed `version`, the group's latest.
    pub fn set_group_applied(&self, id: GroupId, version: u64) -> Result<()> {
        let key = tagged(id.as_bytes(), GROUP_APPLIED);
        self.inner.groups.insert(key, encode(&version)?)?;
        self.inner.groups_pending.remove(id.as_bytes())?;
        Ok(())
    }
}

fn get<T: serde::de::DeserializeOwned>(
    tree: &Tree,
    name: &'static str,
    key: &[u8],
) -> Result<Option<T>> {
    tree.get(key)?.map(|v| decode(name, key, &v)).transpose()
}

fn user_id_value(handle: &str, v: &[u8]) -> Result<UserId> {
    let raw: [u8; 16] = v
        .try_into()
        .map_err(|_| corrupt("handles", handle.as_bytes(), "user id length"))?;
    Ok(UserId(uuid::Uuid::from_bytes(raw)))
}

/// The fixed-size part after `entity(16) | tag` in a key (a token hash, an id).
fn key_suffix<const N: usize>(tree: &'static str, key: &[u8], what: &str) -> Result<[u8; N]> {
    key.get(17..)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| corrupt(tree, key, what))
}

fn corrupt(tree: &'static str, key: &[u8], reason: &str) -> StorageError {
    StorageError::Corrupt {
        tree,
        key: keys::show(key),
        reason: reason.to_string(),
    }
}

/// A batch writing `user`'s conversation `records` and, with `at`, its heads checkpoint.
fn heads_batch(user: UserId, records: &[&UserConversation], at: Option<u64>) -> Result<Batch> {
    let id = user.as_bytes();
    let mut batch = Batch::default();
    for rec in records {
        batch.insert(
            with_parts(id, USER_CONVERSATION, &[rec.conversation_id.as_bytes()]),
            encode(*rec)?,
        );
    }
    if let Some(at) = at {
        batch.insert(tagged(id, USER_HEADS), encode(&at)?);
    }
    Ok(batch)
}

/// An inbox record: the inbox seq of its first entry, and the run.
fn decode_run(key: &[u8], value: &[u8]) -> Result<(u64, InboxRun)> {
    let first = seq_suffix(key).ok_or_else(|| corrupt("users", key, "inbox key length"))?;
    let run: InboxRun = decode("users", key, value)?;
    if run.seqs.is_empty() {
        return Err(corrupt("users", key, "empty inbox run"));
    }
    Ok((first, run))
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn msg(cid: ConversationId, seq: u64, sender: UserId) -> MessageRecord {
        MessageRecord {
            message_id: Uuid::now_v7(),
            conversation_id: cid,
            seq,
            sender_id: sender,
            kind: MessageKind::User,
            body: format!("m{seq}"),
            media: vec![],
            client_msg_id: Some(Uuid::from_u128(seq as u128)),
            ts: 1,
        }
    }

    #[tokio::test]
    async fn messages_page_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (cid, alice) = (ConversationId(Uuid::new_v4()), UserId::random());
        {
            let store = Store::open(dir.path()).unwrap();
            for seq in 1..=10 {
                store.put_message(&msg(cid, seq, alice)).unwrap();
            }
            store.commit(10).await.unwrap();
            assert_eq!(store.last_seq(cid).unwrap(), 10);
            let seqs = |v: Vec<MessageRecord>| v.iter().map(|m| m.seq).collect::<Vec<_>>();
            assert_eq!(
                seqs(store.messages_between(cid, 0, u64::MAX, 3, true).unwrap()),
                [8, 9, 10]
            );
            assert_eq!(
                seqs(store.messages_between(cid, 2, u64::MAX, 3, false).unwrap()),
                [3, 4, 5]
            );
            assert_eq!(
                seqs(store.messages_between(cid, 0, 5, 2, true).unwrap()),
                [3, 4]
            );
            assert_eq!(
                seqs(store.messages_between(cid, 4, 5, 9, false).unwrap()),
                Vec::<u64>::new()
            );
            assert_eq!(
                store
                    .idempotent_seq(cid, alice, &Uuid::from_u128(7))
                    .unwrap(),
                Some(7)
            );
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.last_seq(cid).unwrap(), 10);
        assert_eq!(store.message(cid, 4).unwrap().unwrap().body, "m4");
    }

    #[tokio::test]
    async fn handles_are_claimed_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (a, b) = (UserId::random(), UserId::random());
        assert_eq!(store.claim_handle("alice", a).unwrap(), None);
        assert_eq!(store.claim_handle("alice", a).unwrap(), None);
        assert_eq!(store.claim_handle("alice", b).unwrap(), Some(a));
        store.release_handle("alice", b).unwrap();
        assert_eq!(store.handle_owner("alice").unwrap(), Some(a));
        store.release_handle("alice", a).unwrap();
        assert_eq!(store.claim_handle("alice", b).unwrap(), None);
    }

    /// Appends runs of the given lengths for one conversation, numbering messages 1, 2...
    fn append_runs(store: &Store, u: UserId, cid: ConversationId, lens: &[u64]) {
        let conv = UserConversation {
            conversation_id: cid,
            kind: ConversationKind::Direct,
            peer_id: Some(u),
            head: 0,
        };
        let mut next = 1;
        for (i, len) in lens.iter().enumerate() {
            let run = InboxRun {
                conversation_id: cid,
                seqs: (next..next + len).collect(),
            };
            let records = if i == 0 { vec![&conv] } else { vec![] };
            store.append_inbox(u, next, &run, &records, None).unwrap();
            next += len;
        }
    }

    #[tokio::test]
    async fn inbox_runs_read_as_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (u, cid) = (UserId::random(), ConversationId(Uuid::new_v4()));
        assert_eq!(store.inbox_head(u).unwrap(), 0);
        append_runs(&store, u, cid, &[1, 7, 256, 36]);
        assert_eq!(store.inbox_head(u).unwrap(), 300);
        let all = store.inbox_range(u, 0, 300, usize::MAX).unwrap();
        let seqs: Vec<u64> = all.iter().map(|e| e.0).collect();
        assert_eq!(seqs, (1..=300).collect::<Vec<_>>());
        assert!(all
            .iter()
            .all(|(i, e)| e.seq == *i && e.conversation_id == cid));
        // Pages that start and end inside runs.
        let page = store.inbox_range(u, 255, 300, 10).unwrap();
        assert_eq!(page.first().map(|e| e.0), Some(256));
        assert_eq!(page.len(), 10);
        assert_eq!(store.inbox_range(u, 298, 299, 10).unwrap().len(), 1);
        assert_eq!(
            store
                .inbox_range(u, 3, 9, 100)
                .unwrap()
                .iter()
                .map(|e| e.0)
                .collect::<Vec<_>>(),
            (4..=9).collect::<Vec<_>>()
        );
        assert!(store.inbox_range(u, 300, 400, 10).unwrap().is_empty());
        // Another user's inbox is not read.
        assert!(store
            .inbox_range(UserId::random(), 0, 300, 10)
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn a_format_1_inbox_is_upgraded_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let (u, cid) = (UserId::random(), ConversationId(Uuid::new_v4()));
        {
            let store = Store::open(dir.path()).unwrap();
            // What format 1 wrote: one `InboxEntry` per inbox seq, and no format key.
            for i in 1..=5u64 {
                let entry = InboxEntry {
                    conversation_id: cid,
                    seq: 10 + i,
                };
                store
                    .inner
                    .users
                    .insert(
                        with_seq(u.as_bytes(), USER_INBOX, i),
                        encode(&entry).unwrap(),
                    )
                    .unwrap();
            }
            store.inner.meta.remove(FORMAT_KEY).unwrap();
            store.commit(1).await.unwrap();
        }
        let check = |store: &Store| {
            assert_eq!(store.inbox_head(u).unwrap(), 5);
            let entries = store.inbox_range(u, 0, 5, 10).unwrap();
            assert_eq!(
                entries.iter().map(|(i, e)| (*i, e.seq)).collect::<Vec<_>>(),
                (1..=5).map(|i| (i, 10 + i)).collect::<Vec<_>>()
            );
            // Format 1's heads were exact: the checkpoint says so.
            assert_eq!(store.heads_at(u).unwrap(), 5);
            assert_eq!(
                get::<u32>(&store.inner.meta, "meta", FORMAT_KEY).unwrap(),
                Some(FORMAT)
            );
        };
        {
            let store = Store::open(dir.path()).unwrap();
            check(&store);
            // A crash before the format key was written: the upgrade runs again over
            // records it already rewrote, and leaves them as they are.
            store.inner.meta.remove(FORMAT_KEY).unwrap();
            store.commit(1).await.unwrap();
        }
        check(&Store::open(dir.path()).unwrap());
    }

    #[tokio::test]
    async fn heads_checkpoint_is_stored_with_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (u, cid) = (UserId::random(), ConversationId(Uuid::new_v4()));
        assert_eq!(store.heads_at(u).unwrap(), 0);
        append_runs(&store, u, cid, &[3]);
        let conv = UserConversation {
            conversation_id: cid,
            kind: ConversationKind::Direct,
            peer_id: Some(u),
            head: 3,
        };
        store.checkpoint_heads(u, &[&conv], 3).unwrap();
        assert_eq!(store.heads_at(u).unwrap(), 3);
        assert_eq!(store.user_conversations(u).unwrap(), vec![conv]);
    }

    #[tokio::test]
    async fn entities_are_counted_by_id_not_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let alice = UserId::random();
        for c in [0u128, 1, u128::MAX] {
            let cid = ConversationId(Uuid::from_u128(c));
            for seq in 1..=20 {
                store.put_message(&msg(cid, seq, alice)).unwrap();
            }
        }
        store.claim_handle("alice", alice).unwrap();
        let counts = store.entity_counts().unwrap();
        assert_eq!(
            (counts.conversations, counts.handles, counts.users),
            (3, 1, 0)
        );
        assert_eq!(counts.total(), 4);
    }

    #[tokio::test]
    async fn the_ring_record_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let rec = RingRecord {
            version: 3,
            nodes: vec!["a".into(), "b".into()],
            vnodes: 64,
            moving_to: Some(vec!["a".into(), "b".into(), "c".into()]),
            handed_off: true,
        };
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.ring_record().unwrap(), None);
            store.put_ring_record(&rec).unwrap();
            store.commit(1).await.unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.ring_record().unwrap(), Some(rec));
    }

    #[tokio::test]
    async fn an_entity_moves_whole_between_stores() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (from, to) = (
            Store::open(d1.path()).unwrap(),
            Store::open(d2.path()).unwrap(),
        );
        let (cid, other, alice) = (
            ConversationId(Uuid::new_v4()),
            ConversationId(Uuid::new_v4()),
            UserId::random(),
        );
        for seq in 1..=5 {
            from.put_message(&msg(cid, seq, alice)).unwrap();
            from.put_message(&msg(other, seq, alice)).unwrap();
        }
        from.mark_fanout(cid, 3).unwrap();
        let entity = EntityKey::Conversation(cid);
        let dump = from.export_entity(&entity).unwrap();
        // 5 messages, 5 idempotency entries, the mark, and the fan-out index entry.
        assert_eq!(dump.records.len(), 12);
        to.import_entity(&dump).unwrap();
        to.commit(1).await.unwrap();
        assert_eq!(to.last_seq(cid).unwrap(), 5);
        assert_eq!(to.fanout_mark(cid).unwrap(), Some(3));
        assert_eq!(to.pending_fanouts().unwrap(), vec![cid]);
        assert_eq!(to.last_seq(other).unwrap(), 0, "only that entity moved");
        assert_eq!(to.entities().unwrap(), vec![entity.clone()]);
        assert_eq!(
            dump.marks(),
            (vec![cid], vec![]),
            "its fan-out mark travels"
        );
        from.delete_entity(&entity).unwrap();
        assert_eq!(
            from.entities().unwrap(),
            vec![EntityKey::Conversation(other)]
        );
        assert_eq!(from.last_seq(cid).unwrap(), 0);
        assert!(from.pending_fanouts().unwrap().is_empty());
        assert_eq!(from.last_seq(other).unwrap(), 5, "its neighbours stay");
        let bad = EntityDump {
            records: vec![("nope".into(), vec![1], vec![2])],
        };
        assert!(to.import_entity(&bad).is_err());
    }

    #[tokio::test]
    async fn entities_are_listed_once_and_only_unnamed_media_files_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let alice = UserId::random();
        assert_eq!(store.claim_handle("alice", alice).unwrap(), None);
        let mut kept = store.media_writer().await.unwrap();
        kept.write(b"kept").await.unwrap();
        let (kept_sha, size) = kept.finish().await.unwrap();
        let mut orphan = store.media_writer().await.unwrap();
        orphan.write(b"orphan").await.unwrap();
        let (orphan_sha, _) = orphan.finish().await.unwrap();
        let media = Uuid::new_v4();
        store
            .put_media(&MediaRecord {
                media_id: media,
                sha256: kept_sha.clone(),
                size,
                content_type: "text/plain".into(),
                uploader: alice,
                created_at: 0,
            })
            .unwrap();
        store
            .add_media_ref(media, ConversationId(Uuid::new_v4()))
            .unwrap();
        let listed = store.entities().unwrap();
        assert_eq!(
            listed,
            vec![EntityKey::Handle("alice".into()), EntityKey::Media(media)],
            "one entry per entity, however many records it has"
        );
        assert_eq!(listed[1].ring_key(), format!("media:{media}"));
        let files = [kept_sha.clone(), orphan_sha.clone()];
        assert_eq!(store.remove_media_files(&files).unwrap(), 1);
        assert!(store.has_media_file(&kept_sha));
        assert!(!store.has_media_file(&orphan_sha));
        assert!(!store.has_media_file("../db"));
    }
}
