//! Argon2 verification on a fixed set of threads of its own, each reusing
//! one memory block buffer. Argon2 needs its full memory cost (19 MiB with
//! the default parameters) for every verification; run on whichever
//! blocking-pool thread is free, each of up to hundreds of threads kept its
//! own allocator arena of that size, and an AUTH flood from many addresses
//! drove a node to gigabytes that it never gave back.
//!
//! Invariants: at most [`THREADS`] verifications run at once, at most
//! [`QUEUE`] wait (more are refused at once, never queued without bound),
//! and Argon2 memory is at most [`THREADS`] buffers, each dropped after
//! [`IDLE_RELEASE`] without work. The verifiers wait for work all at once
//! (a condition variable), so after a burst every buffer goes at that
//! time, not one verifier's after another's.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, Version};
use tokio::sync::oneshot;

use super::UserError;
use crate::metrics::METRICS;

/// Verifier threads: verifications running at once on this node.
pub const THREADS: usize = 4;
/// Attempts that may wait for a verifier; more get `Busy` (454 4.7.0).
pub const QUEUE: usize = 64;
/// A verifier that had nothing to do for this long drops its buffer.
pub const IDLE_RELEASE: Duration = Duration::from_secs(10);

struct Job {
    password: Vec<u8>,
    hash: String,
    done: oneshot::Sender<bool>,
}

/// The attempts waiting for a verifier, at most [`QUEUE`].
#[derive(Default)]
struct Waiting {
    jobs: Mutex<VecDeque<Job>>,
    ready: Condvar,
    /// Verifier threads that started.
    workers: AtomicUsize,
}

