//! Carrying out one fault, start to end: a kill is followed by a restart, a
//! zombie is woken after the visibility timeout, a link is healed, a server
//! comes back. Each returns once the fault is over; recovery is measured
//! from then.

use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::{
    cluster::{Cluster, VISIBILITY},
    faults::{Fault, LinkFault},
    link::Mode,
    supervise::wait_serving,
};

/// How long a restarted process gets to serve again.
const RESTART_TIMEOUT: Duration = Duration::from_secs(60);

/// Carries out `fault`; `seed` draws its pauses.
pub async fn inject(cluster: &Cluster, fault: Fault, seed: u64) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    match fault {
        Fault::Kill { kind, index } => {
            let slot = cluster
                .slot(kind, index)
                .ok_or_else(|| anyhow::anyhow!("no {kind:?}-{index}"))?;
            let mut process = slot.process.lock().await;
            cluster.reap_unexpected(&mut process);
            process.kill();
            // Down for a moment, as a crash-looping pod is.
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..1_500))).await;
            process.start()?;
            drop(process);
            wait_serving(slot.port, RESTART_TIMEOUT).await
        }
        Fault::Zombie { kind, index } => {
            let slot = cluster
                .slot(kind, index)
                .ok_or_else(|| anyhow::anyhow!("no {kind:?}-{index}"))?;
            let mut process = slot.process.lock().await;
            cluster.reap_unexpected(&mut process);
            process.freeze()?;
            // Past the lease: its jobs go to the others meanwhile.
            let frozen = VISIBILITY + Duration::from_millis(rng.random_range(1_000..4_000));
            tokio::time::sleep(frozen).await;
            process.thaw()?;
            if !process.alive() {
                // It had exited by itself (recorded): a supervisor restarts it.
                process.start()?;
            }
            drop(process);
            wait_serving(slot.port, RESTART_TIMEOUT).await
        }
        Fault::Restart { kind, index } => {
            let slot = cluster
                .slot(kind, index)
                .ok_or_else(|| anyhow::anyhow!("no {kind:?}-{index}"))?;
            let mut process = slot.process.lock().await;
            // The drain gets its grace (BETTING_SHUTDOWN_GRACE_SECS) and a
            // margin; an exit before it or a SIGKILL after it is recorded.
            cluster.terminate(&mut process).await;
            process.start()?;
            drop(process);
            wait_serving(slot.port, RESTART_TIMEOUT).await
        }
        Fault::RedisRestart => cluster.redis.lock().await.restart_empty(),
        Fault::PostgresRestart => {
            let pg = &cluster.pg;
            tokio::task::block_in_place(|| pg.stop_immediate())?;
            tokio::time::sleep(Duration::from_millis(rng.random_range(500..3_000))).await;
            tokio::task::block_in_place(|| pg.start())
        }
        Fault::Link { link, what, ms } => {
            let link = cluster.link(link);
            match what {
                LinkFault::Cut => link.cut(),
                LinkFault::Hold => {
                    link.set(Mode::Hold);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    link.heal();
                }
                LinkFault::Delay { ms: delay } => {
                    link.set(Mode::Delay(Duration::from_millis(delay)));
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    link.heal();
                }
            }
            Ok(())
        }
    }
}
