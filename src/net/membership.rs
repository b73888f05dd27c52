//! Cluster membership: the ring this node serves, the ring `cluster.toml` asks for, and
//! when the cluster may move from one to the other.
//!
//! A node serves its *committed* ring (version `v`, persisted). Its cluster file gives
//! a *target*. While they differ, the node tells its peers so (a [`RingState`], cast
//! every second and on every change) and [`decide`] reads everyone's states:
//!
//! 1. **Agree.** Every node of both rings serves `v` and targets the same ring: each
//!    node hands off the entities the target takes from it (`net/handoff.rs`).
//! 2. **Commit.** Once every node reports its share handed off, each commits the
//!    target as `v + 1`. A node that sees a peer already at `v + 1` on its own target
//!    follows (that peer only committed because everyone had handed off).
//!
//! Anything else (a peer on another version, another target, other `vnodes`, a peer
//! not heard from) is a reason to wait, and the node keeps serving its committed ring.
//! A node with no committed ring (a fresh data dir) takes the one its peers serve, or,
//! when every node of its file is fresh and has the same file, the file's ring as
//! version 1. These rules are pure functions here, unit-tested; the router applies them.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::peer::{PeerCall, PeerReply};
use super::ring::Ring;
use crate::actors::ActorError;

/// What a node tells its peers about its ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingState {
    /// The ring it serves: version and (sorted) nodes; `None` before it has one.
    pub committed: Option<(u64, Vec<String>)>,
    pub vnodes: u32,
    /// The ring its cluster file asks for (sorted nodes).
    pub target: Vec<String>,
    /// Whether everything the move to `target` takes from it has gone.
    pub handed_off: bool,
    /// Entities it still has to hand off.
    pub pending: u64,
}

/// What a node should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do: committed and target are the same ring.
    Idle,
    /// Keep serving the committed ring: something keeps the cluster from moving (the
    /// reason is for the operator).
    Wait(String),
    /// Keep serving the committed ring: the change is under way (what it waits for).
    Progress(String),
    /// Take this ring as committed (a node with none yet).
    Adopt { version: u64, nodes: Vec<String> },
    /// Hand off what the target takes from this node.
    Handoff,
    /// Commit the target ring as this version.
    Commit { version: u64 },
}

/// The next step for node `me`, from its own state and the last state heard from each
/// peer.
pub fn decide(me: &str, mine: &RingState, peers: &HashMap<String, RingState>) -> Step {
    let Some((version, committed)) = &mine.committed else {
        return adopt(me, mine, peers);
    };
    if *committed == mine.target {
        return Step::Idle;
    }
    let union: BTreeSet<&String> = committed.iter().chain(&mine.target).collect();
    let next = (version + 1, mine.target.clone());
    if union
        .iter()
        .filter_map(|n| peers.get(n.as_str()))
        .any(|s| s.committed.as_ref() == Some(&next))
    {
        return if mine.handed_off {
            Step::Commit { version: next.0 }
        } else {
            Step::Wait(format!(
                "a peer committed ring version {} but this node has not handed off",
                next.0
            ))
        };
    }
    let mut unfinished = Vec::new();
    for node in union.iter().filter(|n| n.as_str() != me) {
        let Some(s) = peers.get(node.as_str()) else {
            return Step::Wait(format!("no word yet from node {node:?}"));
        };
        if let Some(why) = disagreement(node, s, mine) {
            return Step::Wait(why);
        }
        if !s.handed_off {
            unfinished.push(node.as_str());
        }
    }
    if !mine.handed_off {
        Step::Handoff
    } else if unfinished.is_empty() {
        Step::Commit { version: next.0 }
    } else {
        Step::Progress(format!(
            "waiting for {} to finish handing off",
            unfinished.join(", ")
        ))
    }
}

