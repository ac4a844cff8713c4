//! Where ops compute: the backend (Flex on the CPU by default), its device, the thread budget,
//! and opening model inputs with their tokenizer.

use crate::model::ModelError;
use crate::model::checkpoint::{LoadedModel, load_model};
use crate::model::decoder::Compute;
use crate::model::tokenizer::Tokenizer;
use crate::op::{Artifact, OpError};

/// The backend ops compute on, chosen at build time. The CPU default is Flex: it measured
/// 1.1–2x NdArray on this model's matmuls (`cargo bench -p distillery-ops --bench cpu_backends`).
/// `--features cuda` computes on the first CUDA device, `--features wgpu` on the first wgpu
/// adapter; both run the CubeCL kernels of `distillery-kernels`. (Burn's `fusion` feature stays
/// off: these aliases are then plain `CubeBackend`s, which the kernels extend.)
#[cfg(feature = "cuda")]
pub type Backend = burn::backend::Cuda<f32, i32>;
#[cfg(feature = "cuda")]
pub const BACKEND_NAME: &str = "cuda";

#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
pub type Backend = burn::backend::Wgpu<f32, i32, u32>;
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
pub const BACKEND_NAME: &str = "wgpu";

#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
pub type Backend = burn::backend::Flex;
#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
pub const BACKEND_NAME: &str = "flex (CPU)";

/// The same with autodiff, for training.
pub type TrainBackend = burn::backend::Autodiff<Backend>;

/// The device of the selected backend (the same for [`TrainBackend`]).
pub type Device = burn::tensor::Device<Backend>;

pub fn device() -> Device {
    Default::default()
}

/// The device of a data-parallel rank: its GPU ([`crate::parallel::Ranks::device_ordinal`]) on
/// CUDA builds, the one device elsewhere.
pub fn device_for(ranks: &crate::parallel::Ranks) -> Device {
    #[cfg(feature = "cuda")]
    {
        burn::backend::cuda::CudaDevice::new(ranks.device_ordinal())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ranks;
        device()
    }
}

/// The step's `compute` parameter, refused up front when this build's device cannot run it
/// (wgpu has no bf16) rather than failing inside the first matmul.
pub fn compute(params: &crate::op::Params) -> Result<Compute, OpError> {
    use burn::tensor::backend::Backend as _;
    let compute = Compute::from_name(params.str("compute")?).unwrap_or_default();
    if compute == Compute::Bf16 && !Backend::supports_dtype(&device(), burn::tensor::DType::BF16) {
        return Err(OpError::Invalid(format!(
            "compute = \"bfloat16\" needs bf16 arithmetic, which this build's device ({BACKEND_NAME}) lacks; \
             set compute = \"float32\", or run a CUDA build (--features cuda) or the CPU build"
        )));
    }
    Ok(compute)
}

/// Refuses a bf16 setting (`param`, e.g. `main_params_dtype`) where this build's device has no
/// bf16 (wgpu), before anything is loaded.
pub fn require_bf16(param: &str) -> Result<(), OpError> {
    use burn::tensor::backend::Backend as _;
    if Backend::supports_dtype(&device(), burn::tensor::DType::BF16) {
        return Ok(());
    }
    Err(OpError::Invalid(format!(
        "{param} = \"bfloat16\" needs bf16 tensors, which this build's device ({BACKEND_NAME}) lacks; \
         set it to \"float32\", or run a CUDA build (--features cuda) or the CPU build"
    )))
}

/// Keeps freed tensor buffers in the process instead of handing them back to the kernel and
/// faulting fresh zeroed pages in for the next one: glibc serves allocations above its mmap
/// threshold with mmap and unmaps them on free, and a forward pass allocates and frees many
/// multi-megabyte activations. With a fixed 32 MiB threshold (glibc's largest) and no trimming,
/// batch-8 forward ran 375 → 448 tokens/s on SmolLM2 (`cargo bench -p distillery-ops --bench
/// forward`). Call once at the start of a process, before any thread allocates. Also reads
/// `DISTILLERY_HUGE_PAGES` for [`HugePageAlloc`].
pub fn tune_allocator() {
    let off = std::env::var("DISTILLERY_HUGE_PAGES").is_ok_and(|v| v == "0");
    HUGE_PAGES.store(!off, std::sync::atomic::Ordering::Relaxed);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, BLOCK_CACHE_MIN as i32);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// The system allocator, asking the kernel for transparent huge pages (`madvise(MADV_HUGEPAGE)`,
