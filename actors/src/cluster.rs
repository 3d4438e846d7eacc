//! Members of a data-parallel group in separate processes, on one machine or several: a
//! TCP rendezvous that admits nodes, and [`TcpMember`], a [`Collective`] over TCP.
//!
//! One process is the **coordinator** (rank 0): it listens ([`listen`]) and admits
//! `world - 1` **workers** ([`join`]). Admission is a challenge and a hello:
//! - the coordinator sends 32 random bytes;
//! - the worker answers with its code version, its recipe's `config_hash` and a proof of
//!   the shared token (the BLAKE3 keyed hash of the challenge under the token's hash), so
//!   the token never crosses the network;
//! - the coordinator refuses, with the reason, another code version, another recipe or a
//!   wrong token, and goes on waiting for the nodes it lacks. Ranks follow the order of
//!   admission.
//!
//! Every sum is taken in rank order starting from zero, in f64 (exactly the order of
//! `model::dist::ThreadGroup`, so a group of processes computes bit for bit what the same
//! group of threads computes), and every rank gets the same result. Every rank therefore
//! applies the same update and keeps an identical `TrainState`. Two ways ([`Reduce`]):
//! - **star**: every worker sends its vector to the coordinator, which sums and sends the
//!   one result back. The coordinator's link carries `2 (world - 1)` vectors per call.
//! - **mesh** (the default; vectors of at least [`MESH_MIN_VALUES`], the gradients): the
//!   workers also link to each other (each listens on an ephemeral port of the address
//!   it reached the coordinator from, or where [`MeshAddr`] says, announced at admission;
//!   a link proves the token with the group's nonce). Member `r` owns the `r`-th chunk: it sums every member's
//!   values of it, in rank order, and sends the sums to all (a reduce-scatter, then an
//!   all-gather). Each link carries about `2 (world - 1) / world` vectors per call, in both
//!   directions at once: a member's frames go out through each link's sending thread
//!   while it reads. The small sums (losses, Sinkhorn-Knopp masses) stay a star.
//!
//! This is the transport of a group of processes and its control path, on the CPU and on
//! GPUs alike: a member on a GPU copies what it sums to the host and back (NCCL across
//! processes is not built; inside one process, GPUs sum through NCCL: `crate::dp`).
//!
//! Failures never hang a member: a closed connection (a killed process), a member's
//! [`Collective::abort`] and the collective timeout each fail the call of every member
//! that is still there, with the reason.
//!
//! Must not know: what is being summed (the step is `model::dist`), the daemon, the
//! actors.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use model::dist::{Collective, TIMED_OUT};

/// Frame tags. A frame is a tag byte, a little-endian u64 payload length, the payload.
const TAG_CHALLENGE: u8 = 1;
const TAG_HELLO: u8 = 2;
const TAG_WELCOME: u8 = 3;
const TAG_REFUSED: u8 = 4;
const TAG_SUM: u8 = 5;
const TAG_FAIL: u8 = 6;
const TAG_GATHER: u8 = 7;
const TAG_CONTROL: u8 = 8;
const TAG_BYE: u8 = 9;
const TAG_SUM32: u8 = 10;
/// A worker's address for the other workers' links (the mesh), after its welcome.
const TAG_PEER_ADDR: u8 = 11;
/// The coordinator's list of the workers' addresses and the group's nonce.
const TAG_ROSTER: u8 = 12;
/// A worker tells the coordinator whether its links to the other workers stand.
const TAG_MESH_READY: u8 = 13;
/// A worker's first frame on a link to another worker: its rank and a proof.
const TAG_PEER_HELLO: u8 = 14;
/// The mesh's two halves: a member's values of the owner's chunk (reduce-scatter), and
/// the owner's sums of its chunk (all-gather); f64 and f32.
const TAG_RS64: u8 = 15;
const TAG_AG64: u8 = 16;
const TAG_RS32: u8 = 17;
const TAG_AG32: u8 = 18;

/// Sums of fewer values go through the coordinator even in a mesh (the losses, the
/// Sinkhorn-Knopp masses of 4 096 prototypes): their time is latency, not bandwidth, and a
/// star is fewer messages on the critical path (on 2 loopback cores, 2 / 4 nodes: 20 000
/// values took 0.12 / 0.24 ms in a star and 0.15 / 0.21 ms in a mesh, 110 000 values
/// 0.47 / 0.81 and 0.48 / 0.95 ms; 1.8 M values 13.6 / 26.4 and 9.1 / 20.5 ms). The bits
/// are the same.
const MESH_MIN_VALUES: usize = 64 * 1024;

/// How long the workers have to connect to each other once they have the roster.
const MESH_WAIT: Duration = Duration::from_secs(30);

/// A step over a group of processes failed in the group (a member's connection closed,
/// a member failed or stopped answering): the daemon treats it as a recoverable device
/// fault, drops the group and redoes the step on one admitted again.
#[derive(Debug)]
pub struct GroupFailed(pub String);

impl std::fmt::Display for GroupFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the group of processes failed: {}", self.0)
    }
}

impl std::error::Error for GroupFailed {}

/// The largest payload accepted: a hostile or confused peer cannot make a member
/// allocate more (16 GiB: the f64 gradients of a 2-billion-parameter model).
const MAX_PAYLOAD: u64 = 16 << 30;

/// How long a hello may take once connected (a peer that connects and says nothing is
/// dropped, and the coordinator goes on waiting for real nodes).
const HELLO_WAIT: Duration = Duration::from_secs(10);

/// What identifies a node's training: it must equal the coordinator's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// `engine::CODE_VERSION`.
    pub code_version: String,
    /// The recipe's `Plan::config_hash`.
    pub config_hash: String,
    /// Where this node computes (`cpu`, `cuda:N`): shown, not compared (a worker may
    /// name another GPU of its machine than the recipe's).
    pub device: String,
}

#[derive(Serialize, Deserialize)]
struct Hello {
    code_version: String,
    config_hash: String,
    /// Hex of BLAKE3-keyed(blake3(token), challenge).
    proof: String,
    /// [`Identity::device`].
    #[serde(default)]
    device: String,
}

#[derive(Serialize, Deserialize)]
struct Welcome {
    rank: usize,
    world: usize,
    /// The group sums through links between every pair of members (see [`Reduce`]).
    #[serde(default)]
    mesh: bool,
}

/// The workers' addresses for each other, and the group's nonce (which the proofs on
/// the links between workers are made of).
#[derive(Serialize, Deserialize)]
struct Roster {
    /// Hex of 32 random bytes, new for every group.
    nonce: String,
    /// Worker `r`'s address is `addrs[r - 1]` (empty without a mesh).
    addrs: Vec<String>,
    /// The group's size as formed, the coordinator included: the welcome's, or fewer
    /// when the admission settled for `runtime.cluster.min_nodes`.
    #[serde(default)]
    world: usize,
}

/// A worker's hello on a link to another worker.
#[derive(Serialize, Deserialize)]
struct PeerHello {
    rank: usize,
    /// Hex of BLAKE3-keyed(blake3(token), nonce, from, to).
    proof: String,
}

/// How a group of processes sums (`runtime.cluster.reduce`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Reduce {
    /// Every pair of members holds a link. Member `r` owns the `r`-th of `world` chunks of
    /// every large vector: it receives every other member's values of its chunk, sums
    /// them in rank order from zero and sends the sums to every member (a reduce-scatter
    /// then an all-gather). Each member sends and receives about `2 (world - 1) / world`
    /// vectors per sum, on all its links at once. The workers must be able to connect
    /// to each other: each listens on an ephemeral port of the address it reached the
    /// coordinator from.
    #[default]
    Mesh,
    /// Every sum goes through the coordinator, whose link carries `2 (world - 1)`
    /// vectors per sum. Workers need no inbound connections.
    Star,
}

/// The shared secret of a cluster, read from a file (trailing whitespace ignored).
#[derive(Clone)]
pub struct Token([u8; 32]);

impl Token {
    /// Reads the token file: it must hold at least 16 characters.
    pub fn from_file(path: &std::path::Path) -> Result<Token> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the cluster token file {}", path.display()))?;
        let t = text.trim_end();
        if t.chars().count() < 16 {
            bail!(
                "the cluster token in {} is {} characters long; use at least 16 (for example `head -c 24 /dev/urandom | base64`)",
                path.display(),
                t.chars().count()
            )
        }
        Ok(Token(*blake3::hash(t.as_bytes()).as_bytes()))
    }

    /// A warning when the token file can be read by others than its owner (as ssh says
    /// of a private key): whoever reads it can join the group and read its gradients.
    pub fn permission_warning(path: &std::path::Path) -> Option<String> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        (mode & 0o077 != 0).then(|| {
            format!(
                "the cluster token file {} can be read by others than its owner (mode {:o}); `chmod 600` it",
                path.display(),
                mode & 0o777
            )
        })
    }

    fn proof(&self, challenge: &[u8]) -> String {
        blake3::keyed_hash(&self.0, challenge).to_hex().to_string()
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// How long sent data may stay unacknowledged before the connection counts as closed
/// (`TCP_USER_TIMEOUT`), and what keepalive's probes add up to.
pub const LINK_DEAD_AFTER: Duration = Duration::from_secs(60);

/// Turns on TCP keepalive (30 s idle, then 3 probes 10 s apart), so that a peer whose
/// machine went away without closing the connection is found out in about a minute even
/// while nobody sends: a worker waiting for its next order, a daemon between steps. And
/// bounds unacknowledged data to [`LINK_DEAD_AFTER`] (`TCP_USER_TIMEOUT`): while data is in
/// flight keepalive does not probe, and TCP would retransmit for about 15 minutes, so
/// a machine that vanished mid-step was found out only by the collective timeout (301.6 s
/// measured with `scripts/netns-cluster.sh vanish` before this).
fn keepalive(s: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, v: libc::c_int| -> std::io::Result<()> {
        // SAFETY: `fd` is an open socket for the duration of the call, and the option
        // value is a c_int of the size given.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    #[cfg(target_os = "linux")]
    {
        set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30)?;
        set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10)?;
        set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3)?;
        set(
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            LINK_DEAD_AFTER.as_millis() as libc::c_int,
        )?;
    }
    Ok(())
}

fn write_frame(s: &mut TcpStream, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = tag;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(payload)?;
    s.flush()?;
    let n = 9 + payload.len() as u64;
    SENT_BYTES.fetch_add(n, Ordering::Relaxed);
    metrics::counter!("dinod_cluster_sent_bytes_total").increment(n);
    Ok(())
}

/// Why reading a frame failed.
enum ReadFail {
    /// The peer closed the connection (its process ended).
    Closed,
    /// Nothing arrived before the deadline.
    TimedOut,
    /// Anything else.
    Other(String),
}

fn read_frame(
    s: &mut TcpStream,
    deadline: Instant,
) -> std::result::Result<(u8, Vec<u8>), ReadFail> {
    read_frame_until(s, Some(deadline))
}

/// [`read_frame`], with no deadline for `None`.
fn read_frame_until(
    s: &mut TcpStream,
    deadline: Option<Instant>,
) -> std::result::Result<(u8, Vec<u8>), ReadFail> {
    fn fill(
        s: &mut TcpStream,
        buf: &mut [u8],
        deadline: Option<Instant>,
    ) -> std::result::Result<(), ReadFail> {
        let mut got = 0;
        while got < buf.len() {
            let left = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ReadFail::TimedOut);
                    }
                    Some(left)
                }
                None => None,
            };
            s.set_read_timeout(left)
                .map_err(|e| ReadFail::Other(e.to_string()))?;
            match s.read(&mut buf[got..]) {
                Ok(0) => return Err(ReadFail::Closed),
                Ok(n) => got += n,
                // the read timeout (EAGAIN): our deadline passed
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Err(ReadFail::TimedOut),
                // ETIMEDOUT: TCP keepalive found the peer gone (no FIN: a machine that
                // went away)
                Err(e) if e.kind() == ErrorKind::TimedOut => return Err(ReadFail::Closed),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // EHOSTUNREACH, ENETUNREACH: TCP_USER_TIMEOUT ran out while the route to
                // the peer was gone (a link down: measured by scripts/netns-cluster.sh)
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset
                            | ErrorKind::ConnectionAborted
                            | ErrorKind::BrokenPipe
                            | ErrorKind::HostUnreachable
                            | ErrorKind::NetworkUnreachable
                    ) =>
                {
                    return Err(ReadFail::Closed)
                }
                Err(e) => return Err(ReadFail::Other(e.to_string())),
            }
        }
        Ok(())
    }
    let mut head = [0u8; 9];
    fill(s, &mut head, deadline)?;
    let n = u64::from_le_bytes(head[1..].try_into().expect("8 bytes"));
    if n > MAX_PAYLOAD {
        return Err(ReadFail::Other(format!(
            "a frame of {n} bytes (more than {MAX_PAYLOAD}): not a dinod peer"
        )));
    }
    let mut payload = vec![0u8; n as usize];
    fill(s, &mut payload, deadline)?;
    RECEIVED_BYTES.fetch_add(9 + n, Ordering::Relaxed);
    metrics::counter!("dinod_cluster_received_bytes_total").increment(9 + n);
    Ok((head[0], payload))
}

