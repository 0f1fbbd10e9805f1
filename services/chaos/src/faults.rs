//! The seeded fault schedule: which fault, to whom, when. The same seed
//! and duration always give the same schedule, so a failing run replays.

use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
use serde::Serialize;

use crate::supervise::Kind;

/// Which link a link fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkName {
    /// Between the betting and settler processes and WalletService.
    Wallet,
    /// Between every process and Redis.
    Redis,
}

/// What a link fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkFault {
    /// Every chunk waits: calls slow down past their deadlines.
    Delay { ms: u64 },
    /// Nothing gets through for a while: calls time out, some after their
    /// effect committed.
    Hold,
    /// Every open connection is closed.
    Cut,
}

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "fault", rename_all = "snake_case")]
pub enum Fault {
    /// SIGKILL, then a restart.
    Kill { kind: Kind, index: usize },
    /// SIGSTOP for longer than the queue's visibility timeout, then SIGCONT:
    /// a zombie that wakes up holding jobs others have taken over.
    Zombie { kind: Kind, index: usize },
    /// SIGTERM (the drain), then a restart: a rolling deploy.
    Restart { kind: Kind, index: usize },
    /// Redis killed and restarted empty.
    RedisRestart,
    /// PostgreSQL stopped with `-m immediate`, then restarted.
    PostgresRestart,
    /// A link fault, healed after `ms` (a cut is instant).
    Link {
        link: LinkName,
        what: LinkFault,
        ms: u64,
    },
}

impl Fault {
    /// The report's name of the fault's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Kill { kind, .. } if kind.is_api() => "api kill",
            Fault::Kill { .. } => "worker kill",
            Fault::Zombie { .. } => "zombie worker",
            Fault::Restart { .. } => "graceful restart",
            Fault::RedisRestart => "redis restart",
            Fault::PostgresRestart => "postgres restart",
            Fault::Link {
                what: LinkFault::Cut,
                ..
            } => "link cut",
            Fault::Link {
                what: LinkFault::Hold,
                ..
            } => "link hold",
            Fault::Link {
                what: LinkFault::Delay { .. },
                ..
            } => "link delay",
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Kill { kind, index } => write!(f, "SIGKILL {}-{index}", kind.role()),
            Fault::Zombie { kind, index } => write!(f, "SIGSTOP {}-{index}", kind.role()),
            Fault::Restart { kind, index } => write!(f, "SIGTERM {}-{index}", kind.role()),
            Fault::RedisRestart => write!(f, "Redis restarted empty"),
            Fault::PostgresRestart => write!(f, "PostgreSQL stopped -m immediate"),
            Fault::Link { link, what, ms } => write!(f, "{link:?} link {what:?} for {ms} ms"),
        }
    }
}

/// A fault and when it starts, from the start of the load.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Planned {
    pub at_ms: u64,
    #[serde(flatten)]
    pub fault: Fault,
}

/// How many processes of each kind the suite runs.
#[derive(Debug, Clone, Copy)]
pub struct Topology {
    pub betting: usize,
    pub matchers: usize,
    pub settlers: usize,
}

impl Topology {
    pub const fn standard() -> Self {
        Self {
            betting: 2,
            matchers: 2,
            settlers: 2,
        }
    }

    fn count(&self, kind: Kind) -> usize {
        match kind {
            Kind::Wallet | Kind::Settlement => 1,
            Kind::Betting => self.betting,
            Kind::Matcher => self.matchers,
            Kind::Settler => self.settlers,
        }
    }
}

const WORKERS: [Kind; 2] = [Kind::Matcher, Kind::Settler];
const APIS: [Kind; 3] = [Kind::Wallet, Kind::Betting, Kind::Settlement];
const ALL: [Kind; 5] = [
    Kind::Wallet,
    Kind::Betting,
    Kind::Settlement,
    Kind::Matcher,
    Kind::Settler,
];

