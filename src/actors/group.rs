//! The Group actor: one per group, on the group's home node.
//!
//! Owns the group's name, its members in joining order and their roles, and decides
//! who may change them: admins add and remove, any member may leave, and when the last
//! admin leaves the longest-standing member becomes admin.
//!
//! Every call is handled atomically (the actor takes no other call until it is
//! answered). A change starts by *settling*: a change the group's conversation has not
//! confirmed is applied first, so rules are always checked against an announced
//! membership and changes reach the conversation in order. (Reads answer from the
//! durable record at once.) A change then goes:
//! 1. check the rules (roles, size, the user exists) and build the next record with
//!    `version + 1`;
//! 2. write it (and a "pending" mark) and wait for the group commit: from here on the
//!    change has happened, and the caller is told so;
//! 3. apply it to the group's conversation (`ApplyMembership`), which writes the
//!    `system` message and the new member list in one batch, so the change takes its
//!    place in the seq order; then clear the mark.
//!
//! If step 3 fails (the conversation's node is down, a crash), the change stays pending:
//! the actor retries every [`SETTLE_RETRY`] and the node wakes every marked group at
//! start-up. Applying is idempotent by version, so each change is announced exactly
//! once. A retried call that finds its change already made is answered as a success.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::fut::{ready, wrap_future};
use actix::prelude::*;
use futures_util::future::join_all;
use serde_json::json;

use super::error::ActorError;
use super::messages::*;
use super::registry::Registry;
use crate::ids::{GroupId, UserId};
use crate::metrics::metrics;
use crate::storage::{GroupEvent, GroupMember, GroupRecord, GroupRole};

const IDLE_AFTER: Duration = Duration::from_secs(60);
const IDLE_CHECK: Duration = Duration::from_secs(10);
/// How often a change the conversation has not confirmed is tried again.
pub const SETTLE_RETRY: Duration = Duration::from_secs(1);
/// Longest group name, in characters.
pub const MAX_GROUP_NAME_CHARS: usize = 100;

type Reply = ResponseActFuture<GroupActor, Result<GroupReply, ActorError>>;
type Step = ResponseActFuture<GroupActor, Result<(), ActorError>>;

fn done(r: Result<GroupReply, ActorError>) -> Reply {
    Box::pin(ready(r))
}

pub struct GroupActor {
    id: GroupId,
    registry: Arc<Registry>,
    load_error: Option<ActorError>,
    record: Option<GroupRecord>,
    /// Highest membership version the group's conversation has confirmed.
    applied: u64,
    last_call: Instant,
}

impl GroupActor {
    pub(crate) fn load(id: GroupId, registry: Arc<Registry>) -> Self {
        let mut actor = GroupActor {
            id,
            registry,
            load_error: None,
            record: None,
            applied: 0,
            last_call: Instant::now(),
        };
        let store = actor.registry.store();
        match store
            .group(id)
            .and_then(|r| Ok((r, store.group_applied(id)?)))
        {
            Ok((record, applied)) => {
                actor.record = record;
                actor.applied = applied;
            }
            Err(e) => {
                tracing::error!(group_id = %id, error = %e, "cannot load group");
                actor.load_error = Some(e.into());
            }
        }
        actor
    }

    /// The group, if `user` is one of its members.
    fn for_member(&self, user: UserId) -> Result<&GroupRecord, ActorError> {
        let record = self.record.as_ref().ok_or(ActorError::UnknownGroup)?;
        if record.members.iter().any(|m| m.user_id == user) {
            Ok(record)
        } else {
            Err(ActorError::NotMember)
        }
    }

    /// The group, if `user` is one of its admins.
    fn for_admin(&self, user: UserId) -> Result<&GroupRecord, ActorError> {
        let record = self.for_member(user)?;
        if record
            .members
            .iter()
            .any(|m| m.user_id == user && m.role == GroupRole::Admin)
        {
            Ok(record)
        } else {
            Err(ActorError::NotAdmin)
        }
    }

