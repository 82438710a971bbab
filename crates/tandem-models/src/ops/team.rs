//! A persistent team of compute threads for the forward's parallel loops (as llama.cpp keeps its
//! threads polling between the products of a step).
//!
//! A decode step of a small model runs ~150 products of a few microseconds to a millisecond each,
//! with short serial work (norms, rope, residuals) between them. A general pool's workers go to
//! sleep in those gaps and must be woken by a system call for the next product; measured on
//! SmolLM2 Q4_1 that cost ~15% of a step's CPU time (`__schedule`, `sched_yield`, futex wake-ups).
//! The team's workers instead poll an atomic counter while a forward is running, and park as soon
//! as it ends: between forwards the cores are free for other work (the online drafter's trainer
//! runs at the lowest priority and lives on exactly that idle time; polling past the end of each
//! forward starved it).
//!
//! The thread that calls [`lead`] is the team's first member: it publishes each loop, takes items
//! like any worker, and waits for the last one, so the loop's closure never outlives the call.
//! Items are handed out one at a time from a shared counter; which thread runs an item never
//! changes what it computes (callers write disjoint outputs), so results do not depend on timing.
//! Only one caller leads at a time; a forward that finds the team busy (a second model in the same
//! process, a trainer) runs its loops on the rayon pool it is on instead.
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The longest a worker polls within one forward before it parks until the next loop (a serial
/// stretch this long is rare; the gaps between products are microseconds).
const MAX_POLL: Duration = Duration::from_millis(1);

/// One published loop: items 0..n of `f`, for the loop numbered `epoch`.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
    epoch: u32,
}

// SAFETY: the closure is Sync, and the leader keeps it alive until all n items are done; a
// worker calls it only for an item it claimed under the job's own epoch.
unsafe impl Send for Job {}

struct Shared {
    /// The current loop's number (bumped after `job` and `claim` are set).
    epoch: AtomicU32,
    job: Mutex<Option<Job>>,
    /// The current loop's epoch (high 32 bits) and next unclaimed item (low 32 bits): a worker
    /// that wakes late cannot claim an item of a newer loop with an older loop's closure.
    claim: AtomicU64,
    /// Items of the current loop finished (by any thread).
    done: AtomicUsize,
    panicked: AtomicBool,
    /// A forward is running (workers poll), or not (they park).
    active: AtomicBool,
    /// Forwards begun: a parked worker wakes to poll when a new one begins.
    forwards: AtomicU32,
    /// Workers parked (or about to park) on `wake`.
    parked: AtomicUsize,
    park_lock: Mutex<()>,
    wake: Condvar,
}

struct Team {
    shared: &'static Shared,
    workers: usize,
    /// Held by the leader for the whole of `lead`.
    lead: Mutex<()>,
}

thread_local! {
    /// True on the thread leading the team (its loops go to the team).
    static LEADING: Cell<bool> = const { Cell::new(false) };
    /// True inside a team item (nested loops run serially).
    static IN_ITEM: Cell<bool> = const { Cell::new(false) };
}

fn team() -> &'static Team {
    static TEAM: OnceLock<Team> = OnceLock::new();
    TEAM.get_or_init(|| {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            epoch: AtomicU32::new(0),
            job: Mutex::new(None),
            claim: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            active: AtomicBool::new(false),
            forwards: AtomicU32::new(0),
            parked: AtomicUsize::new(0),
            park_lock: Mutex::new(()),
            wake: Condvar::new(),
        }));
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let mut workers = 0;
        for i in 1..threads {
            let spawned = std::thread::Builder::new().name(format!("tandem-team-{i}")).spawn(move || work(shared));
            workers += spawned.is_ok() as usize;
        }
        Team { shared, workers, lead: Mutex::new(()) }
    })
}

/// Runs `f` on the calling thread with the team helping its parallel loops, or, when another
/// caller leads the team, on the rayon pool `fallback` gives.
pub fn lead<R: Send>(
    f: impl FnOnce() -> R + Send,
    fallback: impl FnOnce(Box<dyn FnOnce() -> R + Send + '_>) -> R,
) -> R {
    if LEADING.get() || IN_ITEM.get() {
        return f();
    }
    let team = team();
    let Ok(_guard) = team.lead.try_lock() else { return fallback(Box::new(f)) };
    let s = team.shared;
    s.forwards.fetch_add(1, SeqCst);
    s.active.store(true, SeqCst);
    wake_parked(s);
    LEADING.set(true);
    let out = catch_unwind(AssertUnwindSafe(f));
    LEADING.set(false);
    s.active.store(false, SeqCst);
    out.unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Calls `f(i)` for every i in 0..n, in parallel: on the team when this thread leads it, serially
/// inside a team item, else on the current rayon pool.
pub fn for_each(n: usize, f: &(dyn Fn(usize) + Sync)) {
    if IN_ITEM.get() || n <= 1 {
        return (0..n).for_each(f);
    }
    if !LEADING.get() {
        use rayon::prelude::*;
        return (0..n).into_par_iter().for_each(f);
    }
    let team = team();
    if team.workers == 0 {
        return (0..n).for_each(f);
    }
    run(team.shared, f, n);
}

/// Threads that share a loop's items when this thread leads the team (for sizing work items).
pub fn threads() -> usize {
    if LEADING.get() {
        team().workers + 1
    } else {
        rayon::current_num_threads().max(1)
    }
}

fn run(s: &Shared, f: &(dyn Fn(usize) + Sync), n: usize) {
    let epoch = s.epoch.load(Relaxed).wrapping_add(1);
    // SAFETY (of the lifetime erasure): this call returns only when all n items are done, and
    // no thread calls `f` for an item it did not claim under this epoch.
    let f: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(f) };
    let job = Job { f, n, epoch };
    s.done.store(0, SeqCst);
    s.claim.store((epoch as u64) << 32, SeqCst);
    *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job);
    s.epoch.store(epoch, SeqCst);
    wake_parked(s);
    take_items(s, job);
    while s.done.load(Acquire) < n {
        std::hint::spin_loop();
    }
    if s.panicked.swap(false, SeqCst) {
        panic!("a parallel kernel item panicked on a team worker");
    }
}