/// Why `node`'s state keeps the cluster from moving to `mine.target`, if it does.
fn disagreement(node: &str, s: &RingState, mine: &RingState) -> Option<String> {
    if s.vnodes != mine.vnodes {
        return Some(format!(
            "node {node:?} has vnodes = {}, this node {}: vnodes must be the same everywhere",
            s.vnodes, mine.vnodes
        ));
    }
    if s.committed != mine.committed {
        return Some(format!(
            "node {node:?} serves ring version {}, this node {}",
            shown(&s.committed),
            shown(&mine.committed)
        ));
    }
    if s.target != mine.target {
        return Some(format!(
            "node {node:?} has another cluster.toml (nodes {:?}, this node's {:?})",
            s.target, mine.target
        ));
    }
    None
}

fn shown(c: &Option<(u64, Vec<String>)>) -> String {
    match c {
        Some((v, nodes)) => format!("{v} (nodes {nodes:?})"),
        None => "none yet".into(),
    }
}

/// A node without a committed ring: the peers' ring, or at a cluster's first start
/// (every node of the file fresh and with the same file) the file's as version 1.
fn adopt(me: &str, mine: &RingState, peers: &HashMap<String, RingState>) -> Step {
    let best = peers
        .values()
        .filter_map(|s| s.committed.as_ref().map(|c| (s, c)))
        .max_by_key(|(_, (v, _))| *v);
    if let Some((s, (version, nodes))) = best {
        if s.vnodes != mine.vnodes {
            return Step::Wait(format!(
                "the cluster has vnodes = {}, this node's file {}",
                s.vnodes, mine.vnodes
            ));
        }
        let split = peers
            .values()
            .filter_map(|s| s.committed.as_ref())
            .any(|(v, n)| v == version && n != nodes);
        if split {
            return Step::Wait(format!(
                "peers serve different rings at version {version}: check every cluster.toml"
            ));
        }
        return Step::Adopt {
            version: *version,
            nodes: nodes.clone(),
        };
    }
    for node in mine.target.iter().filter(|n| n.as_str() != me) {
        let Some(s) = peers.get(node) else {
            return Step::Wait(format!(
                "no ring yet: waiting to hear from node {node:?} (a new cluster starts once all its nodes are up; a node added to a running cluster starts once the running nodes have reloaded a cluster.toml that names it)"
            ));
        };
        if s.target != mine.target || s.vnodes != mine.vnodes {
            return Step::Wait(format!(
                "first start: node {node:?} has another cluster.toml (nodes {:?}, vnodes {}; this node's {:?}, {})",
                s.target, s.vnodes, mine.target, mine.vnodes
            ));
        }
    }
    if mine.target.iter().any(|n| n == me) {
        Step::Adopt {
            version: 1,
            nodes: mine.target.clone(),
        }
    } else {
        Step::Wait("this node is not in its own cluster.toml".into())
    }
}

// ---- the node's own membership state -------------------------------------------------

/// A node's addresses, as its cluster file gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeAddrs {
    pub client: SocketAddr,
    pub peer: SocketAddr,
}

/// Where a call for one entity goes, on this node, now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// Served here. `leaving`: the entity will move away once the handoff starts.
    Here { leaving: bool },
    /// To its home over that node's link.
    Peer(String),
    /// The entity moved (or never existed here) and the next ring homes it on that
    /// node: forwarded there, in order with the calls held for it.
    Forward(String),
    /// The entity is moving to that node: held until it has arrived, then forwarded.
    Hold(String),
    /// No ring yet, or no node at all.
    Unknown,
    /// A peer's call for an entity this node does not serve (never forwarded on: two
    /// nodes whose rings disagree must not bounce a call between them).
    Refused,
}

/// How far this node's share of a handoff has gone.
#[derive(Debug, Default)]
pub enum Phase {
    /// Not handing off (or not yet agreed).
    #[default]
    Idle,
    /// Calls for leaving entities are held while those in flight finish and their
    /// actors stop.
    Draining,
    /// The leaving entities still stored here, by ring key; the others have gone.
    Moving(HashSet<String>),
}

/// A call held until its entity has moved.
pub struct Held {
    pub key: String,
    pub call: PeerCall,
    pub answer: oneshot::Sender<Result<PeerReply, ActorError>>,
}

