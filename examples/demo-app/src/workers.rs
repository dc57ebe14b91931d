//! Threads that serve connections, one connection at a time each (blocking reads and writes),
//! with some always waiting for the next: the connections a hand-over gives the application,
//! a hundred at once, are served at once, not each after a thread was made for it. Making a
//! thread took 35-57 µs here on an idle machine, and the thread adopting the connections
//! shares two cores with the ones it already started, so a hundred adopted connections took
//! 5.7-29 ms to adopt (five runs), inside the pause their clients saw. Idle workers beyond the
//! spare ones end only after `keep_idle` without a job: a worker ending right after its
//! connection went (a thousand at once, with a hand-over) unmapped its stack while the others
//! were still letting go of theirs, and the hand-over waited for them 50-63 ms instead of 22-25.

use std::{
    collections::VecDeque,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::Duration,
};

type Job = Box<dyn FnOnce() + Send>;

pub struct Workers {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// A job to run.
    work: Condvar,
    /// Fewer idle workers than waiting jobs plus `spare`: the keeper makes more.
    short: Condvar,
    /// Idle workers kept waiting.
    spare: usize,
    /// How long a worker beyond the spare ones stays idle before it ends.
    keep_idle: Duration,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Workers not running a job (counted from when the keeper starts making one).
    idle: usize,
}

impl Workers {
    /// Starts the keeper, which makes the first `spare` workers at once.
    pub fn new(spare: usize, keep_idle: Duration) -> Self {
        let inner = Arc::new(Inner { state: Mutex::default(), work: Condvar::new(), short: Condvar::new(), spare, keep_idle });
        let keeper = inner.clone();
        std::thread::spawn(move || keeper.keep());
        Self { inner }
    }

    /// Runs `job` on an idle worker, or on the next one made.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        self.run_all([job]);
    }

    /// Runs each job on an idle worker, or on the next one made. All are queued at once:
    /// handed out one at a time, each worker woken took the CPU from the one handing out.
    pub fn run_all<J: FnOnce() + Send + 'static>(&self, jobs: impl IntoIterator<Item = J>) {
        let mut s = self.inner.lock();
        for job in jobs {
            s.jobs.push_back(Box::new(job));
            self.inner.work.notify_one();
        }
        if self.inner.wanted(&s) > 0 {
            self.inner.short.notify_one();
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("workers lock")
    }

    /// Workers to make now.
    fn wanted(&self, s: &State) -> usize {
        (s.jobs.len() + self.spare).saturating_sub(s.idle)
    }

    fn keep(self: Arc<Self>) {
        let mut s = self.lock();
        loop {
            while self.wanted(&s) > 0 {
                s.idle += 1;
                drop(s);
                let me = self.clone();
                let made = std::thread::Builder::new().spawn(move || me.work());
                s = self.lock();
                if let Err(e) = made {
                    // Out of threads (or memory) for now: the jobs wait for a worker to come
                    // free or for a later try.
                    s.idle -= 1;
                    eprintln!("cannot start a worker thread ({e}); {} connections wait", s.jobs.len());
                    s = self.short.wait_timeout(s, Duration::from_secs(1)).expect("workers lock").0;
                }
            }
            s = self.short.wait(s).expect("workers lock");
        }
    }

    fn work(self: Arc<Self>) {
        let mut s = self.lock();
        loop {
            let Some(job) = s.jobs.pop_front() else {
                let (g, waited) = self.work.wait_timeout(s, self.keep_idle).expect("workers lock");
                s = g;
                if waited.timed_out() && s.jobs.is_empty() && s.idle > self.spare {
                    s.idle -= 1;
                    return;
                }
                continue;
            };
            s.idle -= 1;
            if self.wanted(&s) > 0 {
                self.short.notify_one();
            }
            drop(s);
            job();
            s = self.lock();
            s.idle += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Condvar, Mutex},
        time::{Duration, Instant},
    };

    use super::Workers;

    /// Polls `cond` until it holds or 10 s passed.
    fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !cond() {
            assert!(t0.elapsed() < Duration::from_secs(10), "not within 10 s: {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn idle(w: &Workers) -> usize {
        w.inner.lock().idle
    }

    #[test]
    fn more_jobs_than_spare_workers_all_run_at_once_and_the_extra_idle_ones_end_later() {
        const JOBS: usize = 50;
        let w = Workers::new(4, Duration::from_secs(1));
        eventually("the spare workers waiting", || idle(&w) == 4);
        // Each job waits until all have started: a pool that never made more than its spare
        // workers would never finish them.
        let started = Arc::new((Mutex::new(0usize), Condvar::new()));
        let done = Arc::new(Mutex::new(0usize));
        w.run_all((0..JOBS).map(|_| {
            let (started, done) = (started.clone(), done.clone());
            move || {
                let (n, all) = &*started;
                let mut n = n.lock().expect("lock");
                *n += 1;
                all.notify_all();
                let t0 = Instant::now();
                while *n < JOBS && t0.elapsed() < Duration::from_secs(10) {
                    n = all.wait_timeout(n, Duration::from_millis(100)).expect("lock").0;
                }
                if *n == JOBS {
                    *done.lock().expect("lock") += 1;
                }
            }
        }));
        eventually("every job run at the same time as the others", || *done.lock().expect("lock") == JOBS);
        // Done, the workers stay, idle (for a second, from the first one done: the test only
        // looks for more than the spare ones, as on a loaded machine the last may be done after
        // the first already ended); after a while idle, those beyond the spare ones end.
        eventually("workers beyond the spare ones idle", || idle(&w) > 4);
        eventually("the idle workers back to the spare ones", || idle(&w) == 4);
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(idle(&w), 4, "the spare workers stay");
        // And they take the next job.
        let (tx, rx) = std::sync::mpsc::channel();
        w.run(move || tx.send(()).expect("send"));
        rx.recv_timeout(Duration::from_secs(10)).expect("the next job ran");
    }
}
