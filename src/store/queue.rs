//! The store thread's job queue: the loop puts jobs in without ever waiting, the store thread
//! takes them out a batch at a time and sleeps while there are none.
//!
//! Why not `std::sync::mpsc::sync_channel`: its slots are claimed and released in two steps, and a
//! thread that finds a slot claimed but not yet released spins (`pause`) until it is. The loop and
//! the store thread often share one core, and the loop preempts the store thread (nice 5) whenever
//! a socket has data, sometimes between those two steps; the loop then spun in `try_send` until
//! the scheduler stepped in: 3.7 % of the core under dm-throughput (issue 7). Behind a mutex a
//! waiter sleeps instead and the preempted holder runs.
//!
//! What it owns: the bound (`--store-queue`) and the closing (the handle dropped: the store thread
//! finishes what is queued and ends). What it must not do: block the caller of `try_push`, beyond
//! the few instructions another thread holds the lock for.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use super::Job;

pub(super) struct JobQueue {
    state: Mutex<State>,
    /// Signalled when a job arrives while the store thread sleeps, and when the queue closes.
    arrived: Condvar,
    capacity: usize,
}

struct State {
    jobs: VecDeque<Job>,
    closed: bool,
    /// The store thread is asleep in `take_batch`: only then does a push need to wake it.
    sleeping: bool,
}

impl JobQueue {
    pub(super) fn new(capacity: usize) -> JobQueue {
        JobQueue {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                closed: false,
                sleeping: false,
            }),
            arrived: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every field stays meaningful whatever a panicking holder was doing.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `job`, or gives it back when the queue is full or closed.
    pub(super) fn try_push(&self, job: Job) -> Result<(), Job> {
        let mut state = self.lock();
        if state.closed || state.jobs.len() >= self.capacity {
            return Err(job);
        }
        state.jobs.push_back(job);
        if state.sleeping {
            state.sleeping = false;
            self.arrived.notify_one();
        }
        Ok(())
    }

    /// Waits for at least one job and takes up to `max` of them, oldest first. None once the
    /// queue is closed and empty.
    pub(super) fn take_batch(&self, max: usize) -> Option<Vec<Job>> {
        let mut state = self.lock();
        while state.jobs.is_empty() {
            if state.closed {
                return None;
            }
            state.sleeping = true;
            state = self
                .arrived
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let take = state.jobs.len().min(max.max(1));
        Some(state.jobs.drain(..take).collect())
    }

    /// No more jobs are accepted; the store thread takes what is queued, then ends.
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.arrived.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    use super::*;
    use crate::session::Ticket;
    use crate::store::Op;

    fn job(n: u32) -> Job {
        Job {
            ticket: Ticket {
                session: 1,
                slot: n as usize,
                request_id: n,
            },
            op: Op::LoadRooms,
        }
    }

    fn slots(jobs: &[Job]) -> Vec<usize> {
        jobs.iter().map(|job| job.ticket.slot).collect()
    }

    #[test]
    fn jobs_come_out_in_order_in_batches_of_at_most_max() {
        let queue = JobQueue::new(10);
        for n in 0..5 {
            queue.try_push(job(n)).unwrap();
        }
        assert_eq!(slots(&queue.take_batch(3).unwrap()), [0, 1, 2]);
        assert_eq!(slots(&queue.take_batch(3).unwrap()), [3, 4]);
    }

    #[test]
    fn a_full_queue_gives_the_job_back_and_takes_it_once_there_is_room() {
        let queue = JobQueue::new(2);
        queue.try_push(job(0)).unwrap();
        queue.try_push(job(1)).unwrap();
        let refused = queue.try_push(job(2)).unwrap_err();
        assert_eq!(refused.ticket.slot, 2);
        queue.take_batch(1).unwrap();
        queue.try_push(refused).unwrap();
        assert_eq!(slots(&queue.take_batch(9).unwrap()), [1, 2]);
    }

    #[test]
    fn a_sleeping_taker_wakes_for_a_job_and_ends_after_the_close() {
        let queue = Arc::new(JobQueue::new(4));
        let taker = {
            let queue = Arc::clone(&queue);
            thread::spawn(move || {
                let mut taken = Vec::new();
                while let Some(batch) = queue.take_batch(4) {
                    taken.extend(slots(&batch));
                }
                taken
            })
        };
        thread::sleep(Duration::from_millis(50));
        queue.try_push(job(7)).unwrap();
        thread::sleep(Duration::from_millis(50));
        queue.try_push(job(8)).unwrap();
        queue.close();
        assert!(queue.try_push(job(9)).is_err(), "closed");
        assert_eq!(
            taker.join().unwrap(),
            [7, 8],
            "what was queued is still taken"
        );
    }
}
