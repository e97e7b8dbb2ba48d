//! The checkpoint store against the local Redis: cells are staged outside the
//! commit's `MULTI`/`EXEC`, so what was staged but never committed — a
//! checkpoint that failed half-way, a shard that lost the partition — must
//! never be what a key restores from.

use cepheid_matcher_shard::checkpoint::{self, CheckpointError, Checkpoints, Found, Job, KeyWrite, Loaded, Meta};

const REDIS: &str = "redis://127.0.0.1:6379";
const TOPIC: &str = "keyed";

/// The test that pauses Redis's writers runs alone (its pause would hold
/// the others' commands back past their connections' timeouts).
static PAUSES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn prefix(name: &str) -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("cepheid-test-ckpt-{name}-{t}")
}

/// A write of `key` into `slot` whose snapshot is `cell` (`None`: the key's actor stopped first).
fn write(key: &str, slot: u8, cell: Option<&[u8]>) -> KeyWrite {
    let (tx, snapshot) = tokio::sync::oneshot::channel();
    if let Some(cell) = cell {
        tx.send(cell.to_vec()).unwrap();
    }
    KeyWrite { key: key.into(), snapshot, slot, timer: Some(Some(1_000)) }
}

fn job(epoch: i64, seq: u64, lineage: &[(i64, u64)], states: Vec<KeyWrite>, deleted: &[&str]) -> Job<()> {
    Job {
        topic: TOPIC.into(),
        partition: 0,
        epoch,
        delivered: Vec::new(),
        meta: Meta { offset: seq as i64 * 10, seq, lineage: lineage.to_vec(), ..Meta::default() },
        states,
        deleted: deleted.iter().map(|k| k.to_string()).collect(),
        then: (),
    }
}

/// A shard that took partition 0 under `prefix`: its store, epoch, lineage
/// (its epoch owning checkpoint 1 on) and checkpoint writer.
struct Owner {
    ck: Checkpoints,
    epoch: i64,
    lineage: Vec<(i64, u64)>,
    jobs: tokio::sync::mpsc::UnboundedSender<Job<()>>,
    done: tokio::sync::mpsc::UnboundedReceiver<checkpoint::Done<()>>,
}

async fn owner(prefix: &str) -> Owner {
    let mut ck = Checkpoints::connect(REDIS, prefix).await.unwrap();
    let a = ck.acquire(TOPIC, 0).await.unwrap();
    assert!(a.meta.is_none() && a.keys.is_empty(), "a fresh prefix");
    let (jobs, done) = ck.start_writer::<()>();
    Owner { ck, epoch: a.epoch, lineage: vec![(a.epoch, 1)], jobs, done }
}

/// A checkpoint's writes that fail half-way: `first` and enough more keys
/// for a staging command to be sent are staged, then a snapshot is missing.
fn cut_short(first: KeyWrite) -> Vec<KeyWrite> {
    let mut states = vec![first];
    states.extend((0..100).map(|i| write(&format!("f{i}"), 0, Some(b"F"))));
    states.push(write("z", 0, None));
    states
}

async fn load(c: &Checkpoints, key: &str, lineage: &[(i64, u64)], committed: u64) -> Option<(Vec<u8>, u8)> {
    match c.load(TOPIC, 0, key, lineage, committed).await.unwrap() {
        Found::Cell(Loaded { cell, slot }) => Some((cell, slot)),
        Found::Uncommitted | Found::Missing => None,
    }
}

