//! Data parallelism: which rank this process is, and the collectives between ranks, behind one
//! small trait with two implementations. NCCL on CUDA builds (through cudarc, NCCL loaded at run
//! time); on the CPU, burn-collective 0.21 (Burn's own collectives: ranks are nodes that reduce
//! over websockets, meeting at an orchestrator that rank 0 serves).
//!
//! Everything the training loop needs is built on two operations with one contract: the result
//! is the same on every rank, bit for bit, and does not depend on timing. `all_gather` is exact by
//! nature; `reduce_scatter` sums in rank order on the CPU (NCCL's ring order is fixed for a
//! given world and topology).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[cfg(feature = "cuda")]
mod nccl;
mod websocket;

/// Where this process stands among the step's ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ranks {
    /// 0 ≤ rank < world.
    pub rank: usize,
    pub world: usize,
    /// The rank's index on its host: its GPU.
    pub local_rank: usize,
    /// One launch of the step's ranks, unique among launches (rendezvous files are named by it, so
    /// that a killed launch's files are never read by the next).
    pub session: String,
}

impl Default for Ranks {
    fn default() -> Self {
        Ranks::solo()
    }
}

impl Ranks {
    /// One process, no peers.
    pub fn solo() -> Ranks {
        Ranks {
            rank: 0,
            world: 1,
            local_rank: 0,
            session: String::new(),
        }
    }

    /// The GPU this rank drives: its local rank, or 0 when the launcher already narrowed
    /// `CUDA_VISIBLE_DEVICES` to one device per task (Slurm's `--gpus-per-task=1`).
    pub fn device_ordinal(&self) -> usize {
        match std::env::var("CUDA_VISIBLE_DEVICES") {
            Ok(v) if !v.is_empty() && !v.contains(',') => 0,
            _ => self.local_rank,
        }
    }

    /// The first rank: the one that writes the step's output and shared checkpoint files.
    pub fn is_first(&self) -> bool {
        self.rank == 0
    }
}

/// Why a collective failed. A peer that died usually shows as the launcher stopping this process
/// (or the watchdog ending it), not as an error here.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("rank {rank}: the collective library failed: {message}")]
    Library { rank: usize, message: String },
    #[error(
        "rank {rank}: waited {waited_s} s for {what} in {dir}: rank 0 never published it (did it start?)"
    )]
    Rendezvous {
        rank: usize,
        what: &'static str,
        dir: PathBuf,
        waited_s: u64,
    },
    #[error("rank {rank}: {path}: {source}")]
    Io {
        rank: usize,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "DISTILLERY_COLLECTIVE=nccl, but this build has no CUDA (world {world}): build with --features cuda, or unset it"
    )]
    Unsupported { world: usize },
}

/// Contiguous equal shards of `n` elements over `world` ranks (the last ones shorter, maybe
/// empty): shard `r` is `[r·size, min((r+1)·size, n))` with `size = ⌈n / world⌉`. Equal sizes are
/// what NCCL's reduce-scatter and all-gather take; the tail is padded with zeros there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shards {
    pub n: usize,
    pub world: usize,
}

impl Shards {
    pub fn new(n: usize, world: usize) -> Shards {
        Shards {
            n,
            world: world.max(1),
        }
    }

    /// The padded shard length `⌈n / world⌉`.
    pub fn size(&self) -> usize {
        self.n.div_ceil(self.world)
    }

    pub fn range(&self, rank: usize) -> std::ops::Range<usize> {
        let s = self.size();
        (rank * s).min(self.n)..((rank + 1) * s).min(self.n)
    }
}

/// The collectives between the ranks of one step. Every rank calls the same operations in the
/// same order with the same lengths.
pub trait Collective: Send + Sync {
    fn ranks(&self) -> &Ranks;

    /// Every rank's `mine` (the same length on every rank), concatenated in rank order:
    /// `[world · mine.len()]`, identical on every rank.
    fn all_gather(&self, mine: &[f32]) -> Result<Vec<f32>, CollectiveError>;

