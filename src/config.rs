//! `cluster.toml`: the one file that describes the cluster, the same on every node.
//!
//! This module owns parsing and validation. Every problem becomes a [`ConfigError`] whose
//! `Display` is a single line naming the file and the offending field, because operators
//! read it in a terminal or a unit log, not in a debugger.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a config file was refused. `Display` is one line, fit for a terminal.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a field has the wrong type.
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    /// The file parsed but breaks a rule (duplicate ids, zero limits, ...).
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    /// `--node` names no `[[node]]`, or is missing where the file has several.
    #[error("{path}: {message}")]
    Node { path: String, message: String },
}

/// Largest `max_message_bytes` a cluster of several nodes accepts (see `parse`).
pub const MAX_CLUSTER_MESSAGE_BYTES: usize = 128 * 1024;

/// The whole file, validated.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub cluster: ClusterSection,
    pub limits: Limits,
    pub push: Option<PushConfig>,
    pub chaos: ChaosConfig,
    pub nodes: Vec<NodeConfig>,
}

/// `[cluster]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Points per node on the hash ring.
    #[serde(default = "default_vnodes")]
    pub vnodes: u32,
    /// Enables `/admin/*`; without it those answer 404.
    #[serde(default)]
    pub admin_token: Option<String>,
}

/// `[limits]`: every bound a client can run into. Defaults are the contract's.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_frame_bytes: usize,
    pub max_media_bytes: u64,
    pub max_group_members: usize,
    pub sends_per_second: u32,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 65_536,
            max_frame_bytes: 1_048_576,
            max_media_bytes: 67_108_864,
            max_group_members: 1000,
            sends_per_second: 50,
            heartbeat_interval_ms: 3000,
            heartbeat_timeout_ms: 10_000,
        }
    }
}

impl Limits {
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }
    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat_timeout_ms)
    }
}

/// `[push]`: webhook for users with no live session.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushConfig {
    pub webhook_url: String,
    #[serde(default)]
    pub secret: Option<String>,
}

/// `[chaos]`: fault injection, off unless enabled.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChaosConfig {
    #[serde(default)]
    pub enabled: bool,
}

/// One `[[node]]`.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: String,
    pub client_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    /// Absolute, or resolved against the directory that holds the config file.
    pub data_dir: PathBuf,
}

fn default_vnodes() -> u32 {
    64
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    cluster: Option<ClusterSection>,
    #[serde(default)]
    limits: Limits,
    push: Option<PushConfig>,
    #[serde(default)]
    chaos: ChaosConfig,
    #[serde(default)]
    node: Vec<RawNode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: String,
    client_addr: String,
    peer_addr: String,
    data_dir: String,
}

