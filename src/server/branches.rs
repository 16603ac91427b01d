//! Polls the futures of one connection task — hyper's server side, the
//! connection's own upstream connection, the watchdog's signals — each with
//! a waker of its own, so that a wake re-polls only the future it is for.
//!
//! Why: the two halves of a proxied exchange live in one task and wake each
//! other all the time (the server side hands a request to the client side,
//! which hands back the response head, then the body). With one waker for
//! the task, each such hand-off costs the task another trip through the
//! scheduler in which *every* future is polled again, most of them for
//! nothing: 5 task polls per proxied request, each polling both hyper
//! dispatchers. Here a wake that comes while the task is running only marks
//! its branch, and the same poll goes on with the marked branches until
//! none is left; a wake from outside (the reactor, another thread) marks the
//! branch and wakes the task. A bounded number of rounds per poll keeps one
//! busy connection from starving the others on its worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Rounds over the marked branches in one poll before yielding to the
/// scheduler.
const MAX_ROUNDS: usize = 32;

/// `N` branches' wakers and the task's.
pub struct Branches<const N: usize> {
    shared: Arc<Shared<N>>,
    wakers: [Waker; N],
}

struct Shared<const N: usize> {
    task: AtomicWaker,
    in_poll: AtomicBool,
    marked: [AtomicBool; N],
}

struct Branch<const N: usize> {
    shared: Arc<Shared<N>>,
    i: usize,
}

impl<const N: usize> Wake for Branch<N> {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // SeqCst on both sides: either the poll loop sees the mark after
        // leaving, or this sees it still in the loop.
        self.shared.marked[self.i].store(true, Ordering::SeqCst);
        if !self.shared.in_poll.load(Ordering::SeqCst) {
            self.shared.task.wake();
        }
    }
}

impl<const N: usize> Default for Branches<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Branches<N> {
    /// All branches start marked, so the first poll polls each once.
    pub fn new() -> Branches<N> {
        let shared = Arc::new(Shared {
            task: AtomicWaker::new(),
            in_poll: AtomicBool::new(false),
            marked: std::array::from_fn(|_| AtomicBool::new(true)),
        });
        let wakers = std::array::from_fn(|i| {
            Waker::from(Arc::new(Branch {
                shared: shared.clone(),
                i,
            }))
        });
        Branches { shared, wakers }
    }

    /// Marks branch `i` to be polled on the next poll (e.g. after the
    /// caller changed its future's state from outside).
    pub fn mark(&self, i: usize) {
        self.shared.marked[i].store(true, Ordering::SeqCst);
    }

    /// Polls the marked branches with `poll(i, cx_of_branch_i)` until one
    /// is ready (its output is returned; the others stay as they are) or
    /// none is marked.
    pub fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        mut poll: impl FnMut(usize, &mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        let s = &*self.shared;
        s.task.register(cx.waker());
        s.in_poll.store(true, Ordering::SeqCst);
        let mut rounds = 0;
        loop {
            let mut any = false;
            for i in 0..N {
                if s.marked[i].swap(false, Ordering::SeqCst) {
                    any = true;
                    let mut bcx = Context::from_waker(&self.wakers[i]);
                    if let Poll::Ready(out) = poll(i, &mut bcx) {
                        s.in_poll.store(false, Ordering::SeqCst);
                        return Poll::Ready(out);
                    }
                }
            }
            if !any {
                s.in_poll.store(false, Ordering::SeqCst);
                // A wake that came between the last look and leaving saw
                // `in_poll` and did not wake the task: look once more.
                if !s.marked.iter().any(|m| m.load(Ordering::SeqCst)) {
                    return Poll::Pending;
                }
                s.in_poll.store(true, Ordering::SeqCst);
            }
            rounds += 1;
            if rounds == MAX_ROUNDS {
                s.in_poll.store(false, Ordering::SeqCst);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts how often the task itself is woken.
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_wake_during_the_poll_repolls_only_its_branch_without_waking_the_task() {
        let b = Branches::<2>::new();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = Waker::from(count.clone());
        let mut cx = Context::from_waker(&task);
        let mut polled = [0; 2];
        // First poll: both once; branch 1 then wakes branch 0 (a hand-off).
        let r: Poll<()> = b.poll(&mut cx, |i, _| {
            polled[i] += 1;
            if i == 1 && polled[1] == 1 {
                b.wakers[0].wake_by_ref();
            }
            Poll::Pending
        });
        assert!(r.is_pending());
        assert_eq!(polled, [2, 1], "branch 0 polled again in the same poll");
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "the task was not woken");
        // A wake from outside marks the branch and wakes the task.
        b.wakers[1].wake_by_ref();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        let r: Poll<usize> = b.poll(&mut cx, |i, _| Poll::Ready(i));
        assert_eq!(r, Poll::Ready(1), "only the marked branch is polled");
    }

    #[test]
    fn a_branch_that_keeps_waking_itself_yields_after_the_round_limit() {
        let b = Branches::<1>::new();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = Waker::from(count.clone());
        let mut cx = Context::from_waker(&task);
        let mut polled = 0;
        let r: Poll<()> = b.poll(&mut cx, |_, bcx| {
            polled += 1;
            bcx.waker().wake_by_ref();
            Poll::Pending
        });
        assert!(r.is_pending());
        assert_eq!(polled, MAX_ROUNDS);
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "the task is woken to come back"
        );
    }
}
