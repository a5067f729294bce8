//! Worker threads of the kernel: a rayon pool kept per thread count, and the split of a task
//! over contiguous ranges. Calls too small to pay for synchronisation run on the calling thread.

use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Multiply-adds below which a call runs on the calling thread, and the least each task gets.
pub(super) const PARALLEL_MIN_WORK: usize = 1 << 18;
const TASK_MIN_WORK: usize = 1 << 16;

pub(super) fn pool(threads: usize) -> Option<Arc<rayon::ThreadPool>> {
    static POOLS: Mutex<Vec<(usize, Arc<rayon::ThreadPool>)>> = Mutex::new(Vec::new());
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = pools.iter().find(|(t, _)| *t == threads) {
        return Some(p.clone());
    }
    let p = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("denselora-kernel-{i}"))
            .build()
            .ok()?,
    );
    pools.push((threads, p.clone()));
    Some(p)
}

/// How many tasks to split `work` multiply-adds over `units` independent units into.
pub(super) fn tasks_for(work: usize, units: usize, threads: usize) -> usize {
    if threads <= 1 || work < PARALLEL_MIN_WORK {
        return 1;
    }
    threads.min(work / TASK_MIN_WORK).min(units).max(1)
}

/// Run `f(range)` over `0..units` split into `tasks` contiguous ranges whose starts are
/// multiples of `align`.
pub(super) fn split<F: Fn(Range<usize>) + Sync>(
    pool: &Option<Arc<rayon::ThreadPool>>,
    units: usize,
    tasks: usize,
    align: usize,
    f: F,
) {
    if tasks <= 1 || pool.is_none() {
        f(0..units);
        return;
    }
    let per = units.div_ceil(tasks).div_ceil(align) * align;
    let pool = pool.as_ref().expect("checked above");
    pool.scope(|scope| {
        let f = &f;
        let mut start = per;
        while start < units {
            let end = (start + per).min(units);
            scope.spawn(move |_| f(start..end));
            start = end;
        }
        f(0..per.min(units));
    });
}

/// A buffer that concurrent tasks write in disjoint parts.
pub(super) struct SharedMut(pub(super) *mut f32);
// SAFETY: tasks write disjoint parts of the buffer behind the pointer.
unsafe impl Sync for SharedMut {}
unsafe impl Send for SharedMut {}