    /// Applies the recorded change to the conversation, unless it has confirmed it.
    fn settle(&self) -> Step {
        let Some(record) = self.record.clone() else {
            return Box::pin(ready(Ok(())));
        };
        if self.applied >= record.version {
            return Box::pin(ready(Ok(())));
        }
        let Some(route) = self.registry.route() else {
            return Box::pin(ready(Err(ActorError::Unavailable)));
        };
        let version = record.version;
        let call = route.conversation(
            record.conversation_id,
            ConversationRequest::ApplyMembership {
                group_id: record.group_id,
                version,
                members: record.members.iter().map(|m| m.user_id).collect(),
                by: record.last_by,
                body: system_body(&record.last_event),
            },
        );
        Box::pin(wrap_future::<_, Self>(call).map(move |res, act, _| {
            res?;
            act.applied = act.applied.max(version);
            // Not waited for: if it is lost, the change is applied again, harmlessly.
            if let Err(e) = act.registry.store().set_group_applied(act.id, version) {
                tracing::warn!(group_id = %act.id, error = %e, "cannot record applied version");
            }
            Ok(())
        }))
    }

    /// Whether the last change still waits for the conversation.
    fn unsettled(&self) -> bool {
        self.record
            .as_ref()
            .is_some_and(|r| self.applied < r.version)
    }

    /// Makes `next` the group: writes it durably (the change has happened), then
    /// announces it in the conversation, or leaves that to the retries.
    fn change(&mut self, next: GroupRecord) -> Reply {
        if let Err(e) = self.registry.store().put_group(&next) {
            return done(Err(e.into()));
        }
        self.record = Some(next.clone());
        let store = self.registry.store().clone();
        Box::pin(
            wrap_future::<_, Self>(async move { store.commit(1).await }).then(
                move |res, act, ctx| -> Reply {
                    if let Err(e) = res {
                        // Memory may be ahead of the disk: reload on the next call.
                        ctx.stop();
                        return done(Err(e.into()));
                    }
                    Box::pin(act.settle().map(move |res, act, _| {
                        if let Err(e) = res {
                            tracing::warn!(group_id = %act.id, error = %e, "membership change stored; announcing it later");
                        }
                        Ok(GroupReply::Group(next))
                    }))
                },
            ),
        )
    }

    /// Checks that every user exists (asking each one's owner), then runs `then`.
    fn with_existing(
        &self,
        users: Vec<UserId>,
        then: impl FnOnce(&mut Self) -> Reply + 'static,
    ) -> Reply {
        let Some(route) = self.registry.route() else {
            return done(Err(ActorError::Unavailable));
        };
        let checks = join_all(
            users
                .iter()
                .map(|u| route.user(*u, UserRequest::Profile))
                .collect::<Vec<_>>(),
        );
        Box::pin(
            wrap_future::<_, Self>(checks).then(move |answers, act, _| -> Reply {
                let mut unknown = Vec::new();
                for (user, answer) in users.into_iter().zip(answers) {
                    match answer {
                        Ok(_) => {}
                        Err(ActorError::UnknownUser) => unknown.push(user),
                        Err(e) => return done(Err(e)),
                    }
                }
                if !unknown.is_empty() {
                    return done(Err(ActorError::UnknownMembers(unknown)));
                }
                then(act)
            }),
        )
    }

    fn create(&mut self, creator: UserId, name: String, members: Vec<UserId>) -> Reply {
        if let Some(r) = &self.record {
            // A retried creation is answered with what it made.
            return done(if r.version == 1 && r.last_by == creator {
                Ok(GroupReply::Group(r.clone()))
            } else {
                Err(ActorError::Internal("group id already in use".into()))
            });
        }
        if let Err(e) = check_name(&name) {
            return done(Err(e));
        }
        let mut others: Vec<UserId> = Vec::with_capacity(members.len());
        for m in members {
            if others.contains(&m) {
                return done(Err(ActorError::BadRequest(format!(
                    "{m} is listed twice in members"
                ))));
            }
            // The creator may list itself; it is a member (the admin) either way.
            if m != creator {
                others.push(m);
            }
        }
        let max = self.registry.limits().max_group_members;
        if others.len() + 1 > max {
            return done(Err(ActorError::GroupFull(max)));
        }
        let id = self.id;
        let everyone: Vec<UserId> = std::iter::once(creator)
            .chain(others.iter().copied())
            .collect();
        let record = GroupRecord {
            group_id: id,
            conversation_id: id.conversation(),
            name: name.clone(),
            members: everyone
                .iter()
                .map(|u| GroupMember {
                    user_id: *u,
                    role: if *u == creator {
                        GroupRole::Admin
                    } else {
                        GroupRole::Member
                    },
                })
                .collect(),
            created_at: crate::now_ms(),
            version: 1,
            last_event: GroupEvent::Created {
                name,
                members: everyone,
            },
            last_by: creator,
        };
        self.with_existing(others, move |act| act.change(record))
    }

