//! The CUDA collective: NCCL through cudarc (the library loaded at run time, so a build without
//! NCCL installed still runs single-rank steps). Rank 0 creates the NCCL unique id and publishes
//! it in the rendezvous directory; each rank drives the GPU of its local rank.
//!
//! Buffers are staged through host memory: the training loop hands host vectors to its
//! collectives today. NCCL's ring order is fixed for a given world and topology, so results are
//! reproducible on the same machines.

use std::path::Path;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::{Collective, CollectiveError, Ranks, Shards, await_file, publish};

/// The communicator with the stream it runs on.
struct Handle {
    comm: Comm,
    stream: Arc<CudaStream>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not overlap;
// the mutex around it serializes them.
unsafe impl Send for Handle {}

pub(super) struct Nccl {
    ranks: Ranks,
    handle: Mutex<Handle>,
}

impl Nccl {
    pub(super) fn connect(ranks: &Ranks, meeting: &Path) -> Result<Nccl, CollectiveError> {
        let lib = |message: String| CollectiveError::Library {
            rank: ranks.rank,
            message,
        };
        if ranks.is_first() {
            let id = Id::new()
                .map_err(|e| lib(format!("ncclGetUniqueId: {e:?} (is libnccl installed?)")))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            publish(ranks, meeting, "nccl-id", &bytes)?;
        }
        let bytes = await_file(ranks, meeting, "nccl-id")?;
        if bytes.len() != 128 {
            return Err(lib(format!(
                "the published NCCL id has {} bytes, not 128",
                bytes.len()
            )));
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(&bytes) {
            *d = *s as std::ffi::c_char;
        }
        let ordinal = ranks.device_ordinal();
        let ctx =
            CudaContext::new(ordinal).map_err(|e| lib(format!("CUDA device {ordinal}: {e:?}")))?;
        let stream = ctx.default_stream();
        let comm = Comm::from_rank(
            stream.clone(),
            ranks.rank,
            ranks.world,
            Id::uninit(internal),
        )
        .map_err(|e| lib(format!("ncclCommInitRank: {e:?}")))?;
        Ok(Nccl {
            ranks: ranks.clone(),
            handle: Mutex::new(Handle { comm, stream }),
        })
    }

    fn err(&self, what: &str, e: impl std::fmt::Debug) -> CollectiveError {
        CollectiveError::Library {
            rank: self.ranks.rank,
            message: format!("{what}: {e:?}"),
        }
    }
}

impl Collective for Nccl {
    fn ranks(&self) -> &Ranks {
        &self.ranks
    }

    fn all_gather(&self, mine: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        let h = self.handle.lock().expect("the NCCL handle");
        let send = h
            .stream
            .clone_htod(mine)
            .map_err(|e| self.err("copy to device", e))?;
        let mut recv = h
            .stream
            .alloc_zeros::<f32>(mine.len() * self.ranks.world)
            .map_err(|e| self.err("alloc", e))?;
        h.comm
            .all_gather(&send, &mut recv)
            .map_err(|e| self.err("ncclAllGather", e))?;
        h.stream
            .clone_dtoh(&recv)
            .map_err(|e| self.err("copy to host", e))
    }

    fn reduce_scatter(&self, full: &[f32], shards: Shards) -> Result<Vec<f32>, CollectiveError> {
        let size = shards.size();
        let mut padded = full.to_vec();
        padded.resize(size * self.ranks.world, 0.0);
        let h = self.handle.lock().expect("the NCCL handle");
        let send = h
            .stream
            .clone_htod(&padded)
            .map_err(|e| self.err("copy to device", e))?;
        let mut recv = h
            .stream
            .alloc_zeros::<f32>(size)
            .map_err(|e| self.err("alloc", e))?;
        h.comm
            .reduce_scatter(&send, &mut recv, &ReduceOp::Sum)
            .map_err(|e| self.err("ncclReduceScatter", e))?;
        let mut out = h
            .stream
            .clone_dtoh(&recv)
            .map_err(|e| self.err("copy to host", e))?;
        out.truncate(shards.range(self.ranks.rank).len());
        Ok(out)
    }
}
