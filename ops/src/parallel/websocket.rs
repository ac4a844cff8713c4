//! The CPU collective: burn-collective 0.21's global level, one node per rank, one peer per node.
//! Rank 0 serves the orchestrator (burn-collective's rendezvous service) on a free port and
//! publishes its address; every rank serves its tensor data on a port of its own.
//!
//! burn-collective's all-reduce sums in an order set by which node registered first, so it is
//! used only where order cannot matter: an all-gather is an all-reduce of a buffer that is `-0.0`
//! everywhere but the caller's slot (x + -0.0 = x exactly, for every x), and a reduce-scatter is
//! one all-gather per shard owner, summed by the owner in rank order.

use std::path::Path;

use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_collective::{AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation};

use super::{
    Collective, CollectiveError, Ranks, Shards, await_file, free_port, publish, reachable_host,
};
use crate::runtime::{Backend as B, Device};

/// Keeps burn-communication's per-transfer INFO lines out of the rank's log (they would bury the
/// lines a failure shows): its own subscriber is installed only when none is, so this one, with
/// warnings and errors on stderr, comes first.
fn quiet_transfer_logs() {
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .finish();
    // Already set (a second connection in this process): nothing to do.
    let _ = tracing::subscriber::set_global_default(subscriber);
}

pub(super) struct Websocket {
    ranks: Ranks,
    device: Device,
}

impl Websocket {
    /// Registers this rank with its peers; returns once all `world` ranks have.
    pub(super) fn connect(ranks: &Ranks, meeting: &Path) -> Result<Websocket, CollectiveError> {
        let lib = |message: String| CollectiveError::Library {
            rank: ranks.rank,
            message,
        };
        let io = |source| CollectiveError::Io {
            rank: ranks.rank,
            path: meeting.to_path_buf(),
            source,
        };
        quiet_transfer_logs();
        let host = reachable_host();
        if ranks.is_first() {
            let port = free_port().map_err(io)?;
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime for the collective orchestrator");
                runtime.block_on(burn_collective::start_global_orchestrator(port));
                // It returns when it caught SIGINT or SIGTERM, which were meant for this process.
                std::process::exit(143);
            });
            publish(
                ranks,
                meeting,
                "orchestrator",
                format!("ws://{host}:{port}").as_bytes(),
            )?;
        }
        let orchestrator = String::from_utf8_lossy(&await_file(ranks, meeting, "orchestrator")?)
            .trim()
            .to_string();
        let port = free_port().map_err(io)?;
        let config = CollectiveConfig::default()
            .with_num_devices(1)
            .with_num_nodes(ranks.world as u32)
            .with_global_address(orchestrator.parse().map_err(lib)?)
            .with_node_address(format!("ws://{host}:{port}").parse().map_err(lib)?)
            .with_data_service_port(port)
            .with_global_all_reduce_strategy(AllReduceStrategy::Ring);
        let device = crate::runtime::device();
        // The device is Copy on the CPU backend only.
        #[allow(clippy::clone_on_copy)]
        burn_collective::register::<B>(PeerId::from(ranks.rank as u32), device.clone(), config)
            .map_err(|e| {
                lib(format!(
                    "registering with the orchestrator at {orchestrator}: {e:?}"
                ))
            })?;
        Ok(Websocket {
            ranks: ranks.clone(),
            device,
        })
    }
}

impl Collective for Websocket {
    fn ranks(&self) -> &Ranks {
        &self.ranks
    }

    fn all_gather(&self, mine: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        let (len, world) = (mine.len(), self.ranks.world);
        let mut buf = vec![-0.0f32; world * len];
        buf[self.ranks.rank * len..(self.ranks.rank + 1) * len].copy_from_slice(mine);
        let t = Tensor::<B, 1>::from_data(TensorData::new(buf, [world * len]), &self.device);
        let summed = burn_collective::all_reduce::<B>(
            PeerId::from(self.ranks.rank as u32),
            t.into_primitive().tensor(),
            ReduceOperation::Sum,
        )
        .map_err(|e| CollectiveError::Library {
            rank: self.ranks.rank,
            message: format!("all-reduce: {e:?}"),
        })?;
        Ok(
            Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(summed))
                .into_data()
                .to_vec::<f32>()
                .expect("f32 data"),
        )
    }

    fn reduce_scatter(&self, full: &[f32], shards: Shards) -> Result<Vec<f32>, CollectiveError> {
        let (size, world) = (shards.size(), self.ranks.world);
        let mut mine = Vec::new();
        for owner in 0..world {
            let range = shards.range(owner);
            let mut piece = full[range.clone()].to_vec();
            piece.resize(size, 0.0);
            let all = self.all_gather(&piece)?;
            if owner == self.ranks.rank {
                mine = all[..range.len()].to_vec();
                for r in 1..world {
                    let theirs = &all[r * size..r * size + range.len()];
                    for (a, b) in mine.iter_mut().zip(theirs) {
                        *a += *b;
                    }
                }
            }
        }
        Ok(mine)
    }
}