static WAITING: LazyLock<Arc<Waiting>> = LazyLock::new(|| {
    let waiting = Arc::new(Waiting::default());
    for i in 0..THREADS {
        let w = waiting.clone();
        match std::thread::Builder::new().name(format!("argon2-{i}")).spawn(move || work(&w)) {
            Ok(_) => {
                waiting.workers.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::error!(error = %e, "cannot start a password verifier thread"),
        }
    }
    waiting
});

/// Whether `password` matches the PHC string `hash` (false for a hash
/// that cannot be read).
pub async fn verify(password: Vec<u8>, hash: String) -> Result<bool, UserError> {
    submit(password, hash)?.await.map_err(|_| UserError::Unavailable("password verifier stopped".into()))
}

/// Queues one verification, or refuses it at once when the queue is full.
fn submit(password: Vec<u8>, hash: String) -> Result<oneshot::Receiver<bool>, UserError> {
    let waiting = &*WAITING;
    if waiting.workers.load(Ordering::Relaxed) == 0 {
        return Err(UserError::Unavailable("no password verifier".into()));
    }
    let (done, answer) = oneshot::channel();
    let mut jobs = waiting.jobs.lock().unwrap_or_else(PoisonError::into_inner);
    if jobs.len() >= QUEUE {
        METRICS.smtp_auth_verifier_busy.inc();
        return Err(UserError::Busy);
    }
    jobs.push_back(Job { password, hash, done });
    drop(jobs);
    waiting.ready.notify_one();
    Ok(answer)
}

fn work(waiting: &Waiting) {
    let mut blocks: Vec<Block> = Vec::new();
    loop {
        match next(waiting, IDLE_RELEASE) {
            Some(job) => {
                let matches = check(&mut blocks, &job.password, &job.hash);
                let _ = job.done.send(matches);
            }
            None => blocks = Vec::new(),
        }
    }
}

/// The next waiting attempt, or `None` after `idle` without one. The lock
/// is let go while waiting, so each verifier's idle time is its own.
fn next(waiting: &Waiting, idle: Duration) -> Option<Job> {
    let deadline = Instant::now() + idle;
    let mut jobs = waiting.jobs.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        if let Some(job) = jobs.pop_front() {
            return Some(job);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        jobs = waiting.ready.wait_timeout(jobs, left).unwrap_or_else(PoisonError::into_inner).0;
    }
}

/// Argon2 of `password` with the parameters and salt of `phc`, in `blocks`
/// (grown to the memory cost when needed), compared in constant time.
pub fn check(blocks: &mut Vec<Block>, password: &[u8], phc: &str) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else { return false };
    let (Some(salt), Some(expected)) = (hash.salt.as_ref(), hash.hash.as_ref()) else { return false };
    let Ok(params) = Params::try_from(&hash) else { return false };
    let Ok(algorithm) = Algorithm::try_from(hash.algorithm.as_str()) else { return false };
    let version = match hash.version.map(Version::try_from).transpose() {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => return false,
    };
    let need = params.block_count();
    if blocks.len() < need {
        blocks.resize(need, Block::new());
    }
    let mut out = vec![0u8; expected.len()];
    let argon2 = Argon2::new(algorithm, version, params);
    if argon2.hash_password_into_with_memory(password, salt.as_ref(), &mut out, &mut blocks[..need]).is_err() {
        return false;
    }
    argon2::password_hash::phc::Output::new(&out).is_ok_and(|o| &o == expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_the_argon2_verifier_and_reuses_its_buffer() {
        let hash = super::super::hash_password("s3cret").unwrap();
        let mut blocks = Vec::new();
        assert!(check(&mut blocks, b"s3cret", &hash));
        let size = blocks.len();
        assert_eq!(size, Params::default().block_count());
        assert!(!check(&mut blocks, b"wrong", &hash));
        assert!(!check(&mut blocks, b"s3cret", "not a hash"));
        assert!(!check(&mut blocks, b"s3cret", "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ"));
        assert_eq!(blocks.len(), size, "the buffer is reused, not grown");
    }

    #[test]
    fn idle_verifiers_all_stop_waiting_after_their_idle_time() {
        // Waiting in turn on a shared receiver, the 4th verifier gave up
        // its buffer only after 4 idle times (40 s), and the AUTH-flood
        // test saw RSS stay up that long.
        let waiting = Arc::new(Waiting::default());
        let idle = Duration::from_secs(1);
        let started = Instant::now();
        let waits: Vec<_> = (0..THREADS)
            .map(|_| {
                let w = waiting.clone();
                std::thread::spawn(move || next(&w, idle).is_none())
            })
            .collect();
        assert!(waits.into_iter().all(|t| t.join().unwrap()), "nothing was queued");
        let took = started.elapsed();
        assert!(took >= idle && took < idle * 3, "{THREADS} idle verifiers took {took:?}, not about {idle:?}");
    }

    #[test]
    fn a_queued_attempt_wakes_a_waiting_verifier() {
        let waiting = Arc::new(Waiting::default());
        let w = waiting.clone();
        let verifier = std::thread::spawn(move || next(&w, Duration::from_secs(60)).map(|job| job.password));
        let (done, _answer) = oneshot::channel();
        waiting.jobs.lock().unwrap().push_back(Job { password: b"pw".to_vec(), hash: String::new(), done });
        waiting.ready.notify_one();
        assert_eq!(verifier.join().unwrap(), Some(b"pw".to_vec()));
    }

    #[tokio::test]
    async fn too_many_waiting_attempts_are_refused_not_queued() {
        let hash = super::super::hash_password("s3cret").unwrap();
        // 1,000 attempts at once (a few milliseconds; one verification
        // takes tens): all but about THREADS + QUEUE are refused.
        let submitted: Vec<_> = (0..1000).map(|_| submit(b"wrong".to_vec(), hash.clone())).collect();
        let busy = submitted.iter().filter(|s| matches!(s, Err(UserError::Busy))).count();
        assert!(busy > 800, "only {busy} of 1000 refused");
        for answer in submitted.into_iter().flatten() {
            assert!(!answer.await.unwrap());
        }
        assert!(verify(b"s3cret".to_vec(), hash).await.unwrap());
    }
}