    /// The sum over ranks of `full` (`[shards.n]` on every rank), this rank's shard of it only:
    /// `[shards.range(rank).len()]`.
    fn reduce_scatter(&self, full: &[f32], shards: Shards) -> Result<Vec<f32>, CollectiveError>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), CollectiveError> {
        self.all_gather(&[0.0]).map(|_| ())
    }

    /// Whether this is [`Solo`]: one rank, whose collectives are the identity and can be skipped.
    fn is_solo(&self) -> bool {
        false
    }

    /// [`Collective::barrier`], with no time limit: for the ranks waiting while the first one
    /// works alone (validation, writing a checkpoint). A rank that dies meanwhile is still seen
    /// by the launcher.
    fn wait_for_all(&self) -> Result<(), CollectiveError> {
        self.barrier()
    }

    /// Every rank's shard (`[shards.range(rank).len()]`), put back together: `[shards.n]`.
    fn gather_shards(&self, mine: &[f32], shards: Shards) -> Result<Vec<f32>, CollectiveError> {
        let mut padded = mine.to_vec();
        padded.resize(shards.size(), 0.0);
        let mut all = self.all_gather(&padded)?;
        all.truncate(shards.n);
        Ok(all)
    }
}

/// One rank alone: every collective is the identity.
pub struct Solo(Ranks);

impl Solo {
    pub fn new() -> Solo {
        Solo(Ranks::solo())
    }
}

impl Default for Solo {
    fn default() -> Self {
        Solo::new()
    }
}

impl Collective for Solo {
    fn ranks(&self) -> &Ranks {
        &self.0
    }
    fn is_solo(&self) -> bool {
        true
    }
    fn all_gather(&self, mine: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        Ok(mine.to_vec())
    }
    fn reduce_scatter(&self, full: &[f32], _: Shards) -> Result<Vec<f32>, CollectiveError> {
        Ok(full.to_vec())
    }
}

/// The exit code of a rank that stopped because it lost its peers (a collective failed or waited
/// too long): the launcher names another rank as the cause when one failed otherwise.
pub const PEERS_LOST_EXIT: i32 = 7;

/// Seconds a collective may wait for the other ranks before this rank gives up
/// (`DISTILLERY_COLLECTIVE_TIMEOUT`, default 600): a rank that hangs (a deadlock, a stuck device,
/// a lost node the launcher does not see) stops the step in bounded time.
pub fn collective_timeout() -> Duration {
    Duration::from_secs(
        std::env::var("DISTILLERY_COLLECTIVE_TIMEOUT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(600),
    )
}

/// Connects this process to its peers: [`Solo`] for one rank, else NCCL on CUDA builds and
/// burn-collective elsewhere. `DISTILLERY_COLLECTIVE` names the library instead: `websocket` (a
/// CUDA machine without NCCL) or `nccl`; named, it serves even one rank (to check it works). Rendezvous files
/// go in `dir/parallel/SESSION/` (the step's scratch directory, shared by all ranks' hosts).
/// Every collective is watched: one that waits longer than [`collective_timeout`] ends the
/// process with [`PEERS_LOST_EXIT`] and a message naming the rank.
pub fn connect(ranks: &Ranks, dir: &Path) -> Result<Arc<dyn Collective>, CollectiveError> {
    let choice = std::env::var("DISTILLERY_COLLECTIVE").unwrap_or_default();
    let nccl = match choice.as_str() {
        "" => cfg!(feature = "cuda"),
        "nccl" => true,
        "websocket" => false,
        other => {
            return Err(CollectiveError::Library {
                rank: ranks.rank,
                message: format!(
                    "DISTILLERY_COLLECTIVE=`{other}`: say `nccl` or `websocket`, or unset it"
                ),
            });
        }
    };
    if ranks.world <= 1 && choice.is_empty() {
        return Ok(Arc::new(Solo::new()));
    }
    let meeting = dir.join("parallel").join(&ranks.session);
    std::fs::create_dir_all(&meeting).map_err(|source| CollectiveError::Io {
        rank: ranks.rank,
        path: meeting.clone(),
        source,
    })?;
    // Joining is timed too: NCCL's own has no limit.
    let watchdog = Watchdog::start(ranks, collective_timeout());
    let inner: Box<dyn Collective> = if nccl {
        #[cfg(feature = "cuda")]
        {
            Box::new(watchdog.timed(|| nccl::Nccl::connect(ranks, &meeting))?)
        }
        #[cfg(not(feature = "cuda"))]
        {
            return Err(CollectiveError::Unsupported { world: ranks.world });
        }
    } else {
        Box::new(watchdog.timed(|| websocket::Websocket::connect(ranks, &meeting))?)
    };
    Ok(Arc::new(Watched { inner, watchdog }))
}

/// Publishes `bytes` as `dir/name` atomically (written beside, then renamed), for the other ranks
/// to [`await_file`].
pub(crate) fn publish(
    ranks: &Ranks,
    dir: &Path,
    name: &str,
    bytes: &[u8],
) -> Result<(), CollectiveError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let io = |source| CollectiveError::Io {
        rank: ranks.rank,
        path: path.clone(),
        source,
    };
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

/// Waits for `dir/name`, up to [`collective_timeout`] (ranks reach this point after loading their
/// models, which takes long and varies).
pub(crate) fn await_file(
    ranks: &Ranks,
    dir: &Path,
    name: &'static str,
) -> Result<Vec<u8>, CollectiveError> {
    let path = dir.join(name);
    let t0 = Instant::now();
    let limit = collective_timeout();
    loop {
        match std::fs::read(&path) {
            Ok(b) => return Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && t0.elapsed() < limit => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CollectiveError::Rendezvous {
                    rank: ranks.rank,
                    what: name,
                    dir: dir.to_path_buf(),
                    waited_s: limit.as_secs(),
                });
            }
            Err(source) => {
                return Err(CollectiveError::Io {
                    rank: ranks.rank,
                    path,
                    source,
                });
            }
        }
    }
}

