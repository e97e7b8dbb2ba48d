//! The per-key actor: a [`KeyCell`] behind a ractor mailbox. Messages to one
//! key are handled in the order sent, so the key sees its events in order;
//! different keys run concurrently on the runtime's threads.

use std::sync::Arc;

use cepheid_engine::cell::{KeyCell, Released, SigRules, StepOutput};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

pub enum KeyMsg {
    /// Process released events, then fire deadlines due at the watermark.
    Step { rules: Arc<SigRules>, events: Vec<Released>, watermark: Option<i64>, now: i64, reply: Outbox },
    /// The cell in its stored (binary) form, for checkpoints and passivation.
    Snapshot(RpcReplyPort<Vec<u8>>),
}

pub struct StepReply {
    pub out: StepOutput,
    pub partials: usize,
}

/// A step's answer: the step's number in its release, the key, its rules and
/// the reply (or why there is none).
pub type Answer = (usize, Arc<str>, Arc<SigRules>, Result<StepReply, String>);

/// Where a key's step answers: one channel shared by every step of a release
/// (one wake-up of the shard for many keys, no reply channel per key). A step
/// that is never handled — its actor stopped or failed first — still
/// answers, with the reason, when its message is dropped.
pub struct Outbox {
    seq: usize,
    key: Arc<str>,
    rules: Arc<SigRules>,
    tx: Option<tokio::sync::mpsc::UnboundedSender<Answer>>,
}

impl Outbox {
    pub fn new(seq: usize, key: Arc<str>, rules: Arc<SigRules>, tx: tokio::sync::mpsc::UnboundedSender<Answer>) -> Outbox {
        Outbox { seq, key, rules, tx: Some(tx) }
    }

    fn answer(&mut self, r: Result<StepReply, String>) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((self.seq, self.key.clone(), self.rules.clone(), r));
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.answer(Err("the key's actor stopped before the step".into()));
    }
}

pub struct KeyActor;

impl Actor for KeyActor {
    type Msg = KeyMsg;
    type State = KeyCell;
    type Arguments = KeyCell;

    async fn pre_start(&self, _me: ActorRef<KeyMsg>, cell: KeyCell) -> Result<KeyCell, ActorProcessingErr> {
        Ok(cell)
    }

    async fn handle(&self, _me: ActorRef<KeyMsg>, msg: KeyMsg, cell: &mut KeyCell) -> Result<(), ActorProcessingErr> {
        match msg {
            KeyMsg::Step { rules, events, watermark, now, mut reply } => {
                let out = cell.step(&rules, &events, watermark, now);
                reply.answer(Ok(StepReply { out, partials: cell.partial_count() }));
            }
            KeyMsg::Snapshot(reply) => {
                let _ = reply.send(cell.encode());
            }
        }
        Ok(())
    }
}
