//! Fills a node's data dir with many messages quickly, for the restart-time measurement
//! (docs/BENCHMARKS.md): writing ten million messages through the client contract takes
//! most of an hour here, so this writes the records a node writes for them, through the
//! same storage API, without the network. Each message of a direct conversation is
//! stored with its idempotency entry and appended to both members' inboxes in runs of
//! `--run`, as fan-out does under load; a flush every 10,000 messages.
//!
//! ```sh
//! cargo run --release --example restart_fill -- --dir /tmp/r/data/n1 --messages 10000000
//! ```
//!
//! Then start `switchboard serve` on that data dir (node `n1`), `kill -9` it, and time
//! the next start until `/healthz` answers 200.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use switchboard::ids::{ConversationId, UserId};
use switchboard::storage::{
    ConversationKind, ConversationRecord, InboxRun, MessageKind, MessageRecord, Store,
    UserConversation,
};
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    /// The node's data dir (`data_dir` of its `[[node]]`).
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 10_000_000)]
    messages: u64,
    /// Direct conversations the messages are spread over (two users each).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pairs: u64,
    /// Messages per inbox append.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    run: u64,
    /// Body bytes per message.
    #[arg(long, default_value_t = 100)]
    body: usize,
}

struct Pair {
    users: [UserId; 2],
    conversation: ConversationId,
    next_seq: u64,
    next_inbox: [u64; 2],
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let store = Store::open(&args.dir)?;
    let mut pairs: Vec<Pair> = (0..args.pairs)
        .map(|_| {
            let users = [UserId::random(), UserId::random()];
            Pair {
                users,
                conversation: ConversationId::direct(users[0], users[1]),
                next_seq: 1,
                next_inbox: [1, 1],
            }
        })
        .collect();
    for p in &pairs {
        let mut members = p.users.to_vec();
        members.sort();
        store.put_conversation(&ConversationRecord {
            conversation_id: p.conversation,
            kind: ConversationKind::Direct,
            members,
            created_at: switchboard::now_ms(),
        })?;
    }
    let body = "x".repeat(args.body);
    let started = Instant::now();
    let mut written = 0u64;
    let mut next_report = 0u64;
    while written < args.messages {
        for p in pairs.iter_mut() {
            let n = args.run.min(args.messages - written);
            if n == 0 {
                break;
            }
            let first = p.next_seq;
            for i in 0..n {
                let sender = p.users[(i % 2) as usize];
                store.put_message(&MessageRecord {
                    message_id: Uuid::now_v7(),
                    conversation_id: p.conversation,
                    seq: first + i,
                    sender_id: sender,
                    kind: MessageKind::User,
                    body: body.clone(),
                    media: Vec::new(),
                    client_msg_id: Some(Uuid::new_v4()),
                    ts: switchboard::now_ms(),
                })?;
            }
            let run = InboxRun {
                conversation_id: p.conversation,
                seqs: (first..first + n).collect(),
            };
            for (m, user) in p.users.iter().enumerate() {
                let rec = UserConversation {
                    conversation_id: p.conversation,
                    kind: ConversationKind::Direct,
                    peer_id: Some(p.users[1 - m]),
                    head: first + n - 1,
                };
                let records = if first == 1 { vec![&rec] } else { vec![] };
                store.append_inbox(*user, p.next_inbox[m], &run, &records, None)?;
                p.next_inbox[m] += n;
            }
            p.next_seq += n;
            written += n;
        }
        if written >= next_report {
            store.commit(1).await?;
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "{written} messages in {secs:.0} s ({:.0} msg/s)",
                written as f64 / secs
            );
            next_report += 10_000;
        }
    }
    store.commit(1).await?;
    println!(
        "{written} messages over {} conversations in {:.1} s",
        args.pairs,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