fn f64s_to_bytes(v: &[f64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 8);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn bytes_to_f64s(b: &[u8], out: &mut [f64]) {
    for (x, c) in out.iter_mut().zip(b.chunks_exact(8)) {
        *x = f64::from_le_bytes(c.try_into().expect("8 bytes"));
    }
}

fn challenge_bytes() -> Result<[u8; 32]> {
    let mut c = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut c))
        .context("cannot read /dev/urandom for the cluster challenge")?;
    Ok(c)
}

/// The coordinator's side: binds `addr`, calls `on_listening` with the bound address
/// (`:0` picks a port), and admits nodes until the group has `world` members or
/// `join_wait` has passed. Returns rank 0 of the group.
#[allow(clippy::too_many_arguments)]
pub fn listen(
    addr: &str,
    world: usize,
    me: &Identity,
    token: &Token,
    join_wait: Duration,
    timeout: Duration,
    reduce: Reduce,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<TcpMember> {
    let l = bind(addr)?;
    on_listening(l.local_addr()?);
    admit_group(
        &l,
        world.into(),
        None,
        me,
        token,
        join_wait,
        timeout,
        reduce,
        &|_| {},
        &|| false,
    )
}

/// The coordinator's listener on `addr` (kept for the life of a daemon, so that a group
/// can be rebuilt on the same port after a failure).
pub fn bind(addr: &str) -> Result<TcpListener> {
    let l = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Where a group of processes stands, for `dinod status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    /// `waiting` (for workers), `complete`, `failed` (admitted again at the next step) or
    /// `stopped` (the wait ended because the run is stopping).
    pub state: String,
    /// The address the daemon listens on.
    pub listen: String,
    /// Processes in the group, the daemon included: as formed once `complete` (fewer
    /// than `planned` when it settled for `runtime.cluster.min_nodes`), else those
    /// waited for.
    pub nodes: usize,
    /// `runtime.cluster.nodes`.
    #[serde(default)]
    pub planned: usize,
    /// The workers admitted so far, by rank.
    pub joined: Vec<JoinedNode>,
    /// The same, in a line for people (with the last refusal or failure, if any).
    pub line: String,
    /// What the workers' copies of the state were sent, and when they were last checked
    /// (filled in by the daemon after each order; none before the first).
    #[serde(default)]
    pub copies: Option<CopiesStatus>,
    /// How the group sums: `mesh` or `star` (see [`Reduce`]).
    #[serde(default)]
    pub reduce: String,
}

/// The workers' copies of the state, for `dinod status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CopiesStatus {
    /// Whole states sent since the daemon started (one per admitted group, reload or new
    /// Gram teacher).
    pub whole_states: u64,
    /// The step of the last one.
    pub whole_state_step: Option<u64>,
    /// The last step at which every copy was checked against the daemon's digest.
    pub verified_step: Option<u64>,
    /// Bytes this process sent and received on the group's links since it started.
    pub sent_bytes: u64,
    /// (See `sent_bytes`.)
    pub received_bytes: u64,
    /// Where the workers' images come from: `sent` by this process or `local` (each
    /// worker loads its own part), as `runtime.cluster.worker_data` says.
    #[serde(default)]
    pub worker_data: String,
    /// How long this process's backward pass waited for the group's gradient sums after
    /// it ended, ms (a mean over about the last 10 steps): the communication that the
    /// overlap with the backward pass did not hide.
    #[serde(default)]
    pub grad_wait_ms: Option<f64>,
    /// How long this process waits per step for each member, by rank (its own is 0), to
    /// enter the group's sums, ms (a mean over about the last 10 steps of this group): a
    /// straggler's entry stands out.
    #[serde(default)]
    pub member_wait_ms: Vec<f64>,
}

static SENT_BYTES: AtomicU64 = AtomicU64::new(0);
static RECEIVED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Bytes this process sent and received on cluster links (admissions included).
pub fn traffic() -> (u64, u64) {
    (
        SENT_BYTES.load(Ordering::Relaxed),
        RECEIVED_BYTES.load(Ordering::Relaxed),
    )
}

/// A worker in a group.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JoinedNode {
    /// Its rank.
    pub rank: usize,
    /// Where it connected from.
    pub addr: String,
    /// Where it computes (`cpu`, `cuda:N`), as it said in its hello.
    #[serde(default)]
    pub device: String,
}

/// How many members a group is admitted with: `nodes`, or as few as `fewest` once the
/// wait for the others has run out (`runtime.cluster.min_nodes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupSize {
    pub nodes: usize,
    pub fewest: usize,
}

impl From<usize> for GroupSize {
    /// Exactly `nodes`.
    fn from(nodes: usize) -> Self {
        GroupSize {
            nodes,
            fewest: nodes,
        }
    }
}

/// Admits nodes on `l` (after `first`, a node already vetted: a worker that came back to
/// a group formed without it) until the group has `size.nodes` members, or
/// `join_wait` has passed with at least `size.fewest` (then the group forms with those),
/// then (with [`Reduce::Mesh`] and more than one worker) has the workers connect to each
/// other, and tells every worker the group's size. Returns rank 0 of the group.
/// `on_change` hears where the admission stands, at the start and after every admission
/// or refusal; the wait ends early, with an error, once `cancelled()` says so (the run is
/// stopping).
#[allow(clippy::too_many_arguments)]
pub fn admit_group(
    l: &TcpListener,
    size: GroupSize,
    first: Option<Vetted>,
    me: &Identity,
    token: &Token,
    join_wait: Duration,
    timeout: Duration,
    reduce: Reduce,
    on_change: &dyn Fn(&GroupStatus),
    cancelled: &dyn Fn() -> bool,
) -> Result<TcpMember> {
    let world = size.nodes;
    if world < 2 || size.fewest < 2 || size.fewest > world {
        bail!(
            "a cluster needs at least 2 nodes (this one and a worker), and no fewer than {} of {world}",
            size.fewest
        )
    }
    let mut first = first;
    let deadline = Instant::now() + join_wait;
    let mesh = reduce == Reduce::Mesh;
    let mut peers: Vec<TcpStream> = vec![];
    // the workers' addresses for each other (a mesh of more than 2)
    let mut addrs: Vec<String> = vec![];
    let mut joined: Vec<JoinedNode> = vec![];
    let at = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let status = |joined: &[JoinedNode], state: &str, last: &str| {
        let list = joined
            .iter()
            .map(|j| format!("{} as rank {}{}", j.addr, j.rank, on_gpu(&j.device)))
            .collect::<Vec<_>>()
            .join(", ");
        let line = if state == "complete" {
            let how = if mesh {
                "sums over a mesh"
            } else {
                "sums through this node (star)"
            };
            let formed = joined.len() + 1;
            if formed < world {
                format!(
                    "{formed} of {world} nodes on {at} (runtime.cluster.min_nodes = {}: training on without the others, admitted again when they come), {how}: {list}",
                    size.fewest
                )
            } else {
                format!("{world} nodes on {at}, {how}: {list}")
            }
        } else {
            format!(
                "waiting on {at} for workers: {} of {world} nodes{}{last}",
                joined.len() + 1,
                if joined.is_empty() {
                    String::new()
                } else {
                    format!(" (joined: {list})")
                }
            )
        };
        on_change(&GroupStatus {
            state: state.into(),
            listen: at.clone(),
            nodes: if state == "complete" {
                joined.len() + 1
            } else {
                world
            },
            planned: world,
            joined: joined.to_vec(),
            line,
            copies: None,
            reduce: if mesh { "mesh" } else { "star" }.into(),
        })
    };
    status(&joined, "waiting", "");
    while peers.len() + 1 < world {
        // (a vetted connection has proved the token, build and recipe already)
        let vetted = first.as_ref().map(|v| v.device.clone());
        let next = match first.take() {
            Some(v) => Ok((v.s, v.from)),
            None => l.accept(),
        };
        let (mut s, from) = match next {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if cancelled() {
                    bail!(
                        "stopped waiting for workers ({} of {world} nodes had joined): the run is stopping",
                        peers.len() + 1
                    )
                }
                if Instant::now() >= deadline {
                    if peers.len() + 1 >= size.fewest {
                        // (runtime.cluster.min_nodes: on with the nodes that came)
                        break;
                    }
                    bail!(
                        "{} of {world} nodes joined within {:.0} s (counting this one); the others never arrived",
                        peers.len() + 1,
                        join_wait.as_secs_f64()
                    )
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e).context("accepting a node"),
        };
        let admitted = if let Some(device) = vetted {
            welcome(&mut s, peers.len() + 1, world, mesh).map(|a| (device, a))
        } else {
            prepare(&s)?;
            admit(&mut s, me, token, peers.len() + 1, world, mesh)
        };
        match admitted {
            Ok((device, peer_addr)) => {
                addrs.extend(peer_addr);
                tracing::info!(%from, rank = peers.len() + 1, %device, "a node joined");
                eprintln!(
                    "node {from} joined as rank {} of {world}{}",
                    peers.len() + 1,
                    on_gpu(&device)
                );
                peers.push(s);
                joined.push(JoinedNode {
                    rank: peers.len(),
                    addr: from.to_string(),
                    device,
                });
                status(&joined, "waiting", "");
            }
            Err(why) => {
                tracing::warn!(%from, "refused a node: {why}");
                eprintln!("refused the node at {from}: {why}");
                status(&joined, "waiting", &format!("; refused {from}: {why}"));
            }
        }
    }
    set_write_timeouts(&peers, timeout)?;
    let formed = peers.len() + 1;
    // (the workers were welcomed into a group of `world`: the roster says how many it has)
    let r = if mesh && world > 2 {
        form_mesh(&mut peers, addrs, formed)
    } else {
        tell_size(&mut peers, formed)
    };
    if let Err(e) = r {
        let why = format!("{e:#}");
        status(&joined, "waiting", &format!("; {why}"));
        bail!("{why}")
    }
    if formed < world {
        eprintln!(
            "{formed} of {world} nodes joined within {:.0} s: the group trains on without the others (runtime.cluster.min_nodes = {})",
            join_wait.as_secs_f64(),
            size.fewest
        );
    } else {
        eprintln!("all {world} nodes joined");
    }
    status(&joined, "complete", "");
    TcpMember::new(
        0,
        formed,
        peers
            .into_iter()
            .enumerate()
            .map(|(i, s)| (i + 1, s))
            .collect(),
        vec![],
        timeout,
        mesh,
    )
}

/// The coordinator's part of a mesh: sends every worker the roster, then hears from
/// each whether its links to the others stand. An error says which worker could not
/// reach which.
fn form_mesh(peers: &mut [TcpStream], addrs: Vec<String>, world: usize) -> Result<()> {
    let nonce = blake3::Hash::from(challenge_bytes()?).to_hex().to_string();
    let roster = serde_json::to_vec(&Roster {
        nonce,
        addrs,
        world,
    })?;
    for (i, s) in peers.iter_mut().enumerate() {
        write_frame(s, TAG_ROSTER, &roster)
            .with_context(|| format!("sending member {} the workers' addresses", i + 1))?;
    }
    let deadline = Instant::now() + MESH_WAIT + HELLO_WAIT;
    let mut problems = vec![];
    for (i, s) in peers.iter_mut().enumerate() {
        match read_frame(s, deadline) {
            Ok((TAG_MESH_READY, p)) if p.is_empty() => {}
            Ok((TAG_MESH_READY, why)) => problems.push(format!(
                "member {}: {}",
                i + 1,
                String::from_utf8_lossy(&why)
            )),
            Ok((t, _)) => problems.push(format!(
                "member {} sent frame {t} where its mesh's state belongs",
                i + 1
            )),
            Err(ReadFail::Closed) => {
                problems.push(format!("member {} went away while connecting", i + 1))
            }
            Err(ReadFail::TimedOut) => problems.push(format!(
                "member {} did not say within {} s whether it reached the others",
                i + 1,
                (MESH_WAIT + HELLO_WAIT).as_secs()
            )),
            Err(ReadFail::Other(e)) => problems.push(format!("member {}: {e}", i + 1)),
        }
    }
    if !problems.is_empty() {
        bail!(
            "the workers could not all connect to each other (runtime.cluster.reduce = \"mesh\" needs every worker to accept connections from the others; \"star\" needs none): {}",
            problems.join("; ")
        )
    }
    Ok(())
}