/// Linux) on every allocation of [`HUGE_PAGE_MIN`] bytes or more: a training step allocates
/// tensors of 100 MB and more (logits, their gradient, the embedding's gradient), which glibc
/// serves with fresh mmaps above its 32 MiB threshold, and faulting those in 4 KiB at a time took
/// about a tenth of a SmolLM2 distillation step (`perf`: page faults, page clearing, cgroup
/// charging). With 2 MiB pages, distillation steps ran 10–20% faster and teacher-correction
/// steps about the same (`cargo bench -p distillery-ops --bench distill`, alternating runs with
/// `DISTILLERY_HUGE_PAGES=0`; glibc's own `glibc.malloc.hugetlb=1` tunable, which does the same
/// but can only be set in the environment before the process starts, measured alike). Machines whose
/// huge-page setting is `never` ignore the advice; `DISTILLERY_HUGE_PAGES=0` turns it off (read
/// by [`tune_allocator`]). It also keeps up to [`BLOCK_CACHE_BYTES`] of freed large blocks
/// resident for reuse, per process, for the life of the process (handed back to the system when an
/// allocation would otherwise fail). Binaries install it with `#[global_allocator]`.
pub struct HugePageAlloc;

/// Whether [`HugePageAlloc`] advises huge pages (set once by [`tune_allocator`]).
static HUGE_PAGES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Allocations from this size on are advised to use huge pages (two of them).
pub const HUGE_PAGE_MIN: usize = 4 << 20;

