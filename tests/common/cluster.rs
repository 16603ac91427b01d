//! A real, throw-away three-master Redis Cluster for tests.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::redis_server::redis_server_command;
use super::run_with_timeout;

/// Masters in a cluster.
const NODES: usize = 3;
/// Upper bound on one node answering `PING` after spawn.
const NODE_READY: Duration = Duration::from_secs(10);
/// Upper bound on `cluster_state:ok` on every node after `--cluster create`.
const CLUSTER_READY: Duration = Duration::from_secs(15);
/// Fresh port sets tried before giving up.
const START_ATTEMPTS: usize = 3;

/// One `redis-server --cluster-enabled yes` master.
struct Node {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Three cluster-enabled `redis-server` masters on 127.0.0.1 (no replicas,
/// `cluster-node-timeout 1000`, persistence off), joined with
/// `redis-cli --cluster create` and waited on until every node reports
/// `cluster_state:ok`. Every node is SIGKILLed (and reaped) on drop.
pub struct RedisCluster {
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
    extra: Vec<String>,
}

impl RedisCluster {
    /// Starts the cluster with the default node options. Panics with every
    /// node's log if it cannot be brought up within 15 s.
    pub fn start() -> RedisCluster {
        RedisCluster::start_with(&[])
    }

    /// Like [`start`](Self::start), with extra `redis-server` arguments for
    /// every node (e.g. `["--cluster-require-full-coverage", "no"]`, so that
    /// the live masters keep serving their slots when one master is down).
    pub fn start_with(extra: &[&str]) -> RedisCluster {
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::tempdir().expect("tempdir for redis cluster");
            let nodes = cluster_ports()
                .into_iter()
                .enumerate()
                .map(|(i, port)| {
                    let d = dir.path().join(format!("node{i}"));
                    std::fs::create_dir_all(&d).expect("node dir");
                    Node {
                        port,
                        dir: d,
                        child: None,
                    }
                })
                .collect();
            let mut cluster = RedisCluster {
                dir,
                nodes,
                extra: extra.iter().map(|e| e.to_string()).collect(),
            };
            match cluster.bring_up(extra) {
                Ok(()) => return cluster,
                // Typically a port taken in between; try fresh ports (the
                // failed nodes are killed when `cluster` drops).
                Err(why) => last = format!("{why}\n{}", cluster.logs()),
            }
        }
        panic!("redis cluster failed to start after {START_ATTEMPTS} attempts\n{last}");
    }

    /// Spawns the nodes, creates the cluster and waits for `cluster_state:ok`.
    fn bring_up(&mut self, extra: &[&str]) -> Result<(), String> {
        for node in &mut self.nodes {
            node.child = Some(spawn_node(node.port, &node.dir, extra)?);
        }
        for node in &mut self.nodes {
            wait_ping(node)?;
        }
        let addrs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = run_with_timeout(
            Command::new("redis-cli")
                .arg("--cluster")
                .arg("create")
                .args(&addrs)
                .args(["--cluster-replicas", "0", "--cluster-yes"]),
            CLUSTER_READY,
        );
        if out.code != 0 {
            return Err(format!(
                "redis-cli --cluster create exited {}\nstdout: {}\nstderr: {}",
                out.code, out.stdout, out.stderr
            ));
        }
        let deadline = Instant::now() + CLUSTER_READY;
        loop {
            let states: Vec<String> = (0..self.nodes.len())
                .map(|i| self.try_cli(i, &["CLUSTER", "INFO"]).unwrap_or_default())
                .collect();
            if states.iter().all(|s| s.contains("cluster_state:ok")) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "cluster_state not ok on every node within {CLUSTER_READY:?}: {states:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Seed URLs of every node, `redis://127.0.0.1:P` (for
    /// `backend.redis.cluster`).
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The port of node `i`.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// How many nodes the cluster was started with.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether node `i` is still running (not killed).
    pub fn is_alive(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// SIGKILLs node `i` and reaps it. Without replicas its slots stay
    /// down (with `cluster-require-full-coverage yes`, the default, the
    /// whole cluster then refuses commands after the node timeout).
    pub fn kill_node(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts killed node `i` again on its port and directory: it rejoins
    /// from its `nodes.conf` as the master of its slots, with no data.
    /// Waits (bounded, 15 s) until every node reports `cluster_state:ok`.
    pub fn restart_node(&mut self, i: usize) {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let node = &mut self.nodes[i];
        node.kill();
        node.child = Some(spawn_node(node.port, &node.dir, &extra).expect("restart node"));
        wait_ping(node).expect("restarted node answers PING");
        let deadline = Instant::now() + CLUSTER_READY;
        while !(0..self.nodes.len()).all(|n| {
            self.try_cli(n, &["CLUSTER", "INFO"])
                .unwrap_or_default()
                .contains("cluster_state:ok")
        }) {
            assert!(
                Instant::now() < deadline,
                "cluster not ok after restarting node {i}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `redis-cli -h 127.0.0.1 -p <port of node i> <args...>` (not
    /// following redirections) and returns stdout, trimmed (raw format: one
    /// value per line). Panics if redis-cli fails or takes more than 10 s.
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        self.try_cli(i, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`cli`](Self::cli) returning the failure instead of panicking.
    pub fn try_cli(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let port = self.nodes[i].port.to_string();
        let out = run_with_timeout(
            Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &port])
                .args(args),
            Duration::from_secs(10),
        );
        if out.code != 0 {
            return Err(format!(
                "redis-cli -p {port} {args:?} exited {}\nstdout: {}\nstderr: {}",
                out.code, out.stdout, out.stderr
            ));
        }
        Ok(out.stdout.trim().to_string())
    }

    /// Runs `args` on the node owning `key`'s slot (e.g. `GET`, `HGETALL`).
    pub fn cli_for_key(&self, key: &str, args: &[&str]) -> String {
        self.cli(self.node_for_key(key), args)
    }

    /// `CLUSTER KEYSLOT key`, asked of the first live node.
    pub fn keyslot(&self, key: &str) -> u16 {
        let i = self.live_node();
        self.cli(i, &["CLUSTER", "KEYSLOT", key])
            .parse()
            .unwrap_or_else(|e| panic!("CLUSTER KEYSLOT {key}: {e}"))
    }

    /// Index of the node serving `slot`, from `CLUSTER NODES` as a live node
    /// sees it.
    pub fn node_for_slot(&self, slot: u16) -> usize {
        let text = self.cli(self.live_node(), &["CLUSTER", "NODES"]);
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 || !fields[2].contains("master") {
                continue;
            }
            let port: u16 = fields[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("unparseable CLUSTER NODES line {line}"));
            let owns = fields[8..].iter().any(|range| {
                if range.starts_with('[') {
                    return false; // migrating/importing marker
                }
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                match (a.parse::<u16>(), b.parse::<u16>()) {
                    (Ok(a), Ok(b)) => (a..=b).contains(&slot),
                    _ => false,
                }
            });
            if owns {
                return self
                    .nodes
                    .iter()
                    .position(|n| n.port == port)
                    .unwrap_or_else(|| panic!("slot {slot} on unknown node port {port}"));
            }
        }
        panic!("no master owns slot {slot}:\n{text}");
    }

    /// Index of the node serving `key` (by its slot).
    pub fn node_for_key(&self, key: &str) -> usize {
        self.node_for_slot(self.keyslot(key))
    }

    /// Every key on node `i` (`KEYS *`), sorted.
    pub fn keys_on(&self, i: usize) -> Vec<String> {
        let mut k: Vec<String> = self
            .cli(i, &["KEYS", "*"])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        k.sort();
        k
    }

    /// Every key on every live node, sorted.
    pub fn all_keys(&self) -> Vec<String> {
        let mut k: Vec<String> = (0..self.nodes.len())
            .filter(|&i| self.is_alive(i))
            .flat_map(|i| self.keys_on(i))
            .collect();
        k.sort();
        k
    }

    /// The first node still running.
    fn live_node(&self) -> usize {
        (0..self.nodes.len())
            .find(|&i| self.is_alive(i))
            .expect("every cluster node was killed")
    }

    /// Every node's log, for panic messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let log = std::fs::read_to_string(n.dir.join("redis.log")).unwrap_or_default();
                let err = std::fs::read_to_string(n.dir.join("redis.stderr")).unwrap_or_default();
                format!(
                    "--- node 127.0.0.1:{} redis.log ---\n{log}\n--- stderr ---\n{err}",
                    n.port
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The cluster's base temp directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }
}

/// Three ports `P` that are free together with their cluster bus port
/// `P + 10000`, all below the kernel's ephemeral range so that outgoing
/// connections cannot take them in between.
fn cluster_ports() -> Vec<u16> {
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ (u64::from(std::process::id()) << 20);
    let mut ports = Vec::with_capacity(NODES);
    for _ in 0..10_000 {
        // xorshift
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let p = 10_000 + (seed % 12_000) as u16;
        if ports.contains(&p) || ports.contains(&(p + 10_000)) || ports.contains(&(p - 10_000)) {
            continue;
        }
        let free = TcpListener::bind(("127.0.0.1", p)).is_ok()
            && TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok();
        if free {
            ports.push(p);
            if ports.len() == NODES {
                return ports;
            }
        }
    }
    panic!("no free port pairs (P, P+10000) for a redis cluster");
}

/// Spawns one cluster-enabled master.
fn spawn_node(port: u16, dir: &Path, extra: &[&str]) -> Result<Child, String> {
    redis_server_command(port, dir)
        .args(["--cluster-enabled", "yes"])
        .arg("--cluster-config-file")
        .arg(dir.join("nodes.conf"))
        .args(["--cluster-node-timeout", "1000"])
        .args(extra)
        .spawn()
        .map_err(|e| format!("spawning redis-server (is it installed?): {e}"))
}

/// Waits until `node` answers `PING` (or exits: port taken).
fn wait_ping(node: &mut Node) -> Result<(), String> {
    let deadline = Instant::now() + NODE_READY;
    let port = node.port.to_string();
    loop {
        if let Some(child) = node.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            node.child = None;
            return Err(format!("redis-server on port {port} exited with {status}"));
        }
        let out = run_with_timeout(
            Command::new("redis-cli").args(["-h", "127.0.0.1", "-p", &port, "PING"]),
            Duration::from_secs(5),
        );
        if out.code == 0 && out.stdout.trim() == "PONG" {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "redis-server on port {port} did not answer PING within {NODE_READY:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
