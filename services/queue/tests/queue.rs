//! The Redis list queue on its own, against the real Redis (`REDIS_URL`, as
//! `deploy/local/test` sets it); each test in a namespace of its own.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use betting_queue::{
    EnqueueOutcome, FailOutcome, Handler, Job, JobError, Queue, QueueSettings, Worker,
    WorkerSettings,
};
use betting_test_kit::{eventually, poll_until, redis_url};

fn queue(settings: QueueSettings) -> Queue {
    let client = betting_queue::connect(&redis_url()).expect("redis");
    Queue::new(
        client,
        &format!("t-{}", uuid::Uuid::new_v4().simple()),
        "q",
        settings,
    )
}

fn quick() -> QueueSettings {
    QueueSettings {
        max_attempts: 3,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(40),
        visibility_timeout: Duration::from_millis(300),
    }
}

/// A fresh queue and a connected client of its own for BLMOVE.
async fn setup() -> (Queue, fred::prelude::Client) {
    let q = queue(quick());
    wait_connected(&q).await;
    let blocking = betting_queue::connect(&redis_url()).expect("redis");
    wait_client(&blocking).await;
    (q, blocking)
}

async fn wait_connected(q: &Queue) {
    wait_client(q.client()).await;
}

async fn wait_client(client: &fred::prelude::Client) {
    eventually("redis is reachable", Duration::from_secs(5), async || {
        betting_queue::ping(client).await.then_some(())
    })
    .await;
}

#[tokio::test]
async fn dedupes_while_live_and_frees_the_id_once_done() {
    let (q, blocking) = setup().await;
    assert_eq!(
        q.enqueue("job-1", serde_json::json!({"n": "1"}))
            .await
            .expect("enqueue"),
        EnqueueOutcome::Enqueued
    );
    assert_eq!(
        q.enqueue("job-1", serde_json::json!({"n": "2"}))
            .await
            .expect("dedupe while waiting"),
        EnqueueOutcome::Duplicate
    );
    let job = q
        .fetch(&blocking, "c1", Duration::from_secs(1))
        .await
        .expect("fetch")
        .expect("a job");
    assert_eq!(job.payload["n"], "1");
    assert_eq!(
        q.enqueue("job-1", serde_json::json!({}))
            .await
            .expect("dedupe in flight"),
        EnqueueOutcome::Duplicate
    );
    assert_eq!(q.stats().await.expect("stats").in_flight, 1);
    q.ack("c1", &job.id).await.expect("ack");
    assert_eq!(
        q.enqueue("job-1", serde_json::json!({"n": "3"}))
            .await
            .expect("enqueue"),
        EnqueueOutcome::Enqueued,
        "a later job with the same id is accepted once the first is done"
    );
    let stats = q.stats().await.expect("stats");
    assert_eq!((stats.waiting, stats.in_flight, stats.processed), (1, 0, 1));
}

#[tokio::test]
async fn failures_back_off_then_go_to_the_dead_letter_list_and_can_be_retried() {
    let (q, blocking) = setup().await;
    q.enqueue("doomed", serde_json::json!({}))
        .await
        .expect("enqueue");
    for attempt in 1..=3 {
        let job = loop {
            q.promote_due().await.expect("promote");
            if let Some(job) = q
                .fetch(&blocking, "c", Duration::from_millis(100))
                .await
                .expect("fetch")
            {
                break job;
            }
        };
        assert_eq!(job.attempts, attempt - 1);
        let outcome = q
            .fail("c", &job, &format!("boom {attempt}"), false)
            .await
            .expect("fail");
        if attempt < 3 {
            assert!(matches!(outcome, FailOutcome::Retrying { attempt: a, .. } if a == attempt));
            assert_eq!(q.stats().await.expect("stats").delayed, 1);
        } else {
            assert_eq!(outcome, FailOutcome::Dead);
        }
    }
    let dead = q.dead(10).await.expect("dead");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].last_error.as_deref(), Some("boom 3"));
    let stats = q.stats().await.expect("stats");
    assert_eq!(
        (stats.dead, stats.failed, stats.waiting, stats.delayed),
        (1, 3, 0, 0)
    );
    assert!(q.retry_dead("doomed").await.expect("retry"));
    let stats = q.stats().await.expect("stats");
    assert_eq!((stats.dead, stats.waiting), (0, 1));
    let job = q.job("doomed").await.expect("job").expect("requeued");
    assert_eq!(job.attempts, 0);
}

