//! Locks that outlive a panic. A `std::sync::Mutex` is *poisoned* when a thread panics
//! while holding it, and every later `lock()` returns an error. The daemons never leave
//! a guarded value half-written across a point that can panic, so the right answer to
//! poison is to go on with the value as it is: one task's bug must not stop every other
//! task that shares the lock (the purge path, the API, the sessions).
//!
//! [`Recover`] is that rule written once: `mutex.locked()` instead of
//! `mutex.lock().unwrap_or_else(PoisonError::into_inner)` at every site, and the same for
//! `RwLock`'s `read_locked()` / `write_locked()`.
//!
//! [`IoMutex`] is for the few locks that may be held across a blocking call which needs
//! the runtime (the etcd-backed stores call etcd in `block_in_place`, and the rollout
//! lock is held across one plan write). If the waiters of such a lock blocked the worker
//! threads, nobody would drive the sockets and timers that the holder's call waits on,
//! and the process would wedge for good; an `IoMutex`'s wait never stalls a worker. Every
//! other lock is held for microseconds and waits the plain way, which costs less on the
//! purge path (`lock-bench`). clippy.toml bans the raw calls outside this module.

use std::sync::{
    Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError,
};

/// Lock, recovering the guard of a poisoned lock (see the module docs).
pub trait Recover<T: ?Sized> {
    fn locked(&self) -> MutexGuard<'_, T>;
}

// The one place the raw lock calls are allowed (clippy.toml bans them elsewhere).
#[allow(clippy::disallowed_methods)]
impl<T: ?Sized> Recover<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `RwLock`'s half of [`Recover`].
pub trait RecoverRw<T: ?Sized> {
    fn read_locked(&self) -> RwLockReadGuard<'_, T>;
    fn write_locked(&self) -> RwLockWriteGuard<'_, T>;
}

#[allow(clippy::disallowed_methods)]
impl<T: ?Sized> RecoverRw<T> for RwLock<T> {
    fn read_locked(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_locked(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A mutex that may be held across a blocking call which needs the runtime: waiting on
/// it never stalls a runtime worker (see the module docs). Poison is recovered from, as
/// with [`Recover`]. Every lock taken while one of these is held should be one too.
#[derive(Debug, Default)]
pub struct IoMutex<T>(Mutex<T>);

impl<T> IoMutex<T> {
    pub const fn new(value: T) -> Self {
        IoMutex(Mutex::new(value))
    }

    /// Tries before waiting: most waits end within microseconds, so a contended lock is
    /// tried in a busy loop, then between yields of the thread, and only then waited for
    /// in `block_in_place`, which hands the worker's tasks to another thread first. Off a
    /// multi-threaded runtime (a blocking thread, a plain thread, a current-thread
    /// runtime) it simply waits.
    #[allow(clippy::disallowed_methods)]
    pub fn lock(&self) -> MutexGuard<'_, T> {
        let mut started = None;
        for spin in 0.. {
            match self.0.try_lock() {
                Ok(g) => return g,
                Err(TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
            if spin < SPINS {
                std::hint::spin_loop();
                continue;
            }
            let since = *started.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= YIELD_FOR {
                break;
            }
            std::thread::yield_now();
        }
        let on_worker = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let guard = if on_worker {
            tokio::task::block_in_place(|| self.0.lock())
        } else {
            self.0.lock()
        };
        guard.unwrap_or_else(PoisonError::into_inner)
    }
}

/// How many times a contended lock is tried in a busy loop, then how long it is tried
/// between yields of the thread, before its wait leaves the worker: a lock held for
/// microseconds is had without the hand-off (`lock-bench` measures both).
const SPINS: usize = 64;
const YIELD_FOR: std::time::Duration = std::time::Duration::from_micros(200);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_lock_poisoned_by_a_panic_still_hands_out_its_value() {
        let m = Arc::new(Mutex::new(1));
        let r = Arc::new(RwLock::new(1));
        let (m2, r2) = (m.clone(), r.clone());
        let _ = std::thread::spawn(move || {
            let _g = m2.locked();
            let _w = r2.write_locked();
            panic!("poison both");
        })
        .join();
        assert!(m.is_poisoned() && r.is_poisoned());
        *m.locked() += 1;
        *r.write_locked() += 1;
        assert_eq!((*m.locked(), *r.read_locked()), (2, 2));
    }

    /// The shape that wedged a coordinator for good: a task holds a lock across a
    /// blocking wait on the runtime (`block_in_place` + `block_on`, as the etcd-backed
    /// stores call etcd), while other tasks wait on the same lock. If those waits stall
    /// both worker threads (a plain `Mutex` does), nothing drives the runtime's timers
    /// and sockets, the held call never completes, and the lock is never released.
    #[test]
    fn waiting_on_an_io_mutex_held_across_a_blocking_call_never_stalls_the_runtime() {
        use std::time::Duration;
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let m = Arc::new(IoMutex::new(0u32));
                let (held, is_held) = std::sync::mpsc::channel();
                let holder = {
                    let m = m.clone();
                    tokio::spawn(async move {
                        let mut g = m.lock();
                        let _ = held.send(());
                        tokio::task::block_in_place(|| {
                            tokio::runtime::Handle::current()
                                .block_on(tokio::time::sleep(Duration::from_millis(200)))
                        });
                        *g += 1;
                    })
                };
                is_held.recv().expect("the holder runs");
                // More waiters than there are workers.
                let waiters: Vec<_> = (0..6)
                    .map(|_| {
                        let m = m.clone();
                        tokio::spawn(async move { *m.lock() += 1 })
                    })
                    .collect();
                holder.await.expect("holder");
                for w in waiters {
                    w.await.expect("waiter");
                }
                assert_eq!(*m.lock(), 7);
            });
            let _ = done.send(());
        });
        match finished.recv_timeout(Duration::from_secs(20)) {
            Ok(()) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("the runtime stalled: the lock's waiters blocked every worker")
            }
            Err(e) => panic!("the runtime's thread failed: {e}"),
        }
    }
}