#[cfg(target_os = "linux")]
fn advise_huge_pages(p: *mut u8, len: usize) {
    const HUGE: usize = 2 << 20;
    if p.is_null() || len < HUGE_PAGE_MIN || !HUGE_PAGES.load(std::sync::atomic::Ordering::Relaxed)
    {
        return;
    }
    // The 2 MiB-aligned part of the block: the kernel maps huge pages only there.
    let start = (p as usize).next_multiple_of(HUGE);
    let end = (p as usize + len) & !(HUGE - 1);
    if end > start {
        // SAFETY: the range lies inside the block just allocated; the advice changes how pages
        // are backed, never their contents. Its failure (THP off) changes nothing.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_: *mut u8, _: usize) {}

/// Freed blocks of [`BLOCK_CACHE_MIN`] bytes or more that [`HugePageAlloc`] keeps for the next
/// allocation of the same size and alignment, oldest first, at most [`BLOCK_CACHE_BYTES`] in all.
/// glibc hands every block above its 32 MiB mmap threshold straight back to the kernel, and a
/// training step frees and reallocates the same few such blocks every step (the teacher's and the
/// student's logits, the loss's gradient, the tied embedding's gradient and its AdamW update, each
/// 100 MB and more for SmolLM2 at 512 tokens); faulting them in afresh, zeroed page by page, was
/// about 4% of a SmolLM2 distillation step (`perf`: kernel time 5.4% → 1.2% with the cache).
struct BlockCache {
    /// (address, size, alignment) of each kept block; the first `len` entries are in use.
    blocks: [Block; BLOCK_CACHE_SLOTS],
    len: usize,
    bytes: usize,
}

/// A kept block: its address, size and alignment.
type Block = (*mut u8, usize, usize);

// SAFETY: the cache owns the blocks it holds (no one else refers to them until it hands one
// out), so it may move between threads; the mutex serializes every access.
unsafe impl Send for BlockCache {}

/// The smallest block [`HugePageAlloc`] keeps on free: glibc's mmap threshold as
/// [`tune_allocator`] sets it (smaller blocks stay in glibc's own heap).
pub const BLOCK_CACHE_MIN: usize = 32 << 20;

/// The most bytes of freed blocks [`HugePageAlloc`] keeps at once: the peak resident memory a
/// process can gain from the cache.
pub const BLOCK_CACHE_BYTES: usize = 1 << 30;

/// The most blocks kept at once.
const BLOCK_CACHE_SLOTS: usize = 16;

/// The allocator's cache. A mutex, since allocations come from every thread; it never allocates.
static BLOCKS: std::sync::Mutex<BlockCache> = std::sync::Mutex::new(BlockCache {
    blocks: [(std::ptr::null_mut(), 0, 0); BLOCK_CACHE_SLOTS],
    len: 0,
    bytes: 0,
});

impl BlockCache {
    /// Takes a kept block of exactly `layout`'s size and alignment.
    fn take(&mut self, layout: std::alloc::Layout) -> Option<*mut u8> {
        let live = &self.blocks[..self.len];
        let i = live
            .iter()
            .position(|&(_, size, align)| size == layout.size() && align == layout.align())?;
        let (p, size, _) = self.blocks[i];
        self.blocks.copy_within(i + 1..self.len, i);
        self.len -= 1;
        self.bytes -= size;
        Some(p)
    }

    /// Keeps `p`, evicting the oldest blocks until it fits; returns the blocks to free (the
    /// caller frees them outside the lock), or `p` itself where it alone exceeds the budget.
    fn keep(
        &mut self,
        p: *mut u8,
        layout: std::alloc::Layout,
    ) -> ([Block; BLOCK_CACHE_SLOTS], usize) {
        let mut evicted = [(std::ptr::null_mut(), 0, 0); BLOCK_CACHE_SLOTS];
        if layout.size() > BLOCK_CACHE_BYTES {
            evicted[0] = (p, layout.size(), layout.align());
            return (evicted, 1);
        }
        let mut n = 0;
        while self.len == BLOCK_CACHE_SLOTS || self.bytes + layout.size() > BLOCK_CACHE_BYTES {
            evicted[n] = self.blocks[0];
            n += 1;
            self.bytes -= self.blocks[0].1;
            self.blocks.copy_within(1..self.len, 0);
            self.len -= 1;
        }
        self.blocks[self.len] = (p, layout.size(), layout.align());
        self.len += 1;
        self.bytes += layout.size();
        (evicted, n)
    }

    /// Empties the cache; returns the blocks to free, as [`BlockCache::keep`].
    fn drain(&mut self) -> ([Block; BLOCK_CACHE_SLOTS], usize) {
        let n = self.len;
        let blocks = self.blocks;
        self.len = 0;
        self.bytes = 0;
        (blocks, n)
    }
}

/// Frees `blocks[..n]` to the system allocator.
///
/// # Safety
/// Each block came from System with its size and alignment, and nothing refers to it.
unsafe fn free_blocks((blocks, n): ([Block; BLOCK_CACHE_SLOTS], usize)) {
    for &(q, size, align) in &blocks[..n] {
        // SAFETY: the caller's.
        unsafe {
            std::alloc::GlobalAlloc::dealloc(
                &std::alloc::System,
                q,
                std::alloc::Layout::from_size_align_unchecked(size, align),
            )
        }
    }
}

/// Calls `alloc` again after handing every kept block back to the system, where it failed
/// (returned null) with blocks kept: idle memory must not make an allocation fail.
fn or_after_flush(p: *mut u8, alloc: impl FnOnce() -> *mut u8) -> *mut u8 {
    if !p.is_null() {
        return p;
    }
    let drained = BLOCKS.lock().unwrap_or_else(|e| e.into_inner()).drain();
    if drained.1 == 0 {
        return p;
    }
    // SAFETY: drained blocks are the cache's own, from System with their layouts.
    unsafe { free_blocks(drained) };
    alloc()
}

/// A kept block for `layout`, if the cache holds one.
fn cached_block(layout: std::alloc::Layout) -> Option<*mut u8> {
    if layout.size() < BLOCK_CACHE_MIN {
        return None;
    }
    // A poisoned lock (a panic while holding it cannot happen: nothing in it panics) still
    // holds a consistent cache.
    let mut cache = BLOCKS.lock().unwrap_or_else(|e| e.into_inner());
    cache.take(layout)
}

// SAFETY: every block comes from the system allocator with the layout it is later freed with:
// blocks leave the cache only for an allocation of exactly their size and alignment, or to be
// freed with the layout they were kept under. The advice only changes page backing.
unsafe impl std::alloc::GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if let Some(p) = cached_block(layout) {
            return p;
        }
        // SAFETY: forwarded with the caller's layout.
        let system = || unsafe { std::alloc::System.alloc(layout) };
        let p = or_after_flush(system(), system);
        advise_huge_pages(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if let Some(p) = cached_block(layout) {
            // SAFETY: the block holds `layout.size()` bytes.
            unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
            return p;
        }
        // SAFETY: forwarded with the caller's layout.
        let system = || unsafe { std::alloc::System.alloc_zeroed(layout) };
        let p = or_after_flush(system(), system);
        advise_huge_pages(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: std::alloc::Layout) {
        if layout.size() >= BLOCK_CACHE_MIN {
            let evicted = BLOCKS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keep(p, layout);
            // SAFETY: evicted blocks (or `p` itself) came from System with their layouts.
            unsafe { free_blocks(evicted) };
            return;
        }
        // SAFETY: forwarded: `p` came from this allocator, i.e. from System, with `layout`.
        unsafe { std::alloc::System.dealloc(p, layout) }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as above: `p` is a live System block of `layout` (served from the
        // cache or not: a live block is never in it). On failure `p` stays valid, so retrying
        // after the flush is the same call.
        let system = || unsafe { std::alloc::System.realloc(p, layout, new_size) };
        let q = or_after_flush(system(), system);
        advise_huge_pages(q, new_size);
        q
    }
}

/// Runs `f` on a pool of `threads` threads (Flex parallelizes through rayon).
pub fn with_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
    {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

/// Opens a model input (a checkpoint directory or a GGUF file).
pub fn open_model(artifact: &Artifact) -> Result<LoadedModel, OpError> {
    let model = load_model(&artifact.path)?;
    model.weights.check_finite()?;
    Ok(model)
}

/// The model's tokenizer.
pub fn tokenizer(model: &LoadedModel) -> Result<Tokenizer, OpError> {
    let json = model.tokenizer_json.as_deref().ok_or_else(|| {
        OpError::from(ModelError::Tokenizer {
            path: model.path.clone(),
            why: "the model has no tokenizer.json (and is not a GGUF file with tokenizer metadata)"
                .into(),
        })
    })?;
    Ok(Tokenizer::from_json(json, &model.path)?.with_chat_template(
        crate::model::chat::template_source(model),
        crate::model::chat::special_tokens(model),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout};

    fn empty() -> BlockCache {
        BlockCache {
            blocks: [(std::ptr::null_mut(), 0, 0); BLOCK_CACHE_SLOTS],
            len: 0,
            bytes: 0,
        }
    }

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 64).unwrap()
    }

    /// A block address that is only a label.
    fn at(label: usize) -> *mut u8 {
        std::ptr::without_provenance_mut(label)
    }

    // Addresses here are labels: the cache stores and returns them, never dereferences them.
    #[test]
    fn the_block_cache_returns_exact_sizes_oldest_first_and_evicts_within_its_budget() {
        let mut cache = empty();
        let (a, b) = (40 << 20, 50 << 20);
        for (address, size) in [(1, a), (2, b), (3, a)] {
            assert_eq!(cache.keep(at(address), layout(size)).1, 0);
        }
        assert_eq!(cache.take(layout(a)), Some(at(1)));
        assert_eq!(cache.take(Layout::from_size_align(a, 4096).unwrap()), None);
        assert_eq!(cache.take(layout(a + 4)), None);
        assert_eq!(cache.take(layout(a)), Some(at(3)));
        assert_eq!(cache.take(layout(a)), None);
        assert_eq!((cache.len, cache.bytes), (1, b));

        // Over the byte budget: the oldest go first, as many as it takes.
        let big = BLOCK_CACHE_BYTES / 2 + 64;
        assert_eq!(cache.keep(at(4), layout(big)).1, 0);
        let (evicted2, n2) = cache.keep(at(5), layout(big));
        assert_eq!(&evicted2[..n2], &[(at(2), b, 64), (at(4), big, 64)]);
        assert_eq!((cache.len, cache.bytes), (1, big));

        // A block over the whole budget is handed back to be freed, the cache untouched.
        let (free, n) = cache.keep(at(6), layout(BLOCK_CACHE_BYTES + 1));
        assert_eq!(&free[..n], &[(at(6), BLOCK_CACHE_BYTES + 1, 64)]);
        assert_eq!((cache.len, cache.bytes), (1, big));

        // Over the slots: the oldest goes.
        let mut cache = empty();
        for address in 1..=BLOCK_CACHE_SLOTS {
            assert_eq!(cache.keep(at(address), layout(BLOCK_CACHE_MIN)).1, 0);
        }
        let (free, n) = cache.keep(at(99), layout(BLOCK_CACHE_MIN));
        assert_eq!(&free[..n], &[(at(1), BLOCK_CACHE_MIN, 64)]);
        assert_eq!(cache.len, BLOCK_CACHE_SLOTS);

        // A flush hands back every block, oldest first.
        let (all, n) = cache.drain();
        assert_eq!(n, BLOCK_CACHE_SLOTS);
        assert_eq!((all[0].0, all[n - 1].0), (at(2), at(99)));
        assert_eq!(
            (cache.len, cache.bytes, cache.take(layout(BLOCK_CACHE_MIN))),
            (0, 0, None)
        );
    }

    #[test]
    fn a_freed_large_block_serves_the_next_allocation_of_its_size_zeroed_when_asked() {
        // A size nothing else in the process allocates, so a parallel test cannot take it.
        let layout = Layout::from_size_align(BLOCK_CACHE_MIN + 4096 * 3 + 8, 64).unwrap();
        // SAFETY: every block is allocated and freed with `layout` through the same allocator,
        // and written only within its size.
        unsafe {
            let p = HugePageAlloc.alloc(layout);
            assert!(!p.is_null());
            std::ptr::write_bytes(p, 7, layout.size());
            HugePageAlloc.dealloc(p, layout);
            let q = HugePageAlloc.alloc_zeroed(layout);
            assert_eq!(q, p, "the freed block is reused");
            let bytes = std::slice::from_raw_parts(q, layout.size());
            assert!(
                bytes.iter().all(|&v| v == 0),
                "alloc_zeroed zeroes a reused block"
            );
            HugePageAlloc.dealloc(q, layout);
            let small = Layout::from_size_align(1 << 20, 64).unwrap();
            let r = HugePageAlloc.alloc(small);
            assert_ne!(r, p);
            HugePageAlloc.dealloc(r, small);
            assert_eq!(cached_block(layout), Some(p));
            HugePageAlloc.dealloc(p, layout);
        }
    }
}