#[tokio::test]
async fn jobs_of_a_consumer_that_died_mid_job_are_reaped_and_run() {
    let (q, blocking) = setup().await;
    q.enqueue("orphan", serde_json::json!({}))
        .await
        .expect("enqueue");
    // A consumer takes the job and dies without a word: no ack, no heartbeat after this one.
    q.heartbeat("dead-consumer").await.expect("heartbeat");
    let job = q
        .fetch(&blocking, "dead-consumer", Duration::from_secs(1))
        .await
        .expect("fetch")
        .expect("job");
    assert_eq!(q.stats().await.expect("stats").in_flight, 1);
    assert_eq!(
        q.reap_expired().await.expect("reap"),
        0,
        "its lease still runs"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(q.reap_expired().await.expect("reap"), 1);
    let reaped = q.job("orphan").await.expect("job").expect("still known");
    assert_eq!(
        reaped.attempts, 1,
        "a consumer dying mid-job counts an attempt"
    );

    // A live worker now runs it to completion.
    struct Count(AtomicU32);
    impl Handler for Count {
        async fn handle(&self, _job: &Job) -> Result<(), JobError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
    let handler = Arc::new(Count(AtomicU32::new(0)));
    let (stop, stopped) = betting_shutdown::channel();
    let worker = Worker::new(
        q.clone(),
        betting_queue::connect(&redis_url()).expect("redis"),
        WorkerSettings {
            // Six polls fit in quick()'s 300 ms lease.
            poll: Duration::from_millis(50),
            ..WorkerSettings::default()
        },
    )
    .expect("worker settings");
    let running = tokio::spawn(worker.run(handler.clone(), stopped));
    eventually("the reaped job ran", Duration::from_secs(3), async || {
        (handler.0.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    assert_eq!(handler.0.load(Ordering::SeqCst), 1, "the reaped job ran");
    stop.signal();
    running.await.expect("worker stops");
    let stats = q.stats().await.expect("stats");
    assert_eq!((stats.waiting, stats.in_flight, stats.processed), (0, 0, 1));
    assert_eq!(job.id, "orphan");
}

#[tokio::test]
async fn a_stopping_worker_hands_back_what_it_could_not_finish() {
    let q = queue(quick());
    wait_connected(&q).await;
    struct Slow;
    impl Handler for Slow {
        async fn handle(&self, _job: &Job) -> Result<(), JobError> {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(())
        }
    }
    q.enqueue("slow", serde_json::json!({}))
        .await
        .expect("enqueue");
    let (stop, stopped) = betting_shutdown::channel();
    let worker = Worker::new(
        q.clone(),
        betting_queue::connect(&redis_url()).expect("redis"),
        WorkerSettings {
            poll: Duration::from_millis(50),
            shutdown_grace: Duration::from_millis(200),
            ..WorkerSettings::default()
        },
    )
    .expect("worker settings");
    let running = tokio::spawn(worker.run(Arc::new(Slow), stopped));
    // As before: a bounded wait, not an assertion (the stats below tell).
    poll_until(Duration::from_secs(3), async || {
        (q.stats().await.expect("stats").in_flight == 1).then_some(())
    })
    .await;
    stop.signal();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("stops within the grace period")
        .expect("worker task");
    let stats = q.stats().await.expect("stats");
    assert_eq!(
        (stats.waiting, stats.in_flight, stats.consumers),
        (1, 0, 0),
        "{stats:?}"
    );
}

#[tokio::test]
async fn a_job_that_kills_every_consumer_ends_in_the_dead_letter_list() {
    let (q, blocking) = setup().await;
    q.enqueue("poison", serde_json::json!({}))
        .await
        .expect("enqueue");
    // Three consumers in a row take it and die (max_attempts is 3).
    for n in 0..3 {
        let consumer = format!("doomed-{n}");
        q.heartbeat(&consumer).await.expect("heartbeat");
        q.fetch(&blocking, &consumer, Duration::from_secs(1))
            .await
            .expect("fetch")
            .expect("the poison job");
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(q.reap_expired().await.expect("reap"), 1);
    }
    let stats = q.stats().await.expect("stats");
    assert_eq!(
        (stats.waiting, stats.in_flight, stats.dead),
        (0, 0, 1),
        "{stats:?}"
    );
    let dead = q.dead(10).await.expect("dead");
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(
        dead[0].last_error.as_deref(),
        Some("its consumer died while running it")
    );
}

/// Guards against the reconciler resurrecting dead-letter jobs: `enqueue`
/// only checked the live jobs, so a producer re-deriving its work put a
/// poison job back on every pass and the dead-letter list meant nothing.
#[tokio::test]
async fn a_dead_job_is_not_enqueued_again_until_an_operator_retries_it() {
    let (q, blocking) = setup().await;
    q.enqueue("poison", serde_json::json!({}))
        .await
        .expect("enqueue");
    let job = q
        .fetch(&blocking, "c", Duration::from_secs(1))
        .await
        .expect("fetch")
        .expect("the job");
    assert_eq!(
        q.fail("c", &job, "malformed", true).await.expect("fail"),
        FailOutcome::Dead
    );
    assert_eq!(
        q.enqueue("poison", serde_json::json!({}))
            .await
            .expect("enqueue"),
        EnqueueOutcome::Dead,
        "a dead job is refused"
    );
    let stats = q.stats().await.expect("stats");
    assert_eq!((stats.waiting, stats.dead), (0, 1), "{stats:?}");

    assert!(q.retry_dead("poison").await.expect("retry"));
    let stats = q.stats().await.expect("stats");
    assert_eq!((stats.waiting, stats.dead), (1, 0), "{stats:?}");
    assert_eq!(
        q.enqueue("poison", serde_json::json!({}))
            .await
            .expect("enqueue"),
        EnqueueOutcome::Duplicate,
        "once retried it is live again"
    );
}

/// Guards against `retry_all_dead` looping for ever: it re-read the head of
/// the dead list until it was empty, so jobs that died again at once kept it
/// going.
#[tokio::test]
async fn retry_all_retries_each_dead_job_once_even_if_it_dies_again_at_once() {
    let (q, blocking) = setup().await;
    const JOBS: u64 = 5;
    for n in 0..JOBS {
        let id = format!("poison-{n}");
        q.enqueue(&id, serde_json::json!({}))
            .await
            .expect("enqueue");
        let job = q
            .fetch(&blocking, "c", Duration::from_secs(1))
            .await
            .expect("fetch")
            .expect("the job");
        q.fail("c", &job, "malformed", true).await.expect("fail");
    }
    assert_eq!(q.stats().await.expect("stats").dead, JOBS);

    struct Reject;
    impl Handler for Reject {
        async fn handle(&self, _job: &Job) -> Result<(), JobError> {
            Err(JobError::Permanent("still malformed".into()))
        }
    }
    let (stop, stopped) = betting_shutdown::channel();
    let worker = Worker::new(
        q.clone(),
        betting_queue::connect(&redis_url()).expect("redis"),
        WorkerSettings {
            poll: Duration::from_millis(50),
            ..WorkerSettings::default()
        },
    )
    .expect("worker settings");
    let running = tokio::spawn(worker.run(Arc::new(Reject), stopped));
    // Let the worker take its lease and block in its fetch.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let retried = tokio::time::timeout(Duration::from_secs(10), q.retry_all_dead())
        .await
        .expect("retry_all returns although every job dies again at once")
        .expect("retry_all");
    assert_eq!(retried, JOBS, "each dead job is retried exactly once");
    // On a timeout the assertion below reports the stats last seen.
    let settled = poll_until(Duration::from_secs(3), async || {
        let stats = q.stats().await.expect("stats");
        (stats.dead == JOBS && stats.waiting == 0 && stats.in_flight == 0).then_some(stats)
    })
    .await;
    let stats = match settled {
        Some(stats) => stats,
        None => q.stats().await.expect("stats"),
    };
    assert_eq!(
        (stats.dead, stats.waiting, stats.in_flight),
        (JOBS, 0, 0),
        "every job ran once more and died again: {stats:?}"
    );
    stop.signal();
    running.await.expect("worker stops");
}

/// Counts runs and remembers the attempt count each run saw.
struct Record(std::sync::Mutex<Vec<(String, u32)>>);

impl Handler for Record {
    async fn handle(&self, job: &Job) -> Result<(), JobError> {
        if let Ok(mut runs) = self.0.lock() {
            runs.push((job.id.clone(), job.attempts));
        }
        Ok(())
    }
}

impl Record {
    fn new() -> Arc<Self> {
        Arc::new(Self(std::sync::Mutex::new(Vec::new())))
    }

    fn runs(&self) -> Vec<(String, u32)> {
        self.0.lock().map(|runs| runs.clone()).unwrap_or_default()
    }

    /// A bounded wait, not an assertion: callers check the runs themselves.
    async fn wait_for_runs(&self, n: usize, within: Duration) {
        poll_until(within, async || (self.runs().len() >= n).then_some(())).await;
    }
}

/// Guards against a graceful shutdown orphaning a job for ever: the stopping
/// worker used to drop its pending fetch, but the BLMOVE stayed blocked on the
/// server and moved a job pushed meanwhile into the active list of a consumer
/// that had already handed its jobs back and left the lease set, where no
/// reaper looks and the dedupe entry refused every re-enqueue.
#[tokio::test]
async fn a_worker_stopped_while_its_fetch_blocks_leaves_no_job_behind() {
    let q = queue(QueueSettings {
        visibility_timeout: Duration::from_secs(12),
        ..quick()
    });
    wait_connected(&q).await;
    let long_poll = WorkerSettings {
        poll: Duration::from_secs(2),
        ..WorkerSettings::default()
    };
    let (stop, stopped) = betting_shutdown::channel();
    let worker = Worker::new(
        q.clone(),
        betting_queue::connect(&redis_url()).expect("redis"),
        long_poll.clone(),
    )
    .expect("twelve seconds fit a 2 s poll");
    let first = Record::new();
    let running = tokio::spawn(worker.run(first.clone(), stopped));
    // Its lease is taken before its first fetch; then it blocks in BLMOVE.
    poll_until(Duration::from_secs(2), async || {
        (q.stats().await.expect("stats").consumers == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.signal();
    tokio::time::sleep(Duration::from_millis(100)).await;
    q.enqueue("late", serde_json::json!({}))
        .await
        .expect("enqueue");
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("stops within a poll")
        .expect("worker task");
    assert!(first.runs().is_empty(), "a stopping worker starts nothing");
    let stats = q.stats().await.expect("stats");
    assert_eq!(
        (stats.waiting, stats.in_flight, stats.consumers),
        (1, 0, 0),
        "the job is back on the wait list, not stranded: {stats:?}"
    );

    // The next worker runs it.
    let (stop, stopped) = betting_shutdown::channel();
    let worker = Worker::new(
        q.clone(),
        betting_queue::connect(&redis_url()).expect("redis"),
        long_poll,
    )
    .expect("worker settings");
    let second = Record::new();
    let running = tokio::spawn(worker.run(second.clone(), stopped));
    second.wait_for_runs(1, Duration::from_secs(5)).await;
    assert_eq!(second.runs(), vec![("late".to_owned(), 0)]);
    stop.signal();
    running.await.expect("worker stops");
    let stats = q.stats().await.expect("stats");
    assert_eq!(
        (stats.waiting, stats.in_flight, stats.processed),
        (0, 0, 1),
        "{stats:?}"
    );
}

/// Guards against jobs stranded in the active list of a consumer that holds
/// no lease (it left, or its BLMOVE landed after it left): the reaper only
/// looked at consumers in the lease set, so such a job never ran again.
#[tokio::test]
async fn a_job_in_the_active_list_of_a_consumer_without_a_lease_is_run() {
    let (q, blocking) = setup().await;
    q.enqueue("stranded", serde_json::json!({}))
        .await
        .expect("enqueue");
    // A consumer that never took a lease ends up holding it.
    q.fetch(&blocking, "gone", Duration::from_secs(1))
        .await
        .expect("fetch")
        .expect("the job");
    let stats = q.stats().await.expect("stats");
    assert_eq!((stats.in_flight, stats.consumers), (1, 0), "{stats:?}");

    let (stop, stopped) = betting_shutdown::channel();
    let worker = Worker::new(
        q.clone(),
        betting_queue::connect(&redis_url()).expect("redis"),
        WorkerSettings {
            poll: Duration::from_millis(50),
            ..WorkerSettings::default()
        },
    )
    .expect("worker settings");
    let handler = Record::new();
    let running = tokio::spawn(worker.run(handler.clone(), stopped));
    handler.wait_for_runs(1, Duration::from_secs(5)).await;
    stop.signal();
    running.await.expect("worker stops");
    assert_eq!(
        handler.runs(),
        vec![("stranded".to_owned(), 0)],
        "it ran once, and no attempt was counted: no live consumer ever ran it"
    );
    let stats = q.stats().await.expect("stats");
    assert_eq!(
        (stats.waiting, stats.in_flight, stats.processed),
        (0, 0, 1),
        "{stats:?}"
    );
}

/// Guards the orphan sweep's other side: it must never take the jobs of a
/// consumer that holds a lease (a live one runs them), and leaves an expired
/// lease to the reaper, which counts an attempt.
#[tokio::test]
async fn the_orphan_sweep_spares_consumers_that_hold_a_lease() {
    let (q, blocking) = setup().await;
    for id in ["held", "stranded"] {
        q.enqueue(id, serde_json::json!({})).await.expect("enqueue");
    }
    q.heartbeat("alive").await.expect("heartbeat");
    let held = q
        .fetch(&blocking, "alive", Duration::from_secs(1))
        .await
        .expect("fetch")
        .expect("a job");
    assert_eq!(held.id, "held");
    q.fetch(&blocking, "gone", Duration::from_secs(1))
        .await
        .expect("fetch")
        .expect("a job");

    // One whole pass over the keyspace, however many calls it takes.
    async fn full_sweep(q: &Queue) -> u64 {
        let mut cursor = betting_queue::SweepCursor::default();
        let mut moved = 0;
        for _ in 0..1000 {
            moved += q.sweep_orphans(&mut cursor).await.expect("sweep");
            if cursor.at_start() {
                return moved;
            }
        }
        panic!("the sweep never finished a pass");
    }
    assert_eq!(full_sweep(&q).await, 1, "only the lease-less list is swept");
    let stats = q.stats().await.expect("stats");
    assert_eq!((stats.waiting, stats.in_flight), (1, 1), "{stats:?}");
    let stranded = q.job("stranded").await.expect("job").expect("still known");
    assert_eq!(stranded.attempts, 0, "no attempt counted");

    // Once the lease expires, the sweep still leaves it to the reaper.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(full_sweep(&q).await, 0);
    assert_eq!(q.reap_expired().await.expect("reap"), 1);
    let reaped = q.job("held").await.expect("job").expect("still known");
    assert_eq!(
        reaped.attempts, 1,
        "a consumer dying mid-job counts an attempt"
    );
    let stats = q.stats().await.expect("stats");
    assert_eq!((stats.waiting, stats.in_flight), (2, 0), "{stats:?}");
}

/// Guards against the worker loop spinning for ever once its shutdown sender
/// is gone: `changed()` then fails at once on every turn, and the loop used
/// to go round again instead of stopping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_shutdown_sender_is_gone_stops() {
    let q = queue(quick());
    wait_connected(&q).await;
    let (stop, stopped) = betting_shutdown::channel();
    let worker = Worker::new(
        q.clone(),
        betting_queue::connect(&redis_url()).expect("redis"),
        WorkerSettings {
            poll: Duration::from_millis(50),
            ..WorkerSettings::default()
        },
    )
    .expect("worker settings");
    let running = tokio::spawn(worker.run(Record::new(), stopped));
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(stop);
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("the worker stops")
        .expect("worker task");
    assert_eq!(q.stats().await.expect("stats").consumers, 0, "it left");
}