    fn add_member(&mut self, by: UserId, user: UserId) -> Reply {
        let record = match self.for_admin(by) {
            Ok(r) => r,
            Err(e) => return done(Err(e)),
        };
        if record.members.iter().any(|m| m.user_id == user) {
            // The same admin adding the same user again: a retry of the last change.
            let retry = record.last_by == by && record.last_event == GroupEvent::Added { user };
            return done(if retry {
                Ok(GroupReply::Group(record.clone()))
            } else {
                Err(ActorError::AlreadyMember)
            });
        }
        let max = self.registry.limits().max_group_members;
        if record.members.len() >= max {
            return done(Err(ActorError::GroupFull(max)));
        }
        let mut next = record.clone();
        next.members.push(GroupMember {
            user_id: user,
            role: GroupRole::Member,
        });
        next.version += 1;
        next.last_event = GroupEvent::Added { user };
        next.last_by = by;
        self.with_existing(vec![user], move |act| act.change(next))
    }

    fn remove_member(&mut self, by: UserId, user: UserId) -> Reply {
        let allowed = if by == user {
            self.for_member(by)
        } else {
            self.for_admin(by)
        };
        let record = match allowed {
            Ok(r) => r,
            // A member that left and asks again: a retry of the last change.
            Err(ActorError::NotMember) if by == user && self.last_was_removal(by, user) => {
                return done(self.current());
            }
            Err(e) => return done(Err(e)),
        };
        let Some(idx) = record.members.iter().position(|m| m.user_id == user) else {
            return done(if self.last_was_removal(by, user) {
                self.current()
            } else {
                Err(ActorError::UnknownMember)
            });
        };
        let mut next = record.clone();
        next.members.remove(idx);
        next.version += 1;
        next.last_by = by;
        next.last_event = if by == user {
            // A group is never left without an admin while it has members.
            let admins_left = next.members.iter().any(|m| m.role == GroupRole::Admin);
            let new_admin = match next.members.first_mut() {
                Some(first) if !admins_left => {
                    first.role = GroupRole::Admin;
                    Some(first.user_id)
                }
                _ => None,
            };
            GroupEvent::Left { user, new_admin }
        } else {
            GroupEvent::Removed { user }
        };
        self.change(next)
    }

    /// Whether the last change was `by` removing `user` (or `user` leaving).
    fn last_was_removal(&self, by: UserId, user: UserId) -> bool {
        self.record.as_ref().is_some_and(|r| {
            r.last_by == by
                && match r.last_event {
                    GroupEvent::Removed { user: u } | GroupEvent::Left { user: u, .. } => u == user,
                    _ => false,
                }
        })
    }

    fn current(&self) -> Result<GroupReply, ActorError> {
        self.record
            .clone()
            .map(GroupReply::Group)
            .ok_or(ActorError::UnknownGroup)
    }

    fn view(&self, user: UserId) -> Result<GroupReply, ActorError> {
        self.for_member(user).map(|r| GroupReply::Group(r.clone()))
    }
}

/// A group name: 1 to [`MAX_GROUP_NAME_CHARS`] characters, not only spaces, no control
/// characters.
fn check_name(name: &str) -> Result<(), ActorError> {
    let n = name.chars().count();
    if name.trim().is_empty() || n > MAX_GROUP_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(ActorError::InvalidName(format!(
            "name must be 1-{MAX_GROUP_NAME_CHARS} characters, not blank, without control characters"
        )));
    }
    Ok(())
}

