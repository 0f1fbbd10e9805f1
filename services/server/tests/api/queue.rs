//! The queue's settings as the server checks them at start-up. The queue's
//! own tests are in `services/queue/tests`; this one builds the server's
//! [`Settings`](betting_config::Settings) and [`Application`](betting_server::Application)
//! as well, which the queue crate does not know.

use std::time::Duration;

use betting_queue::{QueueSettings, Worker, WorkerSettings};
use betting_test_kit::redis_url;

fn quick() -> QueueSettings {
    QueueSettings {
        max_attempts: 3,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(40),
        visibility_timeout: Duration::from_millis(300),
    }
}

fn queue(settings: QueueSettings) -> betting_queue::Queue {
    let client = betting_queue::connect(&redis_url()).expect("redis");
    betting_queue::Queue::new(
        client,
        &format!("t-{}", uuid::Uuid::new_v4().simple()),
        "q",
        settings,
    )
}

/// Guards against a visibility timeout too short for the fetch poll: a worker
/// heartbeats from the loop that fetches, so its heartbeat can come a whole
/// poll late, and under such a lease the reaper took live consumers' jobs.
#[tokio::test]
async fn a_visibility_timeout_too_short_for_the_poll_is_refused() {
    let q = queue(quick());
    let blocking = betting_queue::connect(&redis_url()).expect("redis");
    let refused = Worker::new(
        q.clone(),
        blocking.clone(),
        WorkerSettings {
            poll: Duration::from_millis(100),
            ..WorkerSettings::default()
        },
    )
    .err()
    .expect("a 300 ms lease with a 100 ms poll is refused");
    let message = refused.to_string();
    assert!(
        message.contains("visibility timeout of 300ms is too short for a 100ms poll")
            && message.contains("use at least 600ms"),
        "{message}"
    );
    Worker::new(
        q,
        blocking,
        WorkerSettings {
            poll: Duration::from_millis(50),
            ..WorkerSettings::default()
        },
    )
    .expect("six polls fit in the lease");

    // The server checks its setting against the default poll at start-up.
    let mut s = betting_test_kit::settings("postgres://127.0.0.1:1/unused", &redis_url());
    s.queue_visibility_ms = 1000;
    let refused = s
        .validate()
        .expect_err("a 1 s lease with the 1 s default poll is refused");
    assert!(
        refused
            .to_string()
            .starts_with("BETTING_QUEUE_VISIBILITY_MS must be at least 6000:"),
        "{refused}"
    );
    let refused = betting_server::Application::build(s.clone())
        .await
        .err()
        .expect("the server does not start");
    assert!(
        refused.to_string().contains("BETTING_QUEUE_VISIBILITY_MS"),
        "{refused}"
    );
    s.queue_visibility_ms = 6000;
    s.validate().expect("six polls are enough");
}