/// The host name the other ranks reach this one at: `DISTILLERY_COLLECTIVE_HOST` (the local
/// launcher sets 127.0.0.1), else this host's name.
pub(crate) fn reachable_host() -> String {
    std::env::var("DISTILLERY_COLLECTIVE_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| {
            let mut buf = [0u8; 256];
            // SAFETY: gethostname writes at most buf.len() bytes into buf.
            let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
            if r != 0 {
                return "localhost".into();
            }
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).into_owned()
        })
}

/// A port free at the time of asking (bound, then released).
pub(crate) fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("0.0.0.0", 0))?
        .local_addr()?
        .port())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A watchdog thread ending the process with [`PEERS_LOST_EXIT`] when a timed call waits longer
/// than its limit.
struct Watchdog {
    /// When the call in progress began (ms since the epoch), 0 when none is.
    since: Arc<AtomicU64>,
}

impl Watchdog {
    fn start(ranks: &Ranks, timeout: Duration) -> Watchdog {
        let since = Arc::new(AtomicU64::new(0));
        let watched = since.clone();
        let ranks = ranks.clone();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(500));
                let s = watched.load(Ordering::Relaxed);
                if s != 0 && now_ms().saturating_sub(s) > timeout.as_millis() as u64 {
                    eprintln!(
                        "error: rank {} of {} on {}: a collective waited more than {} s for the other ranks: one of them hung or died; stopping (DISTILLERY_COLLECTIVE_TIMEOUT sets the limit)",
                        ranks.rank,
                        ranks.world,
                        reachable_host(),
                        timeout.as_secs()
                    );
                    // SAFETY: _exit ends the process without running exit handlers, which a
                    // collective stuck in a device call could block.
                    unsafe { libc::_exit(PEERS_LOST_EXIT) };
                }
            }
        });
        Watchdog { since }
    }

    fn timed<T>(&self, f: impl FnOnce() -> T) -> T {
        self.since.store(now_ms(), Ordering::Relaxed);
        let out = f();
        self.since.store(0, Ordering::Relaxed);
        out
    }
}

/// A collective whose every call but [`Collective::wait_for_all`] is timed by a watchdog.
struct Watched {
    inner: Box<dyn Collective>,
    watchdog: Watchdog,
}

impl Collective for Watched {
    fn ranks(&self) -> &Ranks {
        self.inner.ranks()
    }
    fn all_gather(&self, mine: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        self.watchdog.timed(|| self.inner.all_gather(mine))
    }
    fn reduce_scatter(&self, full: &[f32], shards: Shards) -> Result<Vec<f32>, CollectiveError> {
        self.watchdog
            .timed(|| self.inner.reduce_scatter(full, shards))
    }
    fn wait_for_all(&self) -> Result<(), CollectiveError> {
        self.inner.barrier()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_element_once() {
        for (n, w) in [(10, 3), (9, 3), (2, 3), (0, 2), (7, 1)] {
            let s = Shards::new(n, w);
            let mut next = 0;
            for r in 0..w {
                let range = s.range(r);
                assert_eq!(range.start, next, "n {n} world {w} rank {r}");
                assert!(range.len() <= s.size());
                next = range.end;
            }
            assert_eq!(next, n);
        }
    }
}