/// The schedule of a run of `duration`: at least a few of each fault (the
/// long run's minimums scale with its length: one worker kill per 22 s, an
/// API kill per 90 s, a zombie per 180 s, a Redis restart per 300 s, a
/// PostgreSQL restart per 450 s, so 15 minutes give 40, 10, 5, 3 and 2),
/// spread evenly with jitter between a warm-up and a quiet tail.
pub fn plan(seed: u64, duration: Duration, topology: Topology) -> Vec<Planned> {
    let mut rng = StdRng::seed_from_u64(seed);
    let secs = duration.as_secs().max(10);
    let at_least = |per: u64, min: u64| (secs / per).max(min) as usize;
    let mut bag: Vec<Fault> = Vec::new();
    let pick = |rng: &mut StdRng, kinds: &[Kind]| {
        let kind = kinds[rng.random_range(0..kinds.len())];
        (kind, rng.random_range(0..topology.count(kind)))
    };
    // Every kind of process is killed at least once.
    for kind in ALL {
        let index = rng.random_range(0..topology.count(kind));
        bag.push(Fault::Kill { kind, index });
    }
    for _ in 0..at_least(22, 2).saturating_sub(2) {
        let (kind, index) = pick(&mut rng, &WORKERS);
        bag.push(Fault::Kill { kind, index });
    }
    for _ in 0..at_least(90, 3).saturating_sub(3) {
        let (kind, index) = pick(&mut rng, &APIS);
        bag.push(Fault::Kill { kind, index });
    }
    for _ in 0..at_least(180, 1) {
        let (kind, index) = pick(&mut rng, &WORKERS);
        bag.push(Fault::Zombie { kind, index });
    }
    for _ in 0..at_least(90, 2) {
        let (kind, index) = pick(&mut rng, &ALL);
        bag.push(Fault::Restart { kind, index });
    }
    for _ in 0..at_least(300, 1) {
        bag.push(Fault::RedisRestart);
    }
    for _ in 0..at_least(450, 1) {
        bag.push(Fault::PostgresRestart);
    }
    let link = |rng: &mut StdRng, what: LinkFault| Fault::Link {
        link: if rng.random_bool(0.6) {
            LinkName::Wallet
        } else {
            LinkName::Redis
        },
        what,
        ms: match what {
            LinkFault::Cut => 0,
            _ => rng.random_range(1_000..4_000),
        },
    };
    for what in [LinkFault::Hold, LinkFault::Delay { ms: 0 }, LinkFault::Cut] {
        for _ in 0..at_least(90, 1) {
            let what = match what {
                LinkFault::Delay { .. } => LinkFault::Delay {
                    ms: rng.random_range(200..1_500),
                },
                other => other,
            };
            bag.push(link(&mut rng, what));
        }
    }
    bag.shuffle(&mut rng);

    // Evenly spread from 3 s in to 5 s before the end, each jittered by up
    // to a third of the spacing.
    let start = 3_000u64.min(secs * 1000 / 4);
    let end = (secs * 1000).saturating_sub(5_000).max(start + 1);
    let spacing = (end - start) / bag.len().max(1) as u64;
    let mut planned: Vec<Planned> = bag
        .into_iter()
        .enumerate()
        .map(|(i, fault)| {
            let jitter = if spacing >= 3 {
                rng.random_range(0..spacing / 3)
            } else {
                0
            };
            Planned {
                at_ms: start + i as u64 * spacing + jitter,
                fault,
            }
        })
        .collect();
    // A hold or a delay ends with the link healed (pass), so one must end
    // before the next hold or delay of its link begins: otherwise the second
    // replaces the first's mode and the first's heal ends the second early,
    // while the log says both ran their length. Shorten the earlier one.
    for i in 0..planned.len() {
        let Fault::Link { link, what, ms } = planned[i].fault else {
            continue;
        };
        if what == LinkFault::Cut {
            continue;
        }
        let next = planned[i + 1..].iter().find_map(|p| match p.fault {
            Fault::Link {
                link: l, what: w, ..
            } if l == link && w != LinkFault::Cut => Some(p.at_ms),
            _ => None,
        });
        if let Some(next) = next {
            let room = (next - planned[i].at_ms).saturating_sub(100);
            planned[i].fault = Fault::Link {
                link,
                what,
                ms: ms.min(room),
            };
        }
    }
    planned
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(plan: &[Planned], kind: &str) -> usize {
        plan.iter().filter(|p| p.fault.kind() == kind).count()
    }

    #[test]
    fn a_seed_replays_its_schedule() {
        let a = plan(7, Duration::from_secs(75), Topology::standard());
        let b = plan(7, Duration::from_secs(75), Topology::standard());
        let c = plan(8, Duration::from_secs(75), Topology::standard());
        let text = |p: &[Planned]| format!("{p:?}");
        assert_eq!(text(&a), text(&b));
        assert_ne!(text(&a), text(&c));
    }

    #[test]
    fn the_short_run_has_a_few_of_each() {
        let p = plan(1, Duration::from_secs(75), Topology::standard());
        for kind in [
            "api kill",
            "worker kill",
            "zombie worker",
            "graceful restart",
            "redis restart",
            "postgres restart",
            "link cut",
            "link hold",
            "link delay",
        ] {
            assert!(count(&p, kind) >= 1, "no {kind} in {p:#?}");
        }
        // Every kind of process is killed.
        for kind in ALL {
            assert!(
                p.iter()
                    .any(|x| matches!(x.fault, Fault::Kill { kind: k, .. } if k == kind)),
                "{kind:?} never killed"
            );
        }
        assert!(p.windows(2).all(|w| w[0].at_ms < w[1].at_ms));
        assert!(p.last().is_some_and(|x| x.at_ms <= 70_000));
    }

    /// A hold or a delay sets the link's mode and heals it (back to pass)
    /// when its time is up, so two of them overlapping on one link cut each
    /// other short: the second replaces the first's mode, and the first's
    /// heal ends the second early, while the fault log and `lasted_ms` say
    /// both ran their full length. The schedule must not overlap them.
    #[test]
    fn link_faults_on_one_link_never_overlap() {
        let mut overlaps = Vec::new();
        for seconds in [40, 60, 75, 900] {
            for seed in 0..300 {
                let p = plan(seed, Duration::from_secs(seconds), Topology::standard());
                let mut busy_until = [0u64; 2];
                for x in &p {
                    if let Fault::Link { link, what, ms } = x.fault
                        && what != LinkFault::Cut
                    {
                        let i = link as usize;
                        if x.at_ms < busy_until[i] {
                            overlaps.push(format!("seed {seed}, {seconds} s: {x:?}"));
                        }
                        busy_until[i] = x.at_ms + ms;
                    }
                }
            }
        }
        assert!(
            overlaps.is_empty(),
            "{} overlapping link faults, e.g. {:?}",
            overlaps.len(),
            overlaps.first()
        );
    }

    #[test]
    fn the_long_run_meets_its_minimums() {
        let p = plan(1, Duration::from_secs(15 * 60), Topology::standard());
        assert!(count(&p, "worker kill") >= 40);
        assert!(count(&p, "api kill") >= 10);
        assert!(count(&p, "zombie worker") >= 5);
        assert!(count(&p, "redis restart") >= 3);
        assert!(count(&p, "postgres restart") >= 2);
    }
}