/// Without a mesh, the roster carries only the group's size as formed.
fn tell_size(peers: &mut [TcpStream], world: usize) -> Result<()> {
    let roster = serde_json::to_vec(&Roster {
        nonce: String::new(),
        addrs: vec![],
        world,
    })?;
    for (i, s) in peers.iter_mut().enumerate() {
        write_frame(s, TAG_ROSTER, &roster)
            .with_context(|| format!("telling member {} the group's size", i + 1))?;
    }
    Ok(())
}

fn set_write_timeouts(streams: &[TcpStream], timeout: Duration) -> Result<()> {
    for s in streams {
        s.set_write_timeout(Some(timeout))?;
    }
    Ok(())
}

/// An accepted connection as the admissions read it: blocking, no Nagle, keepalive.
fn prepare(s: &TcpStream) -> Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    keepalive(s)?;
    Ok(())
}

/// A node that proved the token and runs this build and recipe, not yet welcomed: a
/// worker back to a group formed without it, vetted before the group is formed again
/// for it ([`vet_waiting`]).
pub struct Vetted {
    s: TcpStream,
    from: SocketAddr,
    device: String,
}

impl Vetted {
    /// Where it connected from.
    pub fn from(&self) -> SocketAddr {
        self.from
    }
}

/// A connection waiting in `l`'s backlog, vetted as an admission vets it (the refusal's
/// reason sent to it and returned): `None` when none is waiting. A node that says
/// nothing costs up to the hello's wait (10 s); one that closes at once, nothing.
pub fn vet_waiting(
    l: &TcpListener,
    me: &Identity,
    token: &Token,
) -> Option<std::result::Result<Vetted, (SocketAddr, String)>> {
    let (mut s, from) = l.accept().ok()?;
    Some(
        prepare(&s)
            .map_err(|e| format!("{e:#}"))
            .and_then(|()| vet(&mut s, me, token))
            .map(|device| Vetted { s, from, device })
            .map_err(|why| (from, why)),
    )
}

/// One admission: challenge, hello, then welcome or refusal (the refusal's reason is
/// also sent to the node): its device, and in a mesh of more than 2 its address for the
/// other workers. Errors are the reason the node was refused.
fn admit(
    s: &mut TcpStream,
    me: &Identity,
    token: &Token,
    rank: usize,
    world: usize,
    mesh: bool,
) -> std::result::Result<(String, Option<String>), String> {
    let device = vet(s, me, token)?;
    Ok((device, welcome(s, rank, world, mesh)?))
}

/// The first half of an admission: challenge and hello, refused (with the reason sent)
/// unless it proves the token and runs this build and recipe; the node's device.
fn vet(s: &mut TcpStream, me: &Identity, token: &Token) -> std::result::Result<String, String> {
    let deadline = Instant::now() + HELLO_WAIT;
    s.set_write_timeout(Some(HELLO_WAIT))
        .map_err(|e| e.to_string())?;
    let challenge = challenge_bytes().map_err(|e| format!("{e:#}"))?;
    write_frame(s, TAG_CHALLENGE, &challenge).map_err(|e| e.to_string())?;
    let hello: Hello = match read_frame(s, deadline) {
        Ok((TAG_HELLO, p)) => {
            serde_json::from_slice(&p).map_err(|e| format!("an unreadable hello: {e}"))?
        }
        Ok((tag, _)) => {
            return Err(format!(
                "frame {tag} where a hello belongs: not a dinod node"
            ))
        }
        Err(ReadFail::Closed) => return Err("it closed the connection before its hello".into()),
        Err(ReadFail::TimedOut) => {
            return Err(format!("no hello within {} s", HELLO_WAIT.as_secs()))
        }
        Err(ReadFail::Other(e)) => return Err(e),
    };
    // blake3::Hash compares in constant time
    let proved = blake3::Hash::from_hex(&hello.proof)
        .map(|h| h == blake3::keyed_hash(&token.0, &challenge))
        .unwrap_or(false);
    let refusal = if !proved {
        Some("wrong cluster token (the nodes' token files differ)".to_string())
    } else if hello.code_version != me.code_version {
        Some(format!(
            "it runs {}, this coordinator runs {}: every node must run the same build",
            hello.code_version, me.code_version
        ))
    } else if hello.config_hash != me.config_hash {
        Some(format!(
            "its recipe differs (config hash {} here {}): every node must train the same recipe",
            short(&hello.config_hash),
            short(&me.config_hash)
        ))
    } else {
        None
    };
    if let Some(why) = refusal {
        let _ = write_frame(s, TAG_REFUSED, why.as_bytes());
        return Err(why);
    }
    Ok(hello.device)
}

/// The second half: the welcome with the node's rank, and in a mesh of more than 2 its
/// address for the other workers.
fn welcome(
    s: &mut TcpStream,
    rank: usize,
    world: usize,
    mesh: bool,
) -> std::result::Result<Option<String>, String> {
    let w = serde_json::to_vec(&Welcome { rank, world, mesh }).expect("serialisable");
    write_frame(s, TAG_WELCOME, &w).map_err(|e| format!("it went away before its welcome: {e}"))?;
    if !(mesh && world > 2) {
        return Ok(None);
    }
    match read_frame(s, Instant::now() + HELLO_WAIT) {
        Ok((TAG_PEER_ADDR, a)) => Ok(Some(String::from_utf8_lossy(&a).into_owned())),
        Ok((TAG_FAIL, why)) => Err(String::from_utf8_lossy(&why).into_owned()),
        Ok((tag, _)) => Err(format!("frame {tag} where its address belongs")),
        Err(_) => Err("it sent no address for the other workers".into()),
    }
}

/// " on cuda:N" for a node on a GPU (a CPU node's lines stay as they were).
fn on_gpu(device: &str) -> String {
    if device.is_empty() || device == "cpu" {
        String::new()
    } else {
        format!(" on {device}")
    }
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}

/// A worker's side: connects to the coordinator at `addr` and waits for it to admit
/// nodes, connecting again while nobody listens or the coordinator goes away, until
/// `join_wait` has passed (so a worker may start first, and outlive a coordinator's
/// restart); proves the token and is admitted, or fails with the coordinator's reason.
/// In a mesh it then links to the other workers, listening where `mesh` says.
pub fn join(
    addr: &str,
    me: &Identity,
    token: &Token,
    join_wait: Duration,
    timeout: Duration,
    mesh: &MeshAddr,
) -> Result<TcpMember> {
    let deadline = Instant::now() + join_wait;
    let gone = || {
        anyhow!(
            "no coordinator admitted this node at {addr} within {:.0} s",
            join_wait.as_secs_f64()
        )
    };
    let (mut s, challenge) = loop {
        if Instant::now() >= deadline {
            return Err(gone());
        }
        let tried = addr
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve the coordinator's address {addr}"))?
            .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok());
        let Some(mut s) = tried else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        // A connection to itself: connecting to a port of this machine that nobody
        // listens on can pick that very port as its source (TCP's simultaneous open), and
        // it would then hold the port the coordinator is about to listen on.
        if s.local_addr().ok() == s.peer_addr().ok() {
            drop(s);
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        s.set_nodelay(true)?;
        keepalive(&s)?;
        // The challenge comes when the coordinator admits nodes, which may be later: a
        // daemon admits at its next step, and a connection waits in its backlog until then.
        match read_frame(&mut s, deadline) {
            Ok((TAG_CHALLENGE, c)) => break (s, c),
            Ok((tag, _)) => {
                bail!("{addr} sent frame {tag} where a challenge belongs: not a dinod coordinator")
            }
            // the coordinator went away (a daemon restarting): connect again
            Err(ReadFail::Closed) => {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            Err(ReadFail::TimedOut) => bail!(
                "{addr} accepted the connection but sent no challenge within {:.0} s: not a dinod coordinator, or one that is not admitting nodes",
                join_wait.as_secs_f64()
            ),
            Err(ReadFail::Other(e)) => bail!("reading the challenge from {addr}: {e}"),
        }
    };
    s.set_write_timeout(Some(HELLO_WAIT))?;
    let hello_deadline = Instant::now() + HELLO_WAIT;
    let hello = Hello {
        code_version: me.code_version.clone(),
        config_hash: me.config_hash.clone(),
        proof: token.proof(&challenge),
        device: me.device.clone(),
    };
    write_frame(&mut s, TAG_HELLO, &serde_json::to_vec(&hello)?)
        .with_context(|| format!("sending the hello to {addr}"))?;
    let welcome: Welcome = match read_frame(&mut s, hello_deadline) {
        Ok((TAG_WELCOME, p)) => serde_json::from_slice(&p).context("an unreadable welcome")?,
        Ok((TAG_REFUSED, why)) => bail!(
            "the coordinator at {addr} refused this node: {}",
            String::from_utf8_lossy(&why)
        ),
        Ok((tag, _)) => bail!("{addr} sent frame {tag} where a welcome belongs"),
        Err(_) => bail!("the coordinator at {addr} closed the connection without a welcome"),
    };
    s.set_write_timeout(Some(timeout))?;
    let (peers, world) = if welcome.mesh && welcome.world > 2 {
        // a port this node cannot listen on is this node's fault (a wrong address, a
        // port in use): the coordinator hears why, and the worker ends
        let l = match listen_for_peers(&s, mesh.listen) {
            Ok(l) => l,
            Err(e) => {
                let _ = write_frame(&mut s, TAG_FAIL, format!("{e:#}").as_bytes());
                return Err(e);
            }
        };
        // whatever goes wrong from here is the group's, not this node's: join again
        join_mesh(
            &mut s,
            welcome.rank,
            welcome.world,
            token,
            l,
            mesh.advertise.as_deref(),
        )
        .map_err(|e| anyhow::Error::new(GroupFailed(format!("{e:#}"))))?
    } else {
        // the group's size as formed (the welcome's, or fewer: runtime.cluster.min_nodes)
        let roster =
            read_roster(&mut s).map_err(|e| anyhow::Error::new(GroupFailed(format!("{e:#}"))))?;
        (vec![], roster.world)
    };
    let world = if world == 0 { welcome.world } else { world };
    if !(welcome.rank < world && world <= welcome.world) {
        bail!(GroupFailed(format!(
            "the coordinator formed a group of {world} for rank {} of {}",
            welcome.rank, welcome.world
        )))
    }
    eprintln!(
        "joined {addr} as rank {} of {}{}",
        welcome.rank,
        world,
        if peers.is_empty() {
            String::new()
        } else {
            format!(", with links to the other {} worker(s)", peers.len())
        }
    );
    TcpMember::new(
        welcome.rank,
        world,
        vec![(0, s)],
        peers,
        timeout,
        welcome.mesh,
    )
}

/// Where a worker listens for the other workers' links in a mesh, and what it tells them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshAddr {
    /// `--mesh-listen` (see [`mesh_listen_addr`]); `None`: an ephemeral port of the
    /// address the worker reached the coordinator from.
    pub listen: Option<SocketAddr>,
    /// `--mesh-advertise HOST:PORT`: the address the others connect to, where it is not
    /// the one listened on (a container's published port, NAT); `None`: the listened
    /// address.
    pub advertise: Option<String>,
}

/// `dinod worker --mesh-advertise`'s value: `HOST:PORT` with a port (a name is resolved
/// by the workers that connect).
pub fn mesh_advertise_addr(s: &str) -> std::result::Result<String, String> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(s.to_string())
        }
        _ => Err(format!("{s:?} is not HOST:PORT (with a port)")),
    }
}

/// `dinod worker --mesh-listen`'s value: `IP` or `IP:PORT` (port 0 or none: an
/// ephemeral one). The unspecified address (`0.0.0.0`, `::`) listens everywhere and
/// announces the address the worker reached the coordinator from.
pub fn mesh_listen_addr(s: &str) -> std::result::Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| {
            s.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 0))
        })
        .map_err(|_| format!("{s:?} is not IP or IP:PORT (a numeric address)"))
}