#[tokio::test]
async fn staged_cells_count_only_once_committed_by_the_owner() {
    let _shared = PAUSES.read().await;
    let prefix = prefix("staged");
    let Owner { ck: owner, epoch: e1, lineage: l1, jobs, mut done } = owner(&prefix).await;

    // Checkpoint 1: `k` in slot 0.
    jobs.send(job(e1, 1, &l1, vec![write("k", 0, Some(b"A"))], &[])).unwrap();
    done.recv().await.unwrap().1.unwrap();
    assert_eq!(load(&owner, "k", &l1, 1).await, Some((b"A".to_vec(), 0)));

    // Checkpoint 2 fails half-way, `k` staged in slot 1.
    jobs.send(job(e1, 2, &l1, cut_short(write("k", 1, Some(b"B"))), &[])).unwrap();
    assert!(matches!(done.recv().await.unwrap().1, Err(CheckpointError::Incomplete(_))));
    // What was staged does not count: the key restores from checkpoint 1.
    assert_eq!(load(&owner, "k", &l1, 1).await, Some((b"A".to_vec(), 0)));
    assert_eq!(owner.load(TOPIC, 0, "f0", &l1, 1).await.unwrap(), Found::Uncommitted, "staged, never committed");
    assert_eq!(owner.load(TOPIC, 0, "nobody", &l1, 1).await.unwrap(), Found::Missing);
    let mut successor = Checkpoints::connect(REDIS, &prefix).await.unwrap();
    let stored = successor.acquire(TOPIC, 0).await.unwrap();
    assert_eq!(stored.meta.as_ref().map(|m| m.seq), Some(1), "the meta is checkpoint 1's");
    // The checkpoint was cut short between its phases: its successor deletes
    // what it staged (the `f…` keys never had state; `k` keeps checkpoint 1's).
    assert_eq!(stored.keys, vec![("k".to_string(), Some(1_000))]);
    assert_eq!(successor.load(TOPIC, 0, "f0", &[(e1, 1), (stored.epoch, 2)], 1).await.unwrap(), Found::Missing);

    // That acquire was a successor's (epoch raised). It commits its own
    // checkpoint 2, `k` in slot 1 (over the old owner's staged, uncommitted "B").
    let e2 = stored.epoch;
    let l2 = vec![(e1, 1), (e2, 2)];
    let (jobs2, mut done2) = successor.start_writer::<()>();
    jobs2.send(job(e2, 2, &l2, vec![write("k", 1, Some(b"C"))], &[])).unwrap();
    done2.recv().await.unwrap().1.unwrap();
    assert_eq!(load(&successor, "k", &l2, 2).await, Some((b"C".to_vec(), 1)));
    // Under the old lineage (epoch 1 owning number 2) the same cell would not
    // count; and the superseded slot 0 ("A") was deleted by the commit.
    assert_eq!(successor.load(TOPIC, 0, "k", &l1, 2).await.unwrap(), Found::Uncommitted);

    // The old owner, still running, can stage nothing any more: its
    // successor's committed state stays.
    jobs.send(job(e1, 3, &l1, vec![write("k", 1, Some(b"zombie"))], &[])).unwrap();
    match done.recv().await.unwrap().1 {
        Err(CheckpointError::Fenced(_, mine, now)) => assert_eq!((mine, now), (e1, e2), "the error names both epochs"),
        other => panic!("expected fenced, got {other:?}"),
    }
    assert_eq!(load(&successor, "k", &l2, 2).await, Some((b"C".to_vec(), 1)));

    // Deleting a key removes both its slots and its timer entry.
    jobs2.send(job(e2, 3, &l2, vec![], &["k"])).unwrap();
    done2.recv().await.unwrap().1.unwrap();
    assert_eq!(load(&successor, "k", &l2, 3).await, None);
    let mut again = Checkpoints::connect(REDIS, &prefix).await.unwrap();
    assert_eq!(again.acquire(TOPIC, 0).await.unwrap().keys, vec![], "nothing left: `k` deleted, the cut-short staging swept");
    cepheid_state::delete_prefix(REDIS, &prefix).await.unwrap();
}