/// This node's view of the cluster: kept by the router behind one lock.
pub struct Membership {
    pub me: String,
    pub vnodes: u32,
    pub committed: Option<(u64, Ring)>,
    pub target: Ring,
    /// Every node of the committed and target rings (and what the files said before).
    pub addrs: HashMap<String, NodeAddrs>,
    /// The last state each peer sent.
    pub peers: HashMap<String, RingState>,
    pub handed_off: bool,
    /// The move to `target` has started here (recorded durably: some entities may
    /// already be at their next home, so the target cannot change until committed).
    pub started: bool,
    pub phase: Phase,
    /// Counts handoffs started here; calls served here are counted in flight by the
    /// parity of the epoch they started in, so a handoff can wait for every call that
    /// started before it (whatever entity it was for) without waiting for later ones.
    pub epoch: u64,
    /// Calls served here and not yet answered, by epoch parity.
    pub inflight: std::sync::Arc<[std::sync::atomic::AtomicUsize; 2]>,
    /// Calls held for moving entities, oldest first.
    pub held: Vec<Held>,
    /// A handoff task is running.
    pub handing_off: bool,
    /// Why the node is not moving to its target ring, if it is not.
    pub waiting: Option<String>,
}

impl Membership {
    /// Whether a ring change is under way here (the file asks for another ring).
    pub fn changing(&self) -> bool {
        self.committed
            .as_ref()
            .is_some_and(|(_, c)| *c != self.target)
    }

    pub fn version(&self) -> u64 {
        self.committed.as_ref().map_or(0, |(v, _)| *v)
    }

    /// The committed ring's owner of `key`.
    pub fn home(&self, key: &[u8]) -> Option<&str> {
        self.committed.as_ref()?.1.owner(key)
    }

    /// Where this node sends its own call for `key`.
    pub fn place(&self, key: &[u8]) -> Place {
        let Some((_, ring)) = &self.committed else {
            return Place::Unknown;
        };
        let Some(owner) = ring.owner(key) else {
            return Place::Unknown;
        };
        if owner != self.me {
            return Place::Peer(owner.to_string());
        }
        if !self.changing() {
            return Place::Here { leaving: false };
        }
        let Some(next) = self.target.owner(key) else {
            return Place::Here { leaving: false };
        };
        if next == self.me {
            return Place::Here { leaving: false };
        }
        let next = next.to_string();
        if self.handed_off {
            return Place::Forward(next);
        }
        match &self.phase {
            Phase::Idle => Place::Here { leaving: true },
            Phase::Draining => Place::Hold(next),
            Phase::Moving(left) => {
                // Keys are compared as text: ring keys are UTF-8 by construction.
                if left.contains(std::str::from_utf8(key).unwrap_or_default()) {
                    Place::Hold(next)
                } else {
                    Place::Forward(next)
                }
            }
        }
    }

    /// Where a call a peer sent for `key` goes: served or held here, forwarded to the
    /// entity's next home if it has moved on, or refused.
    pub fn accept(&self, key: &[u8]) -> Place {
        match self.place(key) {
            Place::Peer(_) | Place::Unknown => {
                let arriving = self.changing() && self.target.owner(key) == Some(&self.me);
                if arriving {
                    Place::Here { leaving: false }
                } else {
                    Place::Refused
                }
            }
            other => other,
        }
    }

    /// The state this node tells its peers.
    pub fn state(&self) -> RingState {
        RingState {
            committed: self
                .committed
                .as_ref()
                .map(|(v, r)| (*v, r.nodes().to_vec())),
            vnodes: self.vnodes,
            target: self.target.nodes().to_vec(),
            handed_off: self.handed_off,
            // While this node has not handed off, at least 1: its share is not
            // listed yet, or not moved.
            pending: match &self.phase {
                _ if !self.changing() || self.handed_off => 0,
                Phase::Moving(left) => (left.len() as u64).max(1),
                _ => 1,
            },
        }
    }