impl ClusterConfig {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, &shown, base)
    }

    /// Parses `text`; `shown` names the file in errors, `base` anchors relative data dirs.
    pub fn parse(text: &str, shown: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: shown.to_string(),
            message: one_line_toml_error(text, &e),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: shown.to_string(),
            message,
        };
        let cluster = raw.cluster.unwrap_or(ClusterSection {
            vnodes: default_vnodes(),
            admin_token: None,
        });
        if cluster.vnodes == 0 || cluster.vnodes > 4096 {
            return Err(invalid(format!(
                "cluster.vnodes: {} is outside 1..=4096",
                cluster.vnodes
            )));
        }
        if matches!(&cluster.admin_token, Some(t) if t.is_empty()) {
            return Err(invalid("cluster.admin_token: must not be empty".into()));
        }
        validate_limits(&raw.limits).map_err(invalid)?;
        if let Some(push) = &raw.push {
            // No TLS is built in: an https webhook would fail at every send, so refuse it
            // here (put a local relay in front of an https endpoint).
            if !push.webhook_url.starts_with("http://") {
                return Err(invalid(format!(
                    "push.webhook_url: {:?} must be an http:// URL (TLS is not built in)",
                    push.webhook_url
                )));
            }
        }
        if raw.node.is_empty() {
            return Err(invalid("no [[node]] entries".into()));
        }
        let mut nodes = Vec::with_capacity(raw.node.len());
        let (mut ids, mut dirs) = (HashSet::new(), HashSet::new());
        let mut addrs: std::collections::HashMap<SocketAddr, String> = Default::default();
        for n in raw.node {
            let at =
                |field: &str, what: String| invalid(format!("node {:?}: {field}: {what}", n.id));
            if n.id.is_empty()
                || n.id.len() > 64
                || !n
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(at("id", "must be 1-64 of [A-Za-z0-9_-]".into()));
            }
            if !ids.insert(n.id.clone()) {
                return Err(at("id", "duplicate node id".into()));
            }
            let client_addr: SocketAddr = n.client_addr.parse().map_err(|_| {
                at(
                    "client_addr",
                    format!("{:?} is not an ip:port address", n.client_addr),
                )
            })?;
            let peer_addr: SocketAddr = n.peer_addr.parse().map_err(|_| {
                at(
                    "peer_addr",
                    format!("{:?} is not an ip:port address", n.peer_addr),
                )
            })?;
            for (field, addr) in [("client_addr", client_addr), ("peer_addr", peer_addr)] {
                if let Some(other) = addrs.insert(addr, n.id.clone()) {
                    return Err(at(
                        field,
                        format!("{addr} is already used by node {other:?}"),
                    ));
                }
            }
            if n.data_dir.is_empty() {
                return Err(at("data_dir", "must not be empty".into()));
            }
            let dir = Path::new(&n.data_dir);
            let data_dir = if dir.is_absolute() {
                dir.to_path_buf()
            } else {
                base.join(dir)
            };
            if !dirs.insert(data_dir.clone()) {
                return Err(at("data_dir", "is shared with another node".into()));
            }
            nodes.push(NodeConfig {
                id: n.id,
                client_addr,
                peer_addr,
                data_dir,
            });
        }
        // Between nodes, a page of history (500 messages) or an inbox append travels as
        // one peer frame of at most 64 MiB: bodies must fit 500 to a frame.
        if nodes.len() > 1 && raw.limits.max_message_bytes > MAX_CLUSTER_MESSAGE_BYTES {
            return Err(invalid(format!(
                "limits.max_message_bytes: at most {MAX_CLUSTER_MESSAGE_BYTES} in a cluster of several nodes"
            )));
        }
        Ok(ClusterConfig {
            cluster,
            limits: raw.limits,
            push: raw.push,
            chaos: raw.chaos,
            nodes,
        })
    }

    /// The node this process runs: `id` if given, else the only node in the file.
    pub fn select_node(&self, id: Option<&str>, shown: &str) -> Result<&NodeConfig, ConfigError> {
        let err = |message: String| ConfigError::Node {
            path: shown.to_string(),
            message,
        };
        match id {
            Some(id) => self
                .nodes
                .iter()
                .find(|n| n.id == id)
                .ok_or_else(|| err(format!("no [[node]] with id {id:?}"))),
            None if self.nodes.len() == 1 => Ok(&self.nodes[0]),
            None => Err(err(format!(
                "{} nodes are defined: choose one with --node",
                self.nodes.len()
            ))),
        }
    }
}

