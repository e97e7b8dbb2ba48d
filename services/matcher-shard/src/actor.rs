//! The per-key actor: a [`KeyCell`] behind a ractor mailbox. Messages to one
//! key are handled in the order sent, so the key sees its events in order;
//! different keys run concurrently on the runtime's threads.

use std::sync::Arc;

use cepheid_engine::cell::{KeyCell, Released, SigRules, StepOutput};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

pub enum KeyMsg {
    /// Process released events, then fire deadlines due at the watermark.
    Step { rules: Arc<SigRules>, events: Vec<Released>, watermark: Option<i64>, now: i64, reply: RpcReplyPort<StepReply> },
    /// The cell in its stored (binary) form, for checkpoints and passivation.
    Snapshot(RpcReplyPort<Vec<u8>>),
}

pub struct StepReply {
    pub out: StepOutput,
    pub partials: usize,
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
            KeyMsg::Step { rules, events, watermark, now, reply } => {
                let out = cell.step(&rules, &events, watermark, now);
                let _ = reply.send(StepReply { out, partials: cell.partial_count() });
            }
            KeyMsg::Snapshot(reply) => {
                let _ = reply.send(cell.encode());
            }
        }
        Ok(())
    }
}