/// The body of the `system` message that announces a change (a JSON object; see
/// `docs/PROTOCOL.md`, "System messages").
pub fn system_body(event: &GroupEvent) -> String {
    match event {
        GroupEvent::Created { name, members } => {
            json!({"event": "group_created", "name": name, "members": members})
        }
        GroupEvent::Added { user } => json!({"event": "member_added", "user_id": user}),
        GroupEvent::Removed { user } => json!({"event": "member_removed", "user_id": user}),
        GroupEvent::Left { user, new_admin } => {
            json!({"event": "member_left", "user_id": user, "new_admin": new_admin})
        }
    }
    .to_string()
}

impl Actor for GroupActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        metrics().actors.with_label_values(&["group"]).inc();
        let registry = Arc::clone(&self.registry);
        registry.wait_durable(ctx, |act: &mut Self, e| act.load_error = Some(e), |_, _| {});
        // A change the conversation never confirmed (a crash, a node down) goes out as
        // soon as it can; changes in between settle it first too.
        ctx.run_interval(SETTLE_RETRY, |act, ctx| {
            if act.unsettled() {
                ctx.wait(act.settle().map(|res, act, _| {
                    if let Err(e) = res {
                        tracing::debug!(group_id = %act.id, error = %e, "membership change still pending");
                    }
                }));
            }
        });
        ctx.run_interval(IDLE_CHECK, |act, ctx| {
            if !act.unsettled() && act.last_call.elapsed() >= IDLE_AFTER {
                ctx.stop();
            }
        });
    }

    fn stopping(&mut self, ctx: &mut Context<Self>) -> Running {
        self.registry.forget_group(self.id, &ctx.address());
        Running::Stop
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        metrics().actors.with_label_values(&["group"]).dec();
    }
}

impl Handler<GroupCall> for GroupActor {
    /// Atomic: the actor handles nothing else until the answer is ready, so changes
    /// never interleave.
    type Result = AtomicResponse<Self, Result<GroupReply, ActorError>>;

    fn handle(&mut self, GroupCall(req): GroupCall, ctx: &mut Context<Self>) -> Self::Result {
        self.last_call = Instant::now();
        if let Some(e) = &self.load_error {
            ctx.stop();
            return AtomicResponse::new(done(Err(e.clone())));
        }
        // Reads answer from the durable record: they need not wait for an announcement
        // (which, with the conversation's node down, could take the whole call timeout).
        if let GroupRequest::View { user } = req {
            return AtomicResponse::new(done(self.view(user)));
        }
        // Changes settle first: rules are checked against an announced membership, and
        // a new change never overtakes one the conversation has not seen.
        AtomicResponse::new(Box::pin(self.settle().then(
            move |settled, act, _| -> Reply {
                match (req, settled) {
                    (GroupRequest::Settle, settled) => done(settled.map(|()| GroupReply::Done)),
                    // An earlier change cannot be announced yet: refused (503).
                    (_, Err(e)) => done(Err(e)),
                    (
                        GroupRequest::Create {
                            creator,
                            name,
                            members,
                        },
                        Ok(()),
                    ) => act.create(creator, name, members),
                    (GroupRequest::AddMember { by, user }, Ok(())) => act.add_member(by, user),
                    (GroupRequest::RemoveMember { by, user }, Ok(())) => {
                        act.remove_member(by, user)
                    }
                    (GroupRequest::View { user }, Ok(())) => done(act.view(user)),
                }
            },
        )))
    }
}

impl Handler<Kill> for GroupActor {
    type Result = ();

    fn handle(&mut self, _: Kill, _: &mut Context<Self>) {
        panic!("chaos: killed by POST /admin/chaos/kill");
    }
}

impl Handler<Retire> for GroupActor {
    type Result = ();

    fn handle(&mut self, _: Retire, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("Weekend").is_ok());
        assert!(check_name(&"é".repeat(MAX_GROUP_NAME_CHARS)).is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("   ").is_err());
        assert!(check_name("a\nb").is_err());
        assert!(check_name(&"x".repeat(MAX_GROUP_NAME_CHARS + 1)).is_err());
    }

    #[test]
    fn system_bodies_are_json() {
        let u = UserId(uuid::Uuid::from_u128(1));
        let v: serde_json::Value = serde_json::from_str(&system_body(&GroupEvent::Left {
            user: u,
            new_admin: None,
        }))
        .unwrap();
        assert_eq!(v["event"], "member_left");
        assert_eq!(v["user_id"], u.to_string());
        assert!(v["new_admin"].is_null());
    }
}