    /// Handoffs still to do in the cluster, as far as this node knows: its own and
    /// what its peers last reported.
    pub fn pending(&self) -> u64 {
        let nodes: BTreeSet<&String> = self
            .committed
            .iter()
            .flat_map(|(_, r)| r.nodes())
            .chain(self.target.nodes())
            .collect();
        self.state().pending
            + nodes
                .into_iter()
                .filter(|n| **n != self.me)
                .filter_map(|n| self.peers.get(n))
                .filter(|s| s.committed == self.state().committed)
                .map(|s| s.pending)
                .sum::<u64>()
    }

    /// Takes the held calls that can go now (their entity has moved), oldest first;
    /// the rest stay held. Once a caller has given up on a held call, the later calls
    /// held for the same entity are refused rather than sent: they may be later sends
    /// of the same connection, which must not overtake the one it will retry.
    pub fn ready(&mut self) -> Vec<(Held, Place)> {
        let mut out: Vec<(Held, Place)> = self
            .prune()
            .into_iter()
            .map(|h| (h, Place::Refused))
            .collect();
        for h in std::mem::take(&mut self.held) {
            match self.accept(h.key.as_bytes()) {
                Place::Hold(_) => self.held.push(h),
                place => out.push((h, place)),
            }
        }
        out
    }