/// A worker's listener for the other workers' links: on `listen`, or an ephemeral port
/// of the address it reached the coordinator from (on `s`).
fn listen_for_peers(s: &TcpStream, listen: Option<SocketAddr>) -> Result<TcpListener> {
    let want = listen.unwrap_or(SocketAddr::new(s.local_addr()?.ip(), 0));
    let l = TcpListener::bind(want)
        .with_context(|| format!("cannot listen on {want} for the other workers"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// A worker's part of a mesh, listening on `l`: sends its address (`advertise`, or the
/// listened one, an unspecified IP as the address it reached the coordinator from),
/// waits for the roster (it comes
/// once the group is complete), connects to the workers of lower rank and accepts those
/// of higher rank, and tells the coordinator how that went. Returns the links to the
/// other workers by rank, and the group's size as formed.
fn join_mesh(
    s: &mut TcpStream,
    rank: usize,
    world: usize,
    token: &Token,
    l: TcpListener,
    advertise: Option<&str>,
) -> Result<(Vec<(usize, TcpStream)>, usize)> {
    let mut at = l.local_addr()?;
    if at.ip().is_unspecified() {
        at.set_ip(s.local_addr()?.ip());
    }
    let at = advertise.map_or_else(|| at.to_string(), str::to_string);
    write_frame(s, TAG_PEER_ADDR, at.to_string().as_bytes())
        .context("sending this worker's address to the coordinator")?;
    let roster = read_roster(s)?;
    // (a group formed with fewer than `world`: the roster has the ones that came)
    let formed = if roster.world == 0 {
        world
    } else {
        roster.world
    };
    let links = connect_peers(&l, &roster, rank, formed, token);
    let ready = match &links {
        Ok(_) => vec![],
        Err(e) => format!("{e:#}").into_bytes(),
    };
    write_frame(s, TAG_MESH_READY, &ready).context("telling the coordinator the mesh's state")?;
    Ok((links?, formed))
}

/// A worker waits (as long as the admission takes) for the roster: the group is formed.
fn read_roster(s: &mut TcpStream) -> Result<Roster> {
    match read_frame_until(s, None) {
        Ok((TAG_ROSTER, p)) => serde_json::from_slice(&p).context("an unreadable roster"),
        Ok((t, _)) => bail!("the coordinator sent frame {t} where the roster belongs"),
        Err(ReadFail::Other(e)) => bail!("reading the roster: {e}"),
        Err(_) => bail!("the coordinator closed the connection before the group was complete"),
    }
}

/// A connection to the first of `addr`'s addresses that answers (a name may resolve to
/// several), each given 5 s.
fn connect_any(addr: &str) -> Result<TcpStream> {
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or_else(
        || anyhow!("{addr} resolves to no address"),
        anyhow::Error::from,
    ))
}

/// The proof on a link from worker `from` to worker `to` of the group of `nonce`.
fn peer_proof(token: &Token, nonce: &[u8], from: usize, to: usize) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(&token.0);
    h.update(nonce);
    h.update(&(from as u64).to_le_bytes());
    h.update(&(to as u64).to_le_bytes());
    h.finalize()
}

fn connect_peers(
    l: &TcpListener,
    roster: &Roster,
    me: usize,
    world: usize,
    token: &Token,
) -> Result<Vec<(usize, TcpStream)>> {
    if roster.addrs.len() + 1 != world {
        bail!(
            "a roster of {} workers for a group of {world}",
            roster.addrs.len()
        )
    }
    let nonce = blake3::Hash::from_hex(&roster.nonce).context("an unreadable nonce")?;
    let deadline = Instant::now() + MESH_WAIT;
    let mut out: Vec<(usize, TcpStream)> = vec![];
    for to in 1..me {
        let addr = &roster.addrs[to - 1];
        let mut p = connect_any(addr)
            .with_context(|| format!("cannot connect to member {to} at {addr}"))?;
        p.set_nodelay(true)?;
        keepalive(&p)?;
        p.set_write_timeout(Some(HELLO_WAIT))?;
        let hello = PeerHello {
            rank: me,
            proof: peer_proof(token, nonce.as_bytes(), me, to)
                .to_hex()
                .to_string(),
        };
        write_frame(&mut p, TAG_PEER_HELLO, &serde_json::to_vec(&hello)?)
            .with_context(|| format!("greeting member {to} at {addr}"))?;
        out.push((to, p));
    }
    let here = l.local_addr()?;
    while out.len() + 2 < world {
        let (mut p, from) = match l.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (me + 1..world)
                        .filter(|r| !out.iter().any(|(o, _)| o == r))
                        .map(|r| r.to_string())
                        .collect();
                    bail!(
                        "member(s) {} did not connect to this worker at {here} within {} s",
                        missing.join(", "),
                        MESH_WAIT.as_secs()
                    )
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => return Err(e).context("accepting another worker"),
        };
        p.set_nonblocking(false)?;
        p.set_nodelay(true)?;
        keepalive(&p)?;
        let hello: Option<PeerHello> = match read_frame(&mut p, Instant::now() + HELLO_WAIT) {
            Ok((TAG_PEER_HELLO, b)) => serde_json::from_slice(&b).ok(),
            _ => None,
        };
        match hello {
            Some(h)
                if h.rank > me
                    && h.rank < world
                    && !out.iter().any(|(r, _)| *r == h.rank)
                    // blake3::Hash compares in constant time
                    && blake3::Hash::from_hex(&h.proof).ok()
                        == Some(peer_proof(token, nonce.as_bytes(), h.rank, me)) =>
            {
                out.push((h.rank, p))
            }
            _ => {
                tracing::warn!(%from, "refused a connection on the workers' port: no valid hello from a member of this group");
            }
        }
    }
    out.sort_by_key(|(r, _)| *r);
    Ok(out)
}

/// A link to another member: its two directions are locked apart, so that a mesh sum
/// sends and receives on it at once.
struct Link {
    /// The member at the other end.
    rank: usize,
    w: Arc<Mutex<TcpStream>>,
    r: Mutex<TcpStream>,
    /// Another handle of the same socket, to close a link that a thread is using.
    raw: TcpStream,
    /// In a mesh: the link's sending thread, which writes the frames queued here one
    /// after the other (under `w`), so that a sum sends to every peer while it reads.
    sender: Option<Mutex<mpsc::Sender<SendJob>>>,
}

/// A frame for a link's sending thread, and where it says how the write went.
type SendJob = (u8, Arc<Vec<u8>>, mpsc::Sender<std::io::Result<()>>);

/// A link's sending thread: writes each queued frame under the link's write lock until
/// the link is dropped.
fn sending_thread(w: Arc<Mutex<TcpStream>>, jobs: mpsc::Receiver<SendJob>) {
    for (tag, payload, done) in jobs {
        let r = match w.lock() {
            Ok(mut s) => write_frame(&mut s, tag, &payload),
            Err(e) => write_frame(&mut e.into_inner(), tag, &payload),
        };
        let _ = done.send(r);
    }
}

/// One member of a group of processes. The coordinator (rank 0) holds a link to every
/// worker (rank `r` is `links[r - 1]`); a worker holds its link to the coordinator, and
/// in a mesh of more than 2 its links to the other workers (`peers`, by rank).
pub struct TcpMember {
    rank: usize,
    world: usize,
    links: Vec<Link>,
    peers: Vec<Link>,
    /// Large sums take the mesh (see [`Reduce`]).
    mesh: bool,
    timeout: Duration,
    /// Set when the group failed: every call fails with it from then on.
    aborted: Mutex<Option<String>>,
    timed_out: AtomicBool,
    /// Per member: how long this member waited for it to begin sending its part of a
    /// sum, ns, since [`TcpMember::take_waits`] (the stragglers, seen from here).
    waits_ns: Vec<AtomicU64>,
}

fn lock_err<T>(_: T) -> anyhow::Error {
    anyhow!("a cluster link's lock was poisoned by a panic")
}