#[tokio::test]
async fn cells_of_earlier_versions_without_a_stamp_are_read() {
    let _shared = PAUSES.read().await;
    let prefix = prefix("legacy");
    let client = redis::Client::open(REDIS).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let state = format!("{prefix}:shard:{{{TOPIC}-0}}:state");
    let _: () = redis::cmd("HSET").arg(&state).arg("k").arg(b"\xCE\x50old").query_async(&mut c).await.unwrap();
    let mut ck = Checkpoints::connect(REDIS, &prefix).await.unwrap();
    let a = ck.acquire(TOPIC, 0).await.unwrap();
    let lineage = vec![(a.epoch, 1)];
    assert_eq!(load(&ck, "k", &lineage, 0).await, Some((b"\xCE\x50old".to_vec(), 0)));
    // Once a stamped cell is committed in the other slot, that one is the newer.
    let (jobs, mut done) = ck.start_writer::<()>();
    jobs.send(job(a.epoch, 1, &lineage, vec![write("k", 1, Some(b"new"))], &[])).unwrap();
    done.recv().await.unwrap().1.unwrap();
    assert_eq!(load(&ck, "k", &lineage, 1).await, Some((b"new".to_vec(), 1)));
    let old: Option<Vec<u8>> = redis::cmd("HGET").arg(&state).arg("k").query_async(&mut c).await.unwrap();
    assert_eq!(old, None, "the superseded slot is deleted by the commit");
    // A stamp cut short is an error that names the key, not a silent fresh start.
    let _: () = redis::cmd("HSET").arg(&state).arg("k").arg(b"\xC5\x01\x80").query_async(&mut c).await.unwrap();
    let e = ck.load(TOPIC, 0, "k", &lineage, 1).await.unwrap_err();
    assert!(e.to_string().contains(" k") && e.to_string().contains("stamp"), "{e}");
    cepheid_state::delete_prefix(REDIS, &prefix).await.unwrap();
}

/// Redis answering slowly (here: every client's writes paused for 1.2 s,
/// as a Redis on cores busy with the shard and the broker answered staging
/// commands after up to 1.4 s) delays a checkpoint; it does not fail it.
/// Under the `redis` crate's default 500 ms response timeout no checkpoint
/// of a saturated shard committed, and each next one wrote more.
#[tokio::test]
async fn a_slow_redis_delays_a_checkpoint_without_failing_it() {
    let _alone = PAUSES.write().await;
    let prefix = prefix("slow");
    let Owner { ck, epoch, lineage, jobs, mut done } = owner(&prefix).await;
    let client = redis::Client::open(REDIS).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(1_200).arg("WRITE").query_async(&mut c).await.unwrap();
    let started = std::time::Instant::now();
    jobs.send(job(epoch, 1, &lineage, vec![write("k", 0, Some(b"A"))], &[])).unwrap();
    let result = done.recv().await.unwrap().1;
    let took = started.elapsed();
    let _: () = redis::cmd("CLIENT").arg("UNPAUSE").query_async(&mut c).await.unwrap();
    result.unwrap();
    assert!(took >= std::time::Duration::from_millis(1_000), "the pause held the checkpoint back ({took:?})");
    assert_eq!(load(&ck, "k", &lineage, 1).await, Some((b"A".to_vec(), 0)));
    cepheid_state::delete_prefix(REDIS, &prefix).await.unwrap();
}

