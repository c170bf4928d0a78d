//! Work grouped by one writer task: whatever is waiting when the writer is
//! free goes into one statement (or one transaction), and each submitter
//! gets its own result. Received messages' commits ([`super::body`]) and
//! delivery's completions use it: a transaction's fixed cost (the WAL
//! frames it appends, the hand-off to the connection's thread, and for
//! commits the fsync) is paid once per group instead of once per message.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

use super::failed;
use crate::spool::SpoolError;

/// Most items handled by one group.
const GROUP_MAX: usize = 256;
/// Items that may wait for the writer before a submitter waits to hand
/// its own over.
const WAITING_MAX: usize = 1024;

type Answer = oneshot::Sender<Result<(), SpoolError>>;

/// The handle items are submitted through; the writer task ends when every
/// handle is gone.
pub(super) struct Group<T> {
    sender: mpsc::Sender<(T, Answer)>,
    op: &'static str,
}

impl<T> Clone for Group<T> {
    fn clone(&self) -> Self {
        Group { sender: self.sender.clone(), op: self.op }
    }
}

impl<T: Send + 'static> Group<T> {
    /// Starts the writer: `handle` gets each group and answers with one
    /// result per item, in order. `op` names the operation in errors.
    pub(super) fn start<F, Fut>(op: &'static str, mut handle: F) -> Group<T>
    where
        F: FnMut(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<Result<(), SpoolError>>> + Send,
    {
        let (sender, mut receiver) = mpsc::channel::<(T, Answer)>(WAITING_MAX);
        tokio::spawn(async move {
            let mut waiting = Vec::with_capacity(GROUP_MAX);
            while receiver.recv_many(&mut waiting, GROUP_MAX).await > 0 {
                let (items, answers): (Vec<T>, Vec<Answer>) = waiting.drain(..).unzip();
                let results = handle(items).await;
                debug_assert_eq!(results.len(), answers.len());
                for (answer, result) in answers.into_iter().zip(results) {
                    let _ = answer.send(result);
                }
            }
        });
        Group { sender, op }
    }

    /// Hands `item` to the writer and waits for its result.
    pub(super) async fn submit(&self, item: T) -> Result<(), SpoolError> {
        let (answer, result) = oneshot::channel();
        self.sender.send((item, answer)).await.map_err(|_| failed(self.op, "the writer stopped"))?;
        result.await.map_err(|_| failed(self.op, "the writer stopped"))?
    }
}