    /// Drops held calls whose caller has given up (and, as in `ready`, refuses the
    /// later ones for the same entity); what is refused is returned to be answered.
    pub fn prune(&mut self) -> Vec<Held> {
        let held = std::mem::take(&mut self.held);
        let mut refused = Vec::new();
        let mut broken: HashSet<String> = HashSet::new();
        for h in held {
            if h.answer.is_closed() {
                broken.insert(h.key.clone());
            } else if broken.contains(&h.key) {
                refused.push(h);
            } else {
                self.held.push(h);
            }
        }
        refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    fn state(committed: Option<(u64, &[&str])>, target: &[&str], done: bool) -> RingState {
        RingState {
            committed: committed.map(|(v, n)| (v, nodes(n))),
            vnodes: 64,
            target: nodes(target),
            handed_off: done,
            pending: 0,
        }
    }

    const ABC: &[&str] = &["a", "b", "c"];
    const ABCD: &[&str] = &["a", "b", "c", "d"];

    fn peers(list: &[(&str, RingState)]) -> HashMap<String, RingState> {
        list.iter()
            .map(|(n, s)| (n.to_string(), s.clone()))
            .collect()
    }

    #[test]
    fn first_start_waits_for_every_node_then_takes_the_file() {
        let mine = state(None, ABC, false);
        let one = peers(&[("b", state(None, ABC, false))]);
        assert!(matches!(decide("a", &mine, &one), Step::Wait(_)));
        let all = peers(&[
            ("b", state(None, ABC, false)),
            ("c", state(None, ABC, false)),
        ]);
        assert_eq!(
            decide("a", &mine, &all),
            Step::Adopt {
                version: 1,
                nodes: nodes(ABC)
            }
        );
        let other_file = peers(&[
            ("b", state(None, ABC, false)),
            ("c", state(None, ABCD, false)),
        ]);
        assert!(matches!(decide("a", &mine, &other_file), Step::Wait(w) if w.contains("\"c\"")));
        // A single-node file needs nobody.
        assert_eq!(
            decide("a", &state(None, &["a"], false), &HashMap::new()),
            Step::Adopt {
                version: 1,
                nodes: nodes(&["a"])
            }
        );
    }

    #[test]
    fn a_joining_node_takes_the_ring_its_peers_serve() {
        let mine = state(None, ABCD, false);
        let p = peers(&[("a", state(Some((3, ABC)), ABC, false))]);
        assert_eq!(
            decide("d", &mine, &p),
            Step::Adopt {
                version: 3,
                nodes: nodes(ABC)
            }
        );
        let split = peers(&[
            ("a", state(Some((3, ABC)), ABC, false)),
            ("b", state(Some((3, &["a", "b"])), ABC, false)),
        ]);
        assert!(matches!(decide("d", &mine, &split), Step::Wait(_)));
    }

    #[test]
    fn a_change_waits_for_agreement_then_hands_off_then_commits() {
        let mine = state(Some((3, ABC)), ABCD, false);
        // b has not reloaded yet.
        let p = peers(&[
            ("b", state(Some((3, ABC)), ABC, false)),
            ("c", state(Some((3, ABC)), ABCD, false)),
            ("d", state(Some((3, ABC)), ABCD, false)),
        ]);
        assert!(matches!(decide("a", &mine, &p), Step::Wait(w) if w.contains("\"b\"")));
        let mut p = peers(&[
            ("b", state(Some((3, ABC)), ABCD, false)),
            ("c", state(Some((3, ABC)), ABCD, false)),
        ]);
        assert!(
            matches!(decide("a", &mine, &p), Step::Wait(w) if w.contains("\"d\"")),
            "every node of both rings must be heard"
        );
        p.insert("d".into(), state(Some((3, ABC)), ABCD, false));
        assert_eq!(decide("a", &mine, &p), Step::Handoff);
        let done = state(Some((3, ABC)), ABCD, true);
        assert!(matches!(decide("a", &done, &p), Step::Progress(_)));
        for n in ["b", "c", "d"] {
            p.insert(n.into(), state(Some((3, ABC)), ABCD, true));
        }
        assert_eq!(decide("a", &done, &p), Step::Commit { version: 4 });
        // A peer that committed first is followed.
        p.insert("b".into(), state(Some((4, ABCD)), ABCD, false));
        p.insert("c".into(), state(Some((3, ABC)), ABCD, false));
        assert_eq!(decide("a", &done, &p), Step::Commit { version: 4 });
        // Committed and target equal: nothing to do.
        assert_eq!(
            decide("a", &state(Some((4, ABCD)), ABCD, false), &p),
            Step::Idle
        );
    }

    #[test]
    fn disagreeing_files_keep_the_old_ring() {
        let mine = state(Some((3, ABC)), ABCD, false);
        let p = peers(&[
            ("b", state(Some((3, ABC)), &["a", "b", "c", "e"], false)),
            ("c", state(Some((3, ABC)), ABCD, false)),
            ("d", state(Some((3, ABC)), ABCD, false)),
        ]);
        assert!(
            matches!(decide("a", &mine, &p), Step::Wait(w) if w.contains("another cluster.toml"))
        );
        let behind = peers(&[
            ("b", state(Some((2, ABC)), ABCD, false)),
            ("c", state(Some((3, ABC)), ABCD, false)),
            ("d", state(Some((3, ABC)), ABCD, false)),
        ]);
        assert!(matches!(decide("a", &mine, &behind), Step::Wait(w) if w.contains("version 2")));
        let mut vn = state(Some((3, ABC)), ABCD, false);
        vn.vnodes = 32;
        let p = peers(&[
            ("b", vn),
            ("c", state(Some((3, ABC)), ABCD, false)),
            ("d", state(Some((3, ABC)), ABCD, false)),
        ]);
        assert!(matches!(decide("a", &mine, &p), Step::Wait(w) if w.contains("vnodes")));
    }

    #[test]
    fn removing_a_node_needs_the_leaving_one_too() {
        let mine = state(Some((5, ABCD)), ABC, false);
        let p = peers(&[
            ("b", state(Some((5, ABCD)), ABC, false)),
            ("c", state(Some((5, ABCD)), ABC, false)),
        ]);
        assert!(matches!(decide("a", &mine, &p), Step::Wait(w) if w.contains("\"d\"")));
        let mut p = p;
        p.insert("d".into(), state(Some((5, ABCD)), ABC, false));
        assert_eq!(decide("a", &mine, &p), Step::Handoff);
        // The leaving node decides the same way about itself.
        let leaving = state(Some((5, ABCD)), ABC, true);
        let all_done: HashMap<String, RingState> = ["a", "b", "c"]
            .iter()
            .map(|n| (n.to_string(), state(Some((5, ABCD)), ABC, true)))
            .collect();
        assert_eq!(
            decide("d", &leaving, &all_done),
            Step::Commit { version: 6 }
        );
    }
}