fn validate_limits(l: &Limits) -> Result<(), String> {
    let positive = [
        ("max_message_bytes", l.max_message_bytes as u64),
        ("max_frame_bytes", l.max_frame_bytes as u64),
        ("max_media_bytes", l.max_media_bytes),
        ("max_group_members", l.max_group_members as u64),
        ("sends_per_second", u64::from(l.sends_per_second)),
        ("heartbeat_interval_ms", l.heartbeat_interval_ms),
        ("heartbeat_timeout_ms", l.heartbeat_timeout_ms),
    ];
    for (name, value) in positive {
        if value == 0 {
            return Err(format!("limits.{name}: must be greater than 0"));
        }
    }
    if l.max_message_bytes > l.max_frame_bytes {
        return Err(format!(
            "limits.max_message_bytes ({}) exceeds limits.max_frame_bytes ({}): no frame could carry such a body",
            l.max_message_bytes, l.max_frame_bytes
        ));
    }
    if l.max_frame_bytes > 64 * 1024 * 1024 {
        return Err("limits.max_frame_bytes: at most 67108864".into());
    }
    if l.heartbeat_timeout_ms <= l.heartbeat_interval_ms {
        return Err(format!(
            "limits.heartbeat_timeout_ms ({}) must exceed limits.heartbeat_interval_ms ({})",
            l.heartbeat_timeout_ms, l.heartbeat_interval_ms
        ));
    }
    Ok(())
}

/// toml's own message spans several lines with a source excerpt; keep the first line and
/// add the line:column.
fn one_line_toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().lines().next().unwrap_or("invalid TOML").trim();
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            // Name the key when the error sits on a `key = value` line.
            let key = text
                .lines()
                .nth(line - 1)
                .and_then(|l| l.split_once('='))
                .map(|(k, _)| k.trim())
                .filter(|k| !k.is_empty() && !k.starts_with('['));
            match key {
                Some(key) => format!("line {line}, column {col}: {key}: {msg}"),
                None => format!("line {line}, column {col}: {msg}"),
            }
        }
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = r#"
[cluster]
vnodes = 64
[[node]]
id = "n1"
client_addr = "127.0.0.1:8080"
peer_addr = "127.0.0.1:9080"
data_dir = "data/n1"
"#;

    fn parse(s: &str) -> Result<ClusterConfig, ConfigError> {
        ClusterConfig::parse(s, "cluster.toml", Path::new("/etc/sb"))
    }

    #[test]
    fn defaults_and_relative_dirs() {
        let c = parse(ONE).unwrap();
        assert_eq!(c.limits.max_message_bytes, 65_536);
        assert_eq!(c.limits.sends_per_second, 50);
        assert_eq!(c.nodes[0].data_dir, PathBuf::from("/etc/sb/data/n1"));
        assert_eq!(c.select_node(None, "x").unwrap().id, "n1");
        assert!(c.select_node(Some("n2"), "x").is_err());
    }

    #[test]
    fn errors_are_one_line_and_name_the_field() {
        let cases = [
            (ONE.replace("127.0.0.1:8080", "nope"), "client_addr"),
            (ONE.replace("vnodes = 64", "vnodes = 0"), "vnodes"),
            (ONE.replace("vnodes = 64", "vnodes = \"x\""), "line 3"),
            (format!("{ONE}\n[limits]\nsends_per_second = 0\n"), "sends_per_second"),
            (format!("{ONE}\n[limits]\nbogus = 1\n"), "bogus"),
            (
                format!("{ONE}\n[[node]]\nid = \"n1\"\nclient_addr = \"127.0.0.1:1\"\npeer_addr = \"127.0.0.1:2\"\ndata_dir = \"d\"\n"),
                "duplicate",
            ),
            (
                format!("{ONE}\n[[node]]\nid = \"n2\"\nclient_addr = \"127.0.0.1:8080\"\npeer_addr = \"127.0.0.1:2\"\ndata_dir = \"d\"\n"),
                "already used",
            ),
            ("[cluster]\n".to_string(), "no [[node]]"),
            (
                format!("{ONE}\n[limits]\nmax_message_bytes = 200000\n[[node]]\nid = \"n2\"\nclient_addr = \"127.0.0.1:1\"\npeer_addr = \"127.0.0.1:2\"\ndata_dir = \"d\"\n"),
                "in a cluster",
            ),
        ];
        for (text, needle) in cases {
            let err = parse(&text).expect_err(needle).to_string();
            assert!(!err.contains('\n'), "multi-line error: {err}");
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
            assert!(err.starts_with("cluster.toml: "), "{err}");
        }
    }
}