/// Many passivated keys are read together (one pipeline): answered in the
/// order asked, each key on its own (a missing key, an unreadable stamp, a
/// cell staged but never committed do not fail the others).
#[tokio::test]
async fn many_keys_load_together_each_on_its_own() {
    let _shared = PAUSES.read().await;
    let prefix = prefix("many");
    let Owner { ck, epoch, lineage, jobs, mut done } = owner(&prefix).await;
    jobs.send(job(epoch, 1, &lineage, vec![write("a", 0, Some(b"A")), write("b", 1, Some(b"B"))], &[])).unwrap();
    done.recv().await.unwrap().1.unwrap();
    // Checkpoint 2 stages `c` and fails before its commit.
    jobs.send(job(epoch, 2, &lineage, cut_short(write("c", 0, Some(b"C"))), &[])).unwrap();
    assert!(done.recv().await.unwrap().1.is_err());
    let client = redis::Client::open(REDIS).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let state = format!("{prefix}:shard:{{{TOPIC}-0}}:state");
    let _: () = redis::cmd("HSET").arg(&state).arg(checkpoint::field("bad", 0)).arg(b"\xC5\x01\x80").query_async(&mut c).await.unwrap();
    let got = ck.load_many(TOPIC, 0, &["b", "nobody", "a", "c", "bad"], &lineage, 1).await.unwrap();
    assert!(matches!(&got[0], Ok(Found::Cell(Loaded { cell, slot: 1 })) if cell == b"B"), "{:?}", got[0]);
    assert!(matches!(&got[1], Ok(Found::Missing)), "{:?}", got[1]);
    assert!(matches!(&got[2], Ok(Found::Cell(Loaded { cell, slot: 0 })) if cell == b"A"), "{:?}", got[2]);
    assert!(matches!(&got[3], Ok(Found::Uncommitted)), "{:?}", got[3]);
    assert!(matches!(&got[4], Err(CheckpointError::Corrupt(..))), "{:?}", got[4]);
    cepheid_state::delete_prefix(REDIS, &prefix).await.unwrap();
}

#[test]
fn the_meta_names_its_checkpoint_and_lineage() {
    let m = Meta { seq: 7, lineage: vec![(3, 1), (5, 6)], ..Meta::default() };
    let valid = |e, s| checkpoint::valid(&m.lineage, m.seq, e, s);
    assert!(valid(5, 7) && valid(3, 5) && !valid(3, 6) && !valid(5, 8));
    // Metas of earlier versions have neither: no stamped cell counts under them.
    // Nor do they say how far was read (their waiting events are in `pending`).
    let old: Meta = serde_json::from_str(r#"{"offset":5,"released":0,"arrival":0,"routers":[],"pending":[]}"#).unwrap();
    assert_eq!((old.seq, old.lineage.len(), old.read), (0, 0, None));
    assert!(!checkpoint::valid(&old.lineage, old.seq, 1, 1));
    // A meta of this version carries no events, only where to read them again.
    let now = serde_json::to_value(Meta { offset: 3, read: Some(9), ..m }).unwrap();
    assert_eq!((now["offset"].as_i64(), now["read"].as_i64(), now.get("pending")), (Some(3), Some(9), None), "{now}");
}

/// A new owner's lineage: owners that committed nothing leave it (their
/// entries name no number), and which stamped cells count is the same as with
/// them kept.
#[test]
fn owners_that_committed_nothing_leave_the_lineage() {
    // Epoch 1 committed 1-4, epoch 2 took over and committed nothing, epoch 3 neither.
    let kept = [(1, 1), (2, 5), (3, 5)];
    let l = checkpoint::lineage_for(kept[..2].to_vec(), 4, 3);
    assert_eq!(l, vec![(1, 1), (3, 5)]);
    let l = checkpoint::lineage_for(l, 4, 4);
    assert_eq!(l, vec![(1, 1), (4, 5)], "taken again without a checkpoint: still one entry past epoch 1's");
    for epoch in 0..6 {
        for seq in 0..8 {
            assert_eq!(checkpoint::valid(&l, 4, epoch, seq), checkpoint::valid(&[(1, 1), (2, 5), (3, 5), (4, 5)], 4, epoch, seq), "epoch {epoch}, number {seq}");
        }
    }
    // An owner that committed keeps its entry.
    assert_eq!(checkpoint::lineage_for(vec![(1, 1), (2, 5)], 6, 3), vec![(1, 1), (2, 5), (3, 7)]);
    assert_eq!(checkpoint::lineage_for(Vec::new(), 0, 1), vec![(1, 1)], "a partition's first owner");
}