impl TcpMember {
    fn new(
        rank: usize,
        world: usize,
        links: Vec<(usize, TcpStream)>,
        peers: Vec<(usize, TcpStream)>,
        timeout: Duration,
        mesh: bool,
    ) -> Result<TcpMember> {
        let link = |(r, s): (usize, TcpStream)| -> Result<Link> {
            s.set_write_timeout(Some(timeout))?;
            let w = Arc::new(Mutex::new(s.try_clone()?));
            let sender = if mesh {
                let (tx, rx) = mpsc::channel();
                let w = w.clone();
                std::thread::Builder::new()
                    .name(format!("dinod-link-{r}"))
                    .spawn(move || sending_thread(w, rx))?;
                Some(Mutex::new(tx))
            } else {
                None
            };
            Ok(Link {
                rank: r,
                r: Mutex::new(s.try_clone()?),
                raw: s,
                w,
                sender,
            })
        };
        Ok(TcpMember {
            rank,
            world,
            links: links.into_iter().map(link).collect::<Result<_>>()?,
            peers: peers.into_iter().map(link).collect::<Result<_>>()?,
            mesh,
            timeout,
            aborted: Mutex::new(None),
            timed_out: AtomicBool::new(false),
            waits_ns: (0..world).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Every link this member holds.
    fn all_links(&self) -> impl Iterator<Item = &Link> {
        self.links.iter().chain(&self.peers)
    }

    /// The link to member `rank`.
    fn link(&self, rank: usize) -> Result<&Link> {
        self.all_links()
            .find(|l| l.rank == rank)
            .ok_or_else(|| anyhow!("member {} holds no link to member {rank}", self.rank))
    }

    fn who(rank: usize) -> String {
        if rank == 0 {
            "the coordinator".into()
        } else {
            format!("member {rank}")
        }
    }

    fn check_aborted(&self) -> Result<()> {
        match &*self.aborted.lock().map_err(lock_err)? {
            Some(why) => bail!("the group was aborted ({why})"),
            None => Ok(()),
        }
    }

    /// Marks the group failed and tells the peers (best effort: a peer that is gone is
    /// gone). The first reason stays.
    fn fail(&self, why: String) -> anyhow::Error {
        let mut a = match self.aborted.lock() {
            Ok(a) => a,
            Err(e) => e.into_inner(),
        };
        if a.is_none() {
            *a = Some(why.clone());
            for l in self.all_links() {
                match l.w.try_lock() {
                    Ok(mut s) => {
                        let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                        let _ = write_frame(&mut s, TAG_FAIL, why.as_bytes());
                    }
                    // another thread is inside an exchange on this link: a frame now
                    // could land in the middle of its frame, so the link is closed (the
                    // peer hears "connection closed", and that thread's read ends)
                    Err(_) => {
                        let _ = l.raw.shutdown(std::net::Shutdown::Both);
                    }
                }
            }
        }
        anyhow!("{why}")
    }

    fn read_failure(&self, f: ReadFail, who: &str) -> anyhow::Error {
        match f {
            ReadFail::Closed => self.fail(format!(
                "{who}'s connection closed (its process ended or its machine went away)"
            )),
            ReadFail::TimedOut => {
                self.timed_out.store(true, Ordering::SeqCst);
                self.fail(format!(
                    "{TIMED_OUT}: member {} waited {:.1} s for {who}",
                    self.rank,
                    self.timeout.as_secs_f64()
                ))
            }
            ReadFail::Other(e) => self.fail(format!("reading from {who}: {e}")),
        }
    }

    fn write_failure(&self, e: std::io::Error, who: &str) -> anyhow::Error {
        match e.kind() {
            ErrorKind::BrokenPipe
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::HostUnreachable
            | ErrorKind::NetworkUnreachable
            // ETIMEDOUT: TCP gave up on the peer (keepalive or TCP_USER_TIMEOUT)
            | ErrorKind::TimedOut => self.read_failure(ReadFail::Closed, who),
            // EAGAIN: the write timeout, which is the collective timeout
            ErrorKind::WouldBlock => self.read_failure(ReadFail::TimedOut, who),
            _ => self.fail(format!("sending to {who}: {e}")),
        }
    }

    /// Sends `payload` under `tag` to the coordinator and returns the coordinator's
    /// answer of the same tag (a worker's half of every exchange).
    fn exchange_as_worker(&self, tag: u8, payload: &[u8]) -> Result<Vec<u8>> {
        let w = write_frame(
            &mut *self.links[0].w.lock().map_err(lock_err)?,
            tag,
            payload,
        );
        if let Err(e) = w {
            return Err(self.write_failure(e, "the coordinator"));
        }
        let r = read_frame(
            &mut *self.links[0].r.lock().map_err(lock_err)?,
            Instant::now() + self.timeout,
        );
        match r {
            Ok((t, p)) if t == tag => Ok(p),
            Ok((TAG_FAIL, why)) => {
                let why = String::from_utf8_lossy(&why).into_owned();
                *self.aborted.lock().map_err(lock_err)? = Some(why.clone());
                bail!("the group was aborted ({why})")
            }
            Ok((t, _)) => Err(self.fail(format!("the coordinator sent frame {t}, expected {tag}"))),
            Err(f) => Err(self.read_failure(f, "the coordinator")),
        }
    }

    /// Reads every worker's payload under `tag`, in rank order (the coordinator's half).
    fn collect_as_coordinator(&self, tag: u8) -> Result<Vec<Vec<u8>>> {
        let deadline = Instant::now() + self.timeout;
        self.note_entries(1..self.world, deadline);
        (1..self.world)
            .map(|r| self.recv_from(r, tag, deadline))
            .collect()
    }

    /// Notes when each of `ranks` enters the collective this member is in: the time from
    /// now until its link has something to read (the head of its entry frame, sent as it
    /// calls: its part of a star's sum, its values of a mesh chunk), for
    /// [`TcpMember::take_waits`]. Every member is timed from the same start, whatever the
    /// order the frames are read in. Stops at `deadline` or on a link's failure, which
    /// the reads then report. On the coordinator only.
    #[cfg(unix)]
    fn note_entries(&self, ranks: impl Iterator<Item = usize>, deadline: Instant) {
        use std::os::fd::AsRawFd;
        // (only the coordinator's waits are ever taken: the others skip the polls)
        if self.rank != 0 {
            return;
        }
        let t0 = Instant::now();
        let mut waiting: Vec<(usize, libc::pollfd)> = ranks
            .filter_map(|r| {
                let fd = self.link(r).ok()?.raw.as_raw_fd();
                let events = libc::POLLIN;
                Some((
                    r,
                    libc::pollfd {
                        fd,
                        events,
                        revents: 0,
                    },
                ))
            })
            .collect();
        while !waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let mut fds: Vec<libc::pollfd> = waiting.iter().map(|(_, p)| *p).collect();
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
            // SAFETY: `fds` is a live array of `fds.len()` pollfd structs for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if n < 0 && std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                continue;
            }
            if n <= 0 {
                return;
            }
            let at = t0.elapsed().as_nanos() as u64;
            let mut still = vec![];
            for ((r, p), got) in waiting.into_iter().zip(&fds) {
                if got.revents & libc::POLLIN != 0 {
                    if let Some(w) = self.waits_ns.get(r) {
                        w.fetch_add(at, Ordering::Relaxed);
                    }
                } else if got.revents == 0 {
                    still.push((r, p));
                }
                // (a hang-up or an error without data: its read reports it)
            }
            waiting = still;
        }
    }

    #[cfg(not(unix))]
    fn note_entries(&self, _ranks: impl Iterator<Item = usize>, _deadline: Instant) {}

    /// How long this member waited for each member (by rank; its own entry is zero) to
    /// enter the sums since the last call, summed over them: from the start of its own
    /// wait until that member's first bytes were there, not their transfer
    /// ([`TcpMember::note_entries`]). Each late member is charged its own lateness.
    pub fn take_waits(&self) -> Vec<Duration> {
        self.waits_ns
            .iter()
            .map(|w| Duration::from_nanos(w.swap(0, Ordering::Relaxed)))
            .collect()
    }

    fn send_to_workers(&self, tag: u8, payload: &[u8]) -> Result<()> {
        for (i, l) in self.links.iter().enumerate() {
            let r = write_frame(&mut *l.w.lock().map_err(lock_err)?, tag, payload);
            if let Err(e) = r {
                return Err(self.write_failure(e, &format!("member {}", i + 1)));
            }
        }
        Ok(())
    }

    /// How this group sums.
    pub fn reduce(&self) -> Reduce {
        if self.mesh {
            Reduce::Mesh
        } else {
            Reduce::Star
        }
    }

    /// The coordinator ends this group to form another (a worker is back): the workers
    /// hear `why` as the group's failure and join again. Best effort, as any failure.
    pub fn dissolve(&self, why: &str) {
        let _ = self.fail(why.to_string());
    }

    /// Why the group failed, if a transport failure, a peer or [`Collective::abort`] has
    /// failed it.
    pub fn failure(&self) -> Option<String> {
        self.aborted.lock().ok().and_then(|a| a.clone())
    }

    /// The coordinator sends `payload` to worker `rank` as a control message.
    pub fn send_control(&self, rank: usize, payload: &[u8]) -> Result<()> {
        self.check_aborted()?;
        if self.rank != 0 || rank == 0 || rank >= self.world {
            bail!(
                "member {} cannot send a control message to member {rank}",
                self.rank
            )
        }
        let r = write_frame(
            &mut *self.links[rank - 1].w.lock().map_err(lock_err)?,
            TAG_CONTROL,
            payload,
        );
        r.map_err(|e| self.write_failure(e, &format!("member {rank}")))
    }

    /// A worker waits (without a deadline: rank 0 may checkpoint or probe for long) for
    /// the next control message; `None` when the coordinator ended the group for good
    /// ([`TcpMember::bye`]). A closed connection or a failed group is an error.
    pub fn recv_control(&self) -> Result<Option<Vec<u8>>> {
        self.check_aborted()?;
        if self.rank == 0 {
            bail!("the coordinator receives no control messages")
        }
        let r = read_frame_until(&mut *self.links[0].r.lock().map_err(lock_err)?, None);
        match r {
            Ok((TAG_CONTROL, p)) => Ok(Some(p)),
            Ok((TAG_BYE, _)) => Ok(None),
            Ok((TAG_FAIL, why)) => {
                let why = String::from_utf8_lossy(&why).into_owned();
                *self.aborted.lock().map_err(lock_err)? = Some(why.clone());
                bail!("the group was aborted ({why})")
            }
            Ok((t, _)) => Err(self.fail(format!(
                "the coordinator sent frame {t} where a control message belongs"
            ))),
            Err(f) => Err(self.read_failure(f, "the coordinator")),
        }
    }

    /// The coordinator ends the group for good: the workers' [`TcpMember::recv_control`]
    /// returns `None` (best effort: a worker that is gone is gone).
    pub fn bye(&self) {
        if self.rank == 0 {
            for l in &self.links {
                if let Ok(mut s) = l.w.lock() {
                    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                    let _ = write_frame(&mut s, TAG_BYE, b"");
                }
            }
        }
    }

    /// Every member's `text` in rank order, on every member (for comparing state
    /// fingerprints).
    pub fn gather(&self, text: &str) -> Result<Vec<String>> {
        self.check_aborted()?;
        if self.rank != 0 {
            let p = self.exchange_as_worker(TAG_GATHER, text.as_bytes())?;
            return serde_json::from_slice(&p).context("an unreadable gather answer");
        }
        let mut all = vec![text.to_string()];
        for p in self.collect_as_coordinator(TAG_GATHER)? {
            all.push(String::from_utf8_lossy(&p).into_owned());
        }
        self.send_to_workers(TAG_GATHER, &serde_json::to_vec(&all)?)?;
        Ok(all)
    }

    fn sum(&self, v: &mut [f64]) -> Result<()> {
        self.sum_as::<f64>(v, TAG_SUM)
    }

    /// The sum of `v` over the group, sent as `E` (f64, or f32 for f32 tensors: half the
    /// bytes) and summed in f64 in rank order from zero on the coordinator: an f32 widens
    /// to f64 exactly and the f64 sum rounds to f32 once, so the bits are those of
    /// `model::dist::reduce_on_host` over `ThreadGroup`.
    fn sum_as<E: Wire>(&self, v: &mut [E], tag: u8) -> Result<()> {
        self.check_aborted()?;
        if self.mesh && v.len() >= MESH_MIN_VALUES {
            return self.mesh_sum(v);
        }
        let w = E::WIDTH;
        if self.rank != 0 {
            let p = self.exchange_as_worker(tag, &E::to_bytes(v))?;
            if p.len() != v.len() * w {
                bail!(
                    "the coordinator answered {} values to a sum of {}",
                    p.len() / w,
                    v.len()
                )
            }
            E::from_bytes(&p, v);
            return Ok(());
        }
        let parts = self.collect_as_coordinator(tag)?;
        if let Some((i, p)) = parts
            .iter()
            .enumerate()
            .find(|(_, p)| p.len() != v.len() * w)
        {
            return Err(self.fail(format!(
                "member {} sent {} values to a sum of {}",
                i + 1,
                p.len() / w,
                v.len()
            )));
        }
        // rank order from zero, as ThreadGroup: the same bits whatever the transport
        let mut acc = vec![0.0f64; v.len()];
        acc.iter_mut()
            .zip(v.iter())
            .for_each(|(a, b)| *a += b.wide());
        let mut part = vec![E::default(); v.len()];
        for p in &parts {
            E::from_bytes(p, &mut part);
            acc.iter_mut().zip(&part).for_each(|(a, b)| *a += b.wide());
        }
        v.iter_mut().zip(&acc).for_each(|(x, a)| *x = E::narrow(*a));
        self.send_to_workers(tag, &E::to_bytes(v))?;
        Ok(())
    }

    /// [`TcpMember::sum_as`] through the mesh: member `r` owns chunk `r` of `world`; it
    /// receives every other member's values of that chunk while it sends each owner its
    /// values of theirs, sums in rank order from zero in f64 (the coordinator's order in
    /// a star: the same bits), and sends the sums to every member while it receives the
    /// other chunks' sums. Every link carries both directions at once.
    fn mesh_sum<E: Wire>(&self, v: &mut [E]) -> Result<()> {
        let (me, world, n, w) = (self.rank, self.world, v.len(), E::WIDTH);
        let chunk = |c: usize| c * n / world..(c + 1) * n / world;
        let deadline = Instant::now() + self.timeout;
        let mine = chunk(me);
        let others = || (0..world).filter(move |&p| p != me);
        let len_err = |from: usize, got: usize, want: usize| {
            self.fail(format!(
                "{} sent {} values of a chunk of {want}",
                Self::who(from),
                got / w
            ))
        };
        // reduce-scatter
        let mut acc = vec![0.0f64; mine.len()];
        let sends = others()
            .map(|p| self.post(p, E::TAG_RS, Arc::new(E::to_bytes(&v[chunk(p)]))))
            .collect::<Result<Vec<_>>>()?;
        self.note_entries(others(), deadline);
        let got = (|| -> Result<()> {
            let mut part = vec![E::default(); mine.len()];
            for r in 0..world {
                if r != me {
                    let p = self.recv_from(r, E::TAG_RS, deadline)?;
                    if p.len() != part.len() * w {
                        return Err(len_err(r, p.len(), part.len()));
                    }
                    E::from_bytes(&p, &mut part);
                } else {
                    part.copy_from_slice(&v[mine.clone()]);
                }
                acc.iter_mut().zip(&part).for_each(|(a, b)| *a += b.wide());
            }
            Ok(())
        })();
        self.sent(sends, got)?;
        // all-gather
        let sums: Vec<E> = acc.iter().map(|a| E::narrow(*a)).collect();
        v[mine].copy_from_slice(&sums);
        let bytes = Arc::new(E::to_bytes(&sums));
        let sends = others()
            .map(|p| self.post(p, E::TAG_AG, bytes.clone()))
            .collect::<Result<Vec<_>>>()?;
        let got = (|| -> Result<()> {
            for r in others() {
                let p = self.recv_from(r, E::TAG_AG, deadline)?;
                let c = chunk(r);
                if p.len() != c.len() * w {
                    return Err(len_err(r, p.len(), c.len()));
                }
                E::from_bytes(&p, &mut v[c]);
            }
            Ok(())
        })();
        self.sent(sends, got)
    }

    /// Queues one frame for member `to` on its link's sending thread.
    fn post(
        &self,
        to: usize,
        tag: u8,
        payload: Arc<Vec<u8>>,
    ) -> Result<(usize, mpsc::Receiver<std::io::Result<()>>)> {
        let l = self.link(to)?;
        let (done, rx) = mpsc::channel();
        let queued = match &l.sender {
            Some(tx) => tx
                .lock()
                .map_err(lock_err)?
                .send((tag, payload, done))
                .is_ok(),
            None => false,
        };
        if !queued {
            return Err(self.fail(format!(
                "the link to {} has no sending thread",
                Self::who(to)
            )));
        }
        Ok((to, rx))
    }

    /// Waits until the frames `post`ed went out (a later frame on the same link, from
    /// another path, must not overtake them); the first error wins, the receiving side's
    /// (`got`) first.
    fn sent(
        &self,
        sends: Vec<(usize, mpsc::Receiver<std::io::Result<()>>)>,
        got: Result<()>,
    ) -> Result<()> {
        let mut first = got.err();
        for (to, rx) in sends {
            let r = match rx.recv() {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(self.write_failure(e, &Self::who(to))),
                Err(_) => Err(self.fail(format!(
                    "the sending thread of the link to {} ended",
                    Self::who(to)
                ))),
            };
            if let (None, Err(e)) = (&first, r) {
                first = Some(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Reads one frame of `tag` from member `from`; its failure fails the group.
    fn recv_from(&self, from: usize, tag: u8, deadline: Instant) -> Result<Vec<u8>> {
        let who = Self::who(from);
        let l = self.link(from)?;
        let r = read_frame(&mut *l.r.lock().map_err(lock_err)?, deadline);
        match r {
            Ok((t, p)) if t == tag => Ok(p),
            Ok((TAG_FAIL, why)) => {
                let why = String::from_utf8_lossy(&why);
                // (a member's own abort already says who failed, and a failure it passes
                // on says whose it was)
                Err(self.fail(if why.starts_with("member ") {
                    why.into_owned()
                } else {
                    format!("{who} failed: {why}")
                }))
            }
            Ok((t, _)) => Err(self.fail(format!("{who} sent frame {t}, expected {tag}"))),
            Err(f) => Err(self.read_failure(f, &who)),
        }
    }
}

/// A member that goes away closes its links at once: a mesh link's sending thread holds
/// a handle of its socket until it has seen the link dropped.
impl Drop for TcpMember {
    fn drop(&mut self) {
        for l in self.all_links() {
            let _ = l.raw.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// An element type a sum crosses the network in.
trait Wire: Copy + Default {
    const WIDTH: usize;
    /// The mesh's reduce-scatter and all-gather frames of this type.
    const TAG_RS: u8;
    const TAG_AG: u8;
    fn wide(self) -> f64;
    fn narrow(v: f64) -> Self;
    fn to_bytes(v: &[Self]) -> Vec<u8>;
    fn from_bytes(b: &[u8], out: &mut [Self]);
}

impl Wire for f64 {
    const WIDTH: usize = 8;
    const TAG_RS: u8 = TAG_RS64;
    const TAG_AG: u8 = TAG_AG64;
    fn wide(self) -> f64 {
        self
    }
    fn narrow(v: f64) -> Self {
        v
    }
    fn to_bytes(v: &[Self]) -> Vec<u8> {
        f64s_to_bytes(v)
    }
    fn from_bytes(b: &[u8], out: &mut [Self]) {
        bytes_to_f64s(b, out)
    }
}

impl Wire for f32 {
    const WIDTH: usize = 4;
    const TAG_RS: u8 = TAG_RS32;
    const TAG_AG: u8 = TAG_AG32;
    fn wide(self) -> f64 {
        self as f64
    }
    fn narrow(v: f64) -> Self {
        v as f32
    }
    fn to_bytes(v: &[Self]) -> Vec<u8> {
        let mut out = Vec::with_capacity(v.len() * 4);
        v.iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        out
    }
    fn from_bytes(b: &[u8], out: &mut [Self]) {
        for (x, c) in out.iter_mut().zip(b.chunks_exact(4)) {
            *x = f32::from_le_bytes(c.try_into().expect("4 bytes"));
        }
    }
}

impl Collective for TcpMember {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, v: &mut [f64]) -> candle_core::Result<()> {
        self.sum(v)
            .map_err(|e| candle_core::Error::Msg(format!("all-reduce: {e:#}")))
    }
    fn abort(&self, why: &str) {
        let _ = self.fail(format!("member {} failed: {why}", self.rank));
    }
    /// f32 tensors (the gradients) cross as f32, half the bytes of the f64 default, with
    /// the same result bits.
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        if t.dtype() != DType::F32 {
            return model::dist::reduce_on_host(&|v| self.all_reduce_sum(v), t);
        }
        let mut v: Vec<f32> = t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        self.sum_as::<f32>(&mut v, TAG_SUM32)
            .map_err(|e| candle_core::Error::Msg(format!("all-reduce: {e:#}")))?;
        Tensor::from_vec(v, t.dims(), &Device::Cpu)?.to_device(t.device())
    }
    fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::SeqCst)
    }
}

/// Appends tensors (any device: their types, shapes and values) to `out`, for
/// [`decode_tensors`].
pub fn encode_tensors(ts: &[&Tensor], out: &mut Vec<u8>) -> Result<()> {
    out.extend_from_slice(&(ts.len() as u64).to_le_bytes());
    for t in ts {
        let dims = t.dims().to_vec();
        let flat = t.to_device(&Device::Cpu)?.flatten_all()?;
        let tag: u8 = match t.dtype() {
            DType::F32 => 0,
            DType::F64 => 1,
            DType::BF16 => 2,
            DType::F16 => 3,
            DType::U8 => 4,
            DType::U32 => 5,
            DType::I64 => 6,
            d => bail!("cannot send a tensor of type {d:?}"),
        };
        out.push(tag);
        out.extend_from_slice(&(dims.len() as u64).to_le_bytes());
        for d in &dims {
            out.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        match tag {
            0 => flat
                .to_vec1::<f32>()?
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            1 => flat
                .to_vec1::<f64>()?
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            2 => flat
                .to_vec1::<half::bf16>()?
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            3 => flat
                .to_vec1::<half::f16>()?
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            4 => out.extend_from_slice(&flat.to_vec1::<u8>()?),
            5 => flat
                .to_vec1::<u32>()?
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            _ => flat
                .to_vec1::<i64>()?
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        }
    }
    Ok(())
}

/// The tensors [`encode_tensors`] wrote at the start of `b` (on the CPU), and the bytes
/// after them.
pub fn decode_tensors(b: &[u8]) -> Result<(Vec<Tensor>, &[u8])> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
        if b.len() < n {
            bail!(
                "a tensor message ends early ({} bytes left, {n} needed)",
                b.len()
            )
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Ok(h)
    }
    fn u64_(b: &mut &[u8]) -> Result<usize> {
        Ok(u64::from_le_bytes(take(b, 8)?.try_into().expect("8 bytes")) as usize)
    }
    let mut b = b;
    let n = u64_(&mut b)?;
    let mut out = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let tag = take(&mut b, 1)?[0];
        let nd = u64_(&mut b)?;
        if nd > 8 {
            bail!("a tensor of {nd} dimensions: not a dinod message")
        }
        let dims: Vec<usize> = (0..nd).map(|_| u64_(&mut b)).collect::<Result<_>>()?;
        let count: usize = dims.iter().product();
        let size = match tag {
            0 | 5 => 4,
            1 | 6 => 8,
            2 | 3 => 2,
            4 => 1,
            t => bail!("unknown tensor type {t}"),
        };
        let raw = take(&mut b, count.checked_mul(size).context("tensor too large")?)?;
        let dev = &Device::Cpu;
        fn le<T, const N: usize>(raw: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
            raw.chunks_exact(N)
                .map(|c| f(c.try_into().expect("N bytes")))
                .collect()
        }
        let t = match tag {
            0 => Tensor::from_vec(le(raw, f32::from_le_bytes), dims, dev)?,
            1 => Tensor::from_vec(le(raw, f64::from_le_bytes), dims, dev)?,
            2 => Tensor::from_vec(le(raw, half::bf16::from_le_bytes), dims, dev)?,
            3 => Tensor::from_vec(le(raw, half::f16::from_le_bytes), dims, dev)?,
            4 => Tensor::from_vec(raw.to_vec(), dims, dev)?,
            5 => Tensor::from_vec(le(raw, u32::from_le_bytes), dims, dev)?,
            _ => Tensor::from_vec(le(raw, i64::from_le_bytes), dims, dev)?,
        };
        out.push(t);
    }
    Ok((out, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::dist::ThreadGroup;

    fn id(hash: &str) -> Identity {
        Identity {
            code_version: "dinod test".into(),
            config_hash: hash.into(),
            device: "cpu".into(),
        }
    }

    /// `f(rank, member)` on every member at once, one thread each (collectives block
    /// until all members call); the results in rank order.
    fn on_each<T: Send>(
        members: &[&dyn Collective],
        f: impl Fn(usize, &dyn Collective) -> T + Sync,
    ) -> Vec<T> {
        std::thread::scope(|s| {
            let hs: Vec<_> = members
                .iter()
                .enumerate()
                .map(|(r, m)| {
                    let f = &f;
                    s.spawn(move || f(r, *m))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn dyns(members: &[TcpMember]) -> Vec<&dyn Collective> {
        members.iter().map(|m| m as &dyn Collective).collect()
    }

    fn token(dir: &std::path::Path, name: &str, text: &str) -> Token {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        Token::from_file(&p).unwrap()
    }

    /// A coordinator and `world - 1` workers on loopback, built on threads, in rank
    /// order; the coordinator's address comes back through a channel.
    fn group_of(world: usize, timeout: Duration) -> Vec<TcpMember> {
        group_by(world, timeout, Reduce::Mesh)
    }

    fn group_by(world: usize, timeout: Duration, reduce: Reduce) -> Vec<TcpMember> {
        group_listening(
            world,
            timeout,
            reduce,
            &vec![MeshAddr::default(); world - 1],
        )
    }

    /// [`group_by`], worker `i` (in the order of the calls, not of the ranks) with
    /// `mesh[i]`.
    fn group_listening(
        world: usize,
        timeout: Duration,
        reduce: Reduce,
        mesh: &[MeshAddr],
    ) -> Vec<TcpMember> {
        let tmp = tempfile::tempdir().unwrap();
        let tok = token(tmp.path(), "t", "a-token-of-twenty-chars\n");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let tok2 = tok.clone();
            let c = s.spawn(move || {
                listen(
                    "127.0.0.1:0",
                    world,
                    &id("h"),
                    &tok2,
                    Duration::from_secs(20),
                    timeout,
                    reduce,
                    |a| tx.send(a).unwrap(),
                )
                .unwrap()
            });
            let addr = rx.recv().unwrap().to_string();
            // (at once: in a mesh a worker's join returns when the group is complete)
            let ws: Vec<_> = mesh
                .iter()
                .map(|at| {
                    let (addr, tok, at) = (addr.clone(), tok.clone(), at.clone());
                    s.spawn(move || {
                        join(&addr, &id("h"), &tok, Duration::from_secs(20), timeout, &at).unwrap()
                    })
                })
                .collect();
            let mut all = vec![c.join().unwrap()];
            all.extend(ws.into_iter().map(|w| w.join().unwrap()));
            all.sort_by_key(|m| m.rank());
            all
        })
    }

    /// Sums over processes-to-be (threads on loopback here) are bit-identical to the
    /// thread group's, on every member.
    #[test]
    fn the_tcp_group_sums_what_the_thread_group_sums_bit_for_bit() {
        let world = 3;
        let members = group_of(world, Duration::from_secs(30));
        assert_eq!(
            members.iter().map(|m| m.rank()).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        let vecs: Vec<Vec<f64>> = (0..world)
            .map(|r| {
                (0..1000)
                    .map(|i| ((i * 7919 + r * 104729) % 1000) as f64 * 1e-3 + 1e-17 * r as f64)
                    .collect()
            })
            .collect();
        let sum3 = |r: usize, m: &dyn Collective| {
            let mut v = vecs[r].clone();
            for _ in 0..3 {
                m.all_reduce_sum(&mut v).unwrap();
            }
            v
        };
        let tcp = on_each(&dyns(&members), sum3);
        let tg = ThreadGroup::new(world);
        let tg: Vec<&dyn Collective> = tg.iter().map(|m| m as &dyn Collective).collect();
        let threads = on_each(&tg, sum3);
        for (r, got) in tcp.iter().enumerate() {
            assert!(
                got.iter()
                    .zip(&threads[0])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "member {r} differs from the thread group"
            );
        }
        // f32 tensors cross as f32 and come back with the bits of the thread group's
        // f64 round trip
        let ts: Vec<Tensor> = vecs
            .iter()
            .map(|v| {
                let v: Vec<f32> = v.iter().map(|x| (*x as f32) * 1.1 + 1e-7).collect();
                Tensor::from_vec(v, (10, 100), &Device::Cpu).unwrap()
            })
            .collect();
        let sum_tensor = |r: usize, m: &dyn Collective| -> Vec<u32> {
            let t = &ts[r];
            let out = m.all_reduce_sum_tensor(t).unwrap();
            assert_eq!((out.dtype(), out.dims()), (DType::F32, t.dims()));
            let v = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        let by_threads = on_each(&tg, sum_tensor);
        let by_tcp = on_each(&dyns(&members), sum_tensor);
        for (r, got) in by_tcp.iter().enumerate() {
            assert_eq!(got, &by_threads[0], "member {r}'s tensor sum");
        }
        // every link keeps itself alive (a vanished machine is found out while idle) and
        // bounds its unacknowledged data (... and while a message is in flight)
        let get = |l: &TcpStream, level: libc::c_int, name: libc::c_int| -> libc::c_int {
            let mut v: libc::c_int = 0;
            let mut n = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            use std::os::fd::AsRawFd;
            // SAFETY: an open socket, and a c_int-sized buffer with its size
            let r = unsafe {
                libc::getsockopt(
                    l.as_raw_fd(),
                    level,
                    name,
                    &mut v as *mut libc::c_int as *mut libc::c_void,
                    &mut n,
                )
            };
            assert_eq!(r, 0, "getsockopt {level} {name}");
            v
        };
        for m in &members {
            for l in m.all_links().map(|l| &l.raw) {
                assert_eq!(get(l, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
                #[cfg(target_os = "linux")]
                assert_eq!(
                    get(l, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
                    LINK_DEAD_AFTER.as_millis() as libc::c_int
                );
            }
        }
        // gather: every member sees every fingerprint in rank order
        let got = on_each(&dyns(&members), |r, _| {
            members[r].gather(&format!("fp{r}")).unwrap()
        });
        for g in got {
            assert_eq!(g, vec!["fp0", "fp1", "fp2"]);
        }
    }

    /// A mesh sums large vectors (split in uneven chunks, one per member) with the bits
    /// of a star and of the thread group, on every member and for groups of 2 to 4; the
    /// workers of a mesh hold links to each other and a star's hold none.
    #[test]
    fn a_mesh_sums_what_a_star_and_threads_sum_bit_for_bit() {
        // an odd length: the chunks differ in size
        let n = MESH_MIN_VALUES * 3 + 7;
        let vec_of = |r: usize| -> Vec<f64> {
            (0..n)
                .map(|i| {
                    let x = ((i * 7919 + r * 104729) % 100_003) as f64;
                    (x * 1e-3 - 50.0) * (1.0 + 1e-9 * r as f64) + 1e-17 * i as f64
                })
                .collect()
        };
        let sum = |r: usize, m: &dyn Collective| -> (Vec<u64>, Vec<u32>) {
            let mut v = vec_of(r);
            // twice: a second sum on the same links starts where the first ended
            m.all_reduce_sum(&mut v).unwrap();
            m.all_reduce_sum(&mut v).unwrap();
            let t: Vec<f32> = vec_of(r).iter().map(|x| *x as f32 * 0.37).collect();
            let t = Tensor::from_vec(t, (1, n), &Device::Cpu).unwrap();
            let t = m.all_reduce_sum_tensor(&t).unwrap();
            let t = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (
                v.iter().map(|x| x.to_bits()).collect(),
                t.iter().map(|x| x.to_bits()).collect(),
            )
        };
        for world in [2, 3, 4] {
            let tg = ThreadGroup::new(world);
            let tg: Vec<&dyn Collective> = tg.iter().map(|m| m as &dyn Collective).collect();
            let want = on_each(&tg, sum).swap_remove(0);
            for reduce in [Reduce::Mesh, Reduce::Star] {
                let members = group_by(world, Duration::from_secs(60), reduce);
                let peers = if reduce == Reduce::Mesh { world - 2 } else { 0 };
                for m in &members[1..] {
                    assert_eq!(m.peers.len(), peers, "{reduce:?} of {world}");
                }
                for (r, got) in on_each(&dyns(&members), sum).into_iter().enumerate() {
                    assert!(
                        got.0 == want.0,
                        "{reduce:?} of {world}: member {r}'s f64 sum"
                    );
                    assert!(
                        got.1 == want.1,
                        "{reduce:?} of {world}: member {r}'s f32 sum"
                    );
                }
            }
        }
    }

    /// The coordinator sees who comes late into the sums, each late member charged its
    /// own lateness whatever the order it reads them in: members 300 ms and 150 ms late
    /// are charged about that, the punctual one nearly nothing, in a star's small sums
    /// and in a mesh's large ones; taking the waits starts them again.
    #[test]
    fn the_coordinator_charges_each_member_its_own_lateness() {
        let late = |r: usize| Duration::from_millis([0, 0, 300, 150][r]);
        for (reduce, n) in [(Reduce::Star, 1000), (Reduce::Mesh, MESH_MIN_VALUES * 2)] {
            let members = group_by(4, Duration::from_secs(60), reduce);
            // (the admission's own frames are not sums)
            members[0].take_waits();
            on_each(&dyns(&members), |r, m| {
                std::thread::sleep(late(r));
                let mut v = vec![r as f64; n];
                m.all_reduce_sum(&mut v).unwrap();
                assert_eq!(v[n - 1], 6.0);
            });
            let w = members[0].take_waits();
            assert_eq!(w.len(), 4, "{reduce:?}");
            assert_eq!(w[0], Duration::ZERO, "{reduce:?}: its own entry");
            for r in [2, 3] {
                assert!(
                    w[r] >= late(r) - Duration::from_millis(50)
                        && w[r] < late(r) + Duration::from_millis(150),
                    "{reduce:?}: member {r}: {w:?}"
                );
            }
            assert!(w[1] < Duration::from_millis(100), "{reduce:?}: {w:?}");
            assert!(
                members[0].take_waits().iter().all(|d| d.is_zero()),
                "{reduce:?}: taken"
            );
        }
    }

    /// A member of a mesh that fails, or goes away, while the others sum a large vector
    /// fails their calls with the reason instead of hanging, and so does a member that
    /// sums a vector of another length.
    #[test]
    fn a_mesh_member_that_fails_or_goes_away_fails_the_others_sums() {
        let n = MESH_MIN_VALUES * 2;
        // member 2 aborts instead of summing
        let members = group_of(4, Duration::from_secs(60));
        let t0 = Instant::now();
        let errs = on_each(&dyns(&members), |r, m| {
            if r == 2 {
                m.abort("out of memory");
                return String::new();
            }
            let mut v = vec![1.0; n];
            m.all_reduce_sum(&mut v).unwrap_err().to_string()
        });
        assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
        for r in [0, 1, 3] {
            assert!(
                errs[r].contains("member 2 failed: out of memory")
                    || errs[r].contains("connection closed"),
                "member {r}: {}",
                errs[r]
            );
        }
        assert!(errs[0].contains("member 2"), "{}", errs[0]);
        // member 3's process ends (its links close) while the others sum
        let mut members = group_of(4, Duration::from_secs(60));
        drop(members.pop());
        let t0 = Instant::now();
        let errs = on_each(&dyns(&members), |_, m| {
            let mut v = vec![1.0; n];
            m.all_reduce_sum(&mut v).unwrap_err().to_string()
        });
        assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
        assert!(
            errs.iter()
                .any(|e| e.contains("member 3's connection closed")),
            "{errs:?}"
        );
        // a member that sums a vector of another length
        let members = group_of(3, Duration::from_secs(60));
        let errs = on_each(&dyns(&members), |r, m| {
            let mut v = vec![1.0; n + 3 * (r == 1) as usize];
            m.all_reduce_sum(&mut v).unwrap_err().to_string()
        });
        assert!(
            errs.iter().any(|e| e.contains("values of a chunk of")),
            "{errs:?}"
        );
        // and a member that never calls: the others time out
        let members = group_of(3, Duration::from_millis(400));
        let errs = on_each(&dyns(&members[..2]), |_, m| {
            let mut v = vec![1.0; n];
            m.all_reduce_sum(&mut v).unwrap_err().to_string()
        });
        assert!(errs.iter().any(|e| e.contains(TIMED_OUT)), "{errs:?}");
    }

    /// Workers told where to listen for the others (`--mesh-listen`: a fixed port for a
    /// firewall rule, on one address or on all) and what to announce (`--mesh-advertise`:
    /// a name here) are reached there; the values are parsed as IP or IP:PORT, and
    /// HOST:PORT.
    #[test]
    fn workers_listen_for_each_other_where_they_are_told() {
        assert_eq!(
            mesh_listen_addr("10.0.0.7").unwrap(),
            "10.0.0.7:0".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            mesh_listen_addr("0.0.0.0:7710").unwrap(),
            "0.0.0.0:7710".parse::<SocketAddr>().unwrap()
        );
        assert!(mesh_listen_addr("[::]:7710").unwrap().ip().is_unspecified());
        let e = mesh_listen_addr("node-3:7710").unwrap_err();
        assert!(e.contains("not IP or IP:PORT"), "{e}");
        assert_eq!(mesh_advertise_addr("node-3:7710").unwrap(), "node-3:7710");
        assert_eq!(mesh_advertise_addr("[::1]:7710").unwrap(), "[::1]:7710");
        for bad in ["node-3", ":7710", "node-3:0", "node-3:x"] {
            let e = mesh_advertise_addr(bad).unwrap_err();
            assert!(e.contains("not HOST:PORT"), "{bad}: {e}");
        }
        let free = || {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (p1, p2) = (free(), free());
        let at = vec![
            MeshAddr {
                listen: Some(format!("127.0.0.1:{p1}").parse().unwrap()),
                advertise: None,
            },
            // everywhere, announced by a name that the other worker resolves
            MeshAddr {
                listen: Some(format!("0.0.0.0:{p2}").parse().unwrap()),
                advertise: Some(format!("localhost:{p2}")),
            },
        ];
        let members = group_listening(3, Duration::from_secs(60), Reduce::Mesh, &at);
        // member 2 connected to member 1 at member 1's port
        let to_1 = members[2].link(1).unwrap().raw.peer_addr().unwrap();
        let at_1 = members[1].link(2).unwrap().raw.local_addr().unwrap();
        assert_eq!(to_1, at_1);
        assert!(
            [p1, p2].contains(&at_1.port()),
            "{at_1} is neither {p1} nor {p2}"
        );
        assert_eq!(at_1.ip().to_string(), "127.0.0.1");
        let n = MESH_MIN_VALUES + 1;
        let sums = on_each(&dyns(&members), |r, m| {
            let mut v = vec![r as f64 + 0.5; n];
            m.all_reduce_sum(&mut v).unwrap();
            v
        });
        for v in sums {
            assert!(v.iter().all(|x| *x == 0.5 + 1.5 + 2.5));
        }
    }

    /// An admission of 4 nodes that settles for 3 after 1.5 s.
    fn three_of_four(
        l: &TcpListener,
        tok: &Token,
        reduce: Reduce,
        on_change: &dyn Fn(&GroupStatus),
    ) -> Result<TcpMember> {
        let size = GroupSize {
            nodes: 4,
            fewest: 3,
        };
        let (wait, timeout) = (Duration::from_millis(1500), Duration::from_secs(30));
        admit_group(
            l,
            size,
            None,
            &id("h"),
            tok,
            wait,
            timeout,
            reduce,
            on_change,
            &|| false,
        )
    }

    /// `runtime.cluster.min_nodes`: an admission that waited its time out forms the group
    /// with the nodes that came when they are enough, and tells the workers its size (a
    /// mesh's roster has only them), and fails as before when they are not. A node vetted
    /// before the admission (a worker back to a short group) is admitted first; a
    /// connection that proves nothing is refused by the vetting.
    #[test]
    fn a_group_forms_with_the_nodes_that_came_when_they_are_enough() {
        let tmp = tempfile::tempdir().unwrap();
        let tok = token(tmp.path(), "t", "a-token-of-twenty-chars\n");
        for reduce in [Reduce::Mesh, Reduce::Star] {
            let l = bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap().to_string();
            let lines = Mutex::new(vec![]);
            let (m0, workers) = std::thread::scope(|s| {
                let c = s.spawn(|| {
                    three_of_four(&l, &tok, reduce, &|st| {
                        lines.lock().unwrap().push((st.nodes, st.line.clone()))
                    })
                    .unwrap()
                });
                let w = Duration::from_secs(20);
                let ws: Vec<_> = (0..2)
                    .map(|_| {
                        let addr = addr.clone();
                        let tok = &tok;
                        s.spawn(move || {
                            // (a GPU node: its device shows in the coordinator's lines)
                            let me = Identity {
                                device: "cuda:1".into(),
                                ..id("h")
                            };
                            join(&addr, &me, tok, w, w, &MeshAddr::default()).unwrap()
                        })
                    })
                    .collect();
                let ws: Vec<TcpMember> = ws.into_iter().map(|h| h.join().unwrap()).collect();
                (c.join().unwrap(), ws)
            });
            assert_eq!(m0.world(), 3, "{reduce:?}");
            for w in &workers {
                assert_eq!(w.world(), 3, "{reduce:?}");
                assert_eq!(w.peers.len(), if reduce == Reduce::Mesh { 1 } else { 0 });
            }
            let (nodes, line) = lines.lock().unwrap().last().cloned().unwrap();
            assert_eq!(nodes, 3, "{reduce:?}");
            assert!(line.starts_with("3 of 4 nodes on "), "{line}");
            assert!(line.contains("min_nodes = 3"), "{line}");
            assert!(line.contains("as rank 2 on cuda:1"), "{line}");
            // the three sum as a group of three, a mesh's large sums included
            let mut all = vec![m0];
            all.extend(workers);
            for n in [10, MESH_MIN_VALUES + 3] {
                on_each(&dyns(&all), |r, m| {
                    let mut v = vec![r as f64 + 1.0; n];
                    m.all_reduce_sum(&mut v).unwrap();
                    assert!(v.iter().all(|x| *x == 6.0), "{reduce:?}: {n}");
                });
            }
        }

        // too few: the admission fails as without min_nodes
        let l = bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::scope(|s| {
            let tok = &tok;
            let addr = &addr;
            let w = s.spawn(move || {
                let w = Duration::from_secs(5);
                join(addr, &id("h"), tok, w, w, &MeshAddr::default())
            });
            let e = three_of_four(&l, tok, Reduce::Star, &|_| {}).err().unwrap();
            assert!(
                format!("{e:#}").contains("2 of 4 nodes joined within"),
                "{e:#}"
            );
            // its worker hears that the group failed, and would join again
            let we = w.join().unwrap().err().unwrap();
            assert!(we.downcast_ref::<GroupFailed>().is_some(), "{we:#}");
        });

        // a node vetted before the admission is its first node; a stranger that closes at
        // once is refused by the vetting (nothing would be formed for it)
        let l = bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(TcpStream::connect(l.local_addr().unwrap()).unwrap());
        let t0 = Instant::now();
        let stranger = loop {
            match vet_waiting(&l, &id("h"), &tok) {
                Some(r) => break r,
                None if t0.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                None => panic!("nothing waited"),
            }
        };
        assert!(stranger.is_err());
        std::thread::scope(|s| {
            let tok = &tok;
            let addr = &addr;
            let w = s.spawn(move || {
                let w = Duration::from_secs(20);
                join(addr, &id("h"), tok, w, w, &MeshAddr::default()).unwrap()
            });
            let t0 = Instant::now();
            let back = loop {
                match vet_waiting(&l, &id("h"), tok) {
                    Some(Ok(v)) => break v,
                    Some(Err((_, why))) => panic!("{why}"),
                    None if t0.elapsed() < Duration::from_secs(10) => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    None => panic!("nothing waited"),
                }
            };
            let m0 = admit_group(
                &l,
                2.into(),
                Some(back),
                &id("h"),
                tok,
                Duration::from_secs(20),
                Duration::from_secs(30),
                Reduce::Mesh,
                &|_| {},
                &|| false,
            )
            .unwrap();
            let m1 = w.join().unwrap();
            assert_eq!((m0.world(), m1.rank(), m1.world()), (2, 1, 2));
        });
    }

    /// A worker that cannot listen where it is told (a port in use) ends with the reason,
    /// which the coordinator hears and shows; the coordinator goes on waiting, and admits
    /// the workers that come after it.
    #[test]
    fn a_worker_that_cannot_listen_for_the_others_ends_and_the_coordinator_says_why() {
        let tmp = tempfile::tempdir().unwrap();
        let tok = token(tmp.path(), "t", "a-token-of-twenty-chars\n");
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = taken.local_addr().unwrap();
        let l = bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let lines = Mutex::new(vec![]);
        std::thread::scope(|s| {
            let c = s.spawn(|| {
                admit_group(
                    &l,
                    3.into(),
                    None,
                    &id("h"),
                    &tok,
                    Duration::from_secs(30),
                    Duration::from_secs(30),
                    Reduce::Mesh,
                    &|st| lines.lock().unwrap().push(st.line.clone()),
                    &|| false,
                )
                .unwrap()
            });
            let w = Duration::from_secs(20);
            let at = MeshAddr {
                listen: Some(busy),
                advertise: None,
            };
            let e = join(&addr, &id("h"), &tok, w, w, &at).err().unwrap();
            // (not the group's failure, after which a worker joins again: it ends)
            assert!(e.downcast_ref::<GroupFailed>().is_none(), "{e:#}");
            let e = format!("{e:#}");
            assert!(e.contains(&format!("cannot listen on {busy}")), "{e}");
            let (addr, tok) = (&addr, &tok);
            let ws: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(move || join(addr, &id("h"), tok, w, w, &MeshAddr::default()).unwrap())
                })
                .collect();
            let c = c.join().unwrap();
            assert_eq!(c.world(), 3);
            for w in ws {
                assert_eq!(w.join().unwrap().peers.len(), 1);
            }
        });
        let lines = lines.into_inner().unwrap();
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("cannot listen on {busy} for the other workers"))),
            "{lines:?}"
        );
        drop(taken);
    }

    /// A worker's links to the other workers: one it cannot reach is an error that names
    /// it and its address; on its own port it refuses a connection without the group's
    /// proof (or with another link's), and keeps waiting for the member it lacks.
    #[test]
    fn the_workers_links_need_the_groups_proof_and_unreachable_ones_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let tok = token(tmp.path(), "t", "a-token-of-twenty-chars\n");
        let nonce = blake3::hash(b"a group");
        // nobody listens at member 1's address
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let gone = closed.local_addr().unwrap().to_string();
        drop(closed);
        let roster = Roster {
            nonce: nonce.to_hex().to_string(),
            addrs: vec![gone.clone(), "127.0.0.1:9".into()],
            world: 3,
        };
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let e = connect_peers(&l, &roster, 2, 3, &tok).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains(&format!("cannot connect to member 1 at {gone}")),
            "{e}"
        );

        // member 1 of 3 waits for member 2: an intruder, a replayed proof of another
        // link, then member 2
        let at = l.local_addr().unwrap();
        let roster = Roster {
            nonce: nonce.to_hex().to_string(),
            addrs: vec![at.to_string(), "127.0.0.1:9".into()],
            world: 3,
        };
        std::thread::scope(|s| {
            let h = s.spawn(|| connect_peers(&l, &roster, 1, 3, &tok));
            let hello = |rank: usize, proof: blake3::Hash| {
                let mut c = TcpStream::connect(at).unwrap();
                let b = serde_json::to_vec(&PeerHello {
                    rank,
                    proof: proof.to_hex().to_string(),
                })
                .unwrap();
                write_frame(&mut c, TAG_PEER_HELLO, &b).unwrap();
                c
            };
            let _intruder = hello(2, blake3::hash(b"guess"));
            // (the proof of the link from 2 to 3, not to 1)
            let _replay = hello(2, peer_proof(&tok, nonce.as_bytes(), 2, 3));
            let other = token(tmp.path(), "o", "another-token-of-20-chars\n");
            let _other_group = hello(2, peer_proof(&other, nonce.as_bytes(), 2, 1));
            let _member2 = hello(2, peer_proof(&tok, nonce.as_bytes(), 2, 1));
            let links = h.join().unwrap().unwrap();
            assert_eq!(links.len(), 1);
            assert_eq!(links[0].0, 2);
            // the accepted link is member 2's (the fourth connection)
            assert_eq!(
                links[0].1.peer_addr().unwrap(),
                _member2.local_addr().unwrap()
            );
        });
    }

    /// Tensors of every type a step sends cross as they were; a cut message is an error.
    #[test]
    fn tensors_cross_with_their_types_shapes_and_values() {
        let dev = &Device::Cpu;
        let f = Tensor::arange(0f32, 24f32, dev)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let b = f.to_dtype(DType::BF16).unwrap();
        let u = Tensor::from_vec(vec![0u8, 1, 1, 0, 1], 5, dev).unwrap();
        let d = Tensor::from_vec(vec![1e-300f64, -2.5], (1, 2), dev).unwrap();
        let mut out = vec![];
        encode_tensors(&[&f, &b, &u, &d], &mut out).unwrap();
        out.extend_from_slice(b"tail");
        let (got, rest) = decode_tensors(&out).unwrap();
        assert_eq!(rest, b"tail");
        assert_eq!(got.len(), 4);
        for (a, b) in [&f, &b, &u, &d].iter().zip(&got) {
            assert_eq!((a.dtype(), a.dims()), (b.dtype(), b.dims()));
            let (x, y) = (
                a.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap(),
                b.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap(),
            );
            assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()));
        }
        let e = decode_tensors(&out[..out.len() - 20])
            .unwrap_err()
            .to_string();
        assert!(e.contains("ends early"), "{e}");
    }

    /// A member that aborts, a member that goes away and a member that never calls:
    /// every other member's call fails with the reason instead of waiting.
    #[test]
    fn a_failed_gone_or_silent_member_fails_the_others_calls() {
        // abort by a worker: the coordinator and the other worker hear why
        let members = group_of(3, Duration::from_secs(60));
        let t0 = Instant::now();
        let errs = on_each(&dyns(&members), |r, m| {
            if r == 2 {
                m.abort("out of memory");
                return "aborted".to_string();
            }
            let mut v = vec![1.0; 4];
            m.all_reduce_sum(&mut v).unwrap_err().to_string()
        });
        assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
        assert!(
            errs[0].contains("member 2 failed: out of memory"),
            "{}",
            errs[0]
        );
        assert!(
            errs[1].contains("member 2 failed: out of memory"),
            "{}",
            errs[1]
        );
        // and every later call fails at once
        let mut v = vec![1.0];
        assert!(members[0].all_reduce_sum(&mut v).is_err());

        // a worker whose connection closes (its process ended)
        let mut members = group_of(2, Duration::from_secs(60));
        let worker = members.pop().unwrap();
        drop(worker);
        let t0 = Instant::now();
        let e = members[0]
            .all_reduce_sum(&mut [1.0])
            .unwrap_err()
            .to_string();
        assert!(t0.elapsed() < Duration::from_secs(20));
        assert!(e.contains("member 1's connection closed"), "{e}");
        assert!(!members[0].timed_out());

        // the coordinator goes away
        let mut members = group_of(2, Duration::from_secs(60));
        let worker = members.pop().unwrap();
        drop(members);
        let e = worker.all_reduce_sum(&mut [1.0]).unwrap_err().to_string();
        assert!(e.contains("the coordinator's connection closed"), "{e}");

        // a worker that is there but never calls: the coordinator times out
        let members = group_of(2, Duration::from_millis(300));
        let t0 = Instant::now();
        let e = members[0]
            .all_reduce_sum(&mut [1.0])
            .unwrap_err()
            .to_string();
        assert!(t0.elapsed() >= Duration::from_millis(300));
        assert!(e.contains(TIMED_OUT) && e.contains("member 1"), "{e}");
        assert!(members[0].timed_out());
        // the worker's next call hears of it instead of waiting
        let e = members[1]
            .all_reduce_sum(&mut [1.0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("aborted") && e.contains(TIMED_OUT), "{e}");

        // vectors of different lengths are an error on every member
        let members = group_of(2, Duration::from_secs(60));
        let errs = on_each(&dyns(&members), |r, m| {
            let mut v = vec![1.0; 3 + r];
            m.all_reduce_sum(&mut v).unwrap_err().to_string()
        });
        for e in errs {
            assert!(e.contains("member 1 sent 4 values to a sum of 3"), "{e}");
        }
    }

    /// The coordinator refuses a wrong token, another recipe and another build with the
    /// reason (the node hears it too), keeps waiting, and admits a right node after them;
    /// with nobody coming it gives up after its wait.
    #[test]
    fn admission_refuses_wrong_tokens_recipes_and_builds_with_the_reason() {
        // (removed when the test ends, passed or not)
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let tok = token(&dir, "good", "the-right-token-123");
        let bad = token(&dir, "bad", "the-wrong-token-456");
        {
            use std::os::unix::fs::PermissionsExt;
            let good = dir.join("good");
            std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o644)).unwrap();
            let w = Token::permission_warning(&good).unwrap();
            assert!(w.contains("mode 644") && w.contains("chmod 600"), "{w}");
            std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o600)).unwrap();
            assert_eq!(Token::permission_warning(&good), None);
        }
        let p = dir.join("short");
        std::fs::write(&p, "short\n").unwrap();
        let e = Token::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("at least 16"), "{e}");

        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let tok2 = tok.clone();
            let c = s.spawn(move || {
                listen(
                    "127.0.0.1:0",
                    2,
                    &id("h"),
                    &tok2,
                    Duration::from_secs(30),
                    Duration::from_secs(30),
                    Reduce::Mesh,
                    |a| tx.send(a).unwrap(),
                )
            });
            let addr = rx.recv().unwrap().to_string();
            let w = Duration::from_secs(10);
            let e = join(&addr, &id("h"), &bad, w, w, &MeshAddr::default())
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("refused this node: wrong cluster token"), "{e}");
            let e = join(&addr, &id("other"), &tok, w, w, &MeshAddr::default())
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("its recipe differs"), "{e}");
            let mut other_build = id("h");
            other_build.code_version = "dinod 9.9.9".into();
            let e = join(&addr, &other_build, &tok, w, w, &MeshAddr::default())
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("runs dinod 9.9.9"), "{e}");
            let ok = join(&addr, &id("h"), &tok, w, w, &MeshAddr::default()).unwrap();
            assert_eq!((ok.rank(), ok.world()), (1, 2));
            let c = c.join().unwrap().unwrap();
            assert_eq!((c.rank(), c.world()), (0, 2));
        });

        let t0 = Instant::now();
        let e = listen(
            "127.0.0.1:0",
            3,
            &id("h"),
            &tok,
            Duration::from_millis(300),
            Duration::from_secs(1),
            Reduce::Mesh,
            |_| {},
        )
        .err()
        .unwrap()
        .to_string();
        assert!(t0.elapsed() >= Duration::from_millis(300));
        assert!(e.contains("1 of 3 nodes joined"), "{e}");
        let e = join(
            "127.0.0.1:1",
            &id("h"),
            &tok,
            Duration::from_millis(300),
            Duration::from_secs(1),
            &MeshAddr::default(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("no coordinator admitted this node"), "{e}");
    }
}