/// Claims and runs items of `job` until none are left (or a newer loop has begun).
fn take_items(s: &Shared, job: Job) {
    IN_ITEM.set(true);
    let tag = (job.epoch as u64) << 32;
    loop {
        let c = s.claim.load(Acquire);
        if c & !0xFFFF_FFFF != tag || (c & 0xFFFF_FFFF) as usize >= job.n {
            break;
        }
        if s.claim.compare_exchange_weak(c, c + 1, AcqRel, Relaxed).is_err() {
            continue;
        }
        // SAFETY: item c was claimed under this job's epoch, so the leader is still waiting.
        let f = unsafe { &*job.f };
        if catch_unwind(AssertUnwindSafe(|| f((c & 0xFFFF_FFFF) as usize))).is_err() {
            s.panicked.store(true, SeqCst);
        }
        s.done.fetch_add(1, Release);
    }
    IN_ITEM.set(false);
}

fn work(s: &'static Shared) {
    let mut seen = 0u32;
    loop {
        seen = wait_for_epoch(s, seen);
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = job.filter(|j| j.epoch == seen) {
            take_items(s, job);
        }
    }
}

/// Wakes parked workers (after a new loop or forward was published).
fn wake_parked(s: &Shared) {
    if s.parked.load(SeqCst) > 0 {
        let _g = s.park_lock.lock().unwrap_or_else(|e| e.into_inner());
        s.wake.notify_all();
    }
}

/// Waits for an epoch after `seen` and returns it: polling while a forward runs (at most
/// `MAX_POLL` at a stretch), parked otherwise until a loop is published or a forward begins.
fn wait_for_epoch(s: &Shared, seen: u32) -> u32 {
    loop {
        let forward = s.forwards.load(SeqCst);
        let start = Instant::now();
        let mut spins = 0u32;
        while s.active.load(Acquire) {
            let e = s.epoch.load(Acquire);
            if e != seen {
                return e;
            }
            std::hint::spin_loop();
            spins += 1;
            if spins.is_multiple_of(256) && start.elapsed() > MAX_POLL {
                break;
            }
        }
        let mut g = s.park_lock.lock().unwrap_or_else(|e| e.into_inner());
        s.parked.fetch_add(1, SeqCst);
        loop {
            let e = s.epoch.load(SeqCst);
            if e != seen {
                s.parked.fetch_sub(1, SeqCst);
                return e;
            }
            if s.forwards.load(SeqCst) != forward {
                // A new forward began: poll for its loops.
                s.parked.fetch_sub(1, SeqCst);
                break;
            }
            g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rayon_fallback<R: Send>(f: Box<dyn FnOnce() -> R + Send + '_>) -> R {
        f()
    }

    /// Runs 2,000 loops of varied sizes and checks each item ran exactly once.
    fn many_loops() {
        for round in 0..2000usize {
            let n = round % 37;
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for_each(n, &|i| {
                hits[i].fetch_add(1, Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "round {round}");
        }
    }

    #[test]
    fn every_item_runs_once_when_leading_and_when_not() {
        lead(many_loops, rayon_fallback);
        many_loops();
    }

    #[test]
    fn two_leaders_at_once_both_finish() {
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| lead(many_loops, rayon_fallback));
            }
        });
    }

    #[test]
    fn a_panicking_item_reaches_the_leader_and_the_team_goes_on() {
        let caught = catch_unwind(|| {
            lead(
                || {
                    for_each(64, &|i| {
                        if i == 40 {
                            panic!("item 40");
                        }
                    })
                },
                rayon_fallback,
            )
        });
        assert!(caught.is_err());
        lead(many_loops, rayon_fallback);
    }

    #[test]
    fn nested_loops_run_serially_inside_an_item() {
        let total = AtomicUsize::new(0);
        lead(
            || {
                for_each(8, &|_| {
                    for_each(5, &|_| {
                        total.fetch_add(1, Relaxed);
                    })
                })
            },
            rayon_fallback,
        );
        assert_eq!(total.load(Relaxed), 40);
    }
}
