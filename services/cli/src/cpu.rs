//! CPU time per process tree, read from Linux's `/proc`, for the benchmarks'
//! "what bounds it": `--cpu server=PID --cpu postgres=PID` names the roots,
//! and a [`CpuWatch`] reports each tree's CPU seconds over a window (the
//! load generator's own process is always included, as `bench`).
//!
//! A tree is the root and every live descendant, plus what the root has
//! reaped (its `cutime`/`cstime`): PostgreSQL's backends are children of the
//! postmaster, and one that exits during the window is still counted.

use std::{collections::BTreeMap, time::Instant};

use serde::Serialize;

/// Clock ticks per second of `/proc/<pid>/stat`'s times: `USER_HZ`, 100 on
/// every Linux architecture the suite builds for.
const TICKS_PER_SECOND: f64 = 100.0;

/// One process's line of `/proc/<pid>/stat`, the parts we use.
struct Stat {
    parent: u32,
    /// utime + stime.
    own: u64,
    /// cutime + cstime: children waited for.
    reaped: u64,
}

fn read_all() -> BTreeMap<u32, Stat> {
    let mut stats = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return stats;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The command name is in parentheses and may hold spaces: split after it.
        let Some((_, rest)) = text.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        // After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
        if let (Some(parent), Some(u), Some(s), Some(cu), Some(cs)) =
            (field(1), field(11), field(12), field(13), field(14))
        {
            stats.insert(
                pid,
                Stat {
                    parent: parent as u32,
                    own: u + s,
                    reaped: cu + cs,
                },
            );
        }
    }
    stats
}

fn tree_ticks(stats: &BTreeMap<u32, Stat>, root: u32) -> u64 {
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            stats
                .iter()
                .filter(|(_, s)| s.parent == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    let reaped = stats.get(&root).map_or(0, |s| s.reaped);
    reaped
        + tree
            .iter()
            .filter_map(|pid| stats.get(pid))
            .map(|s| s.own)
            .sum::<u64>()
}

/// Parses `NAME=PID`.
pub(crate) fn parse_root(spec: &str) -> Result<(String, u32), String> {
    let (name, pid) = spec
        .split_once('=')
        .ok_or_else(|| format!("{spec:?} is not NAME=PID"))?;
    let pid = pid
        .parse()
        .map_err(|_| format!("{pid:?} is not a process id"))?;
    Ok((name.to_owned(), pid))
}

/// Each tree's CPU over a window.
pub(crate) struct CpuWatch {
    roots: Vec<(String, u32)>,
    before: Vec<u64>,
    started: Instant,
}

/// What a window used.
#[derive(Serialize, Debug, Clone)]
pub(crate) struct CpuUse {
    /// The window's length.
    pub wall_s: f64,
    /// The machine's cores.
    pub cores: usize,
    /// Per tree: CPU seconds in the window.
    pub cpu_s: BTreeMap<String, f64>,
}

impl CpuWatch {
    pub(crate) fn start(roots: &[(String, u32)]) -> Self {
        let mut roots = roots.to_vec();
        roots.push(("bench".to_owned(), std::process::id()));
        let stats = read_all();
        let before = roots
            .iter()
            .map(|(_, pid)| tree_ticks(&stats, *pid))
            .collect();
        Self {
            roots,
            before,
            started: Instant::now(),
        }
    }

    pub(crate) fn finish(self) -> CpuUse {
        let stats = read_all();
        let cpu_s = self
            .roots
            .iter()
            .zip(&self.before)
            .map(|((name, pid), before)| {
                let used = tree_ticks(&stats, *pid).saturating_sub(*before);
                (name.clone(), used as f64 / TICKS_PER_SECOND)
            })
            .collect();
        CpuUse {
            wall_s: self.started.elapsed().as_secs_f64(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_s,
        }
    }
}

impl std::fmt::Display for CpuUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let capacity = self.wall_s * self.cores as f64;
        let parts: Vec<String> = self
            .cpu_s
            .iter()
            .map(|(name, s)| format!("{name} {s:.1} s ({:.0} %)", 100.0 * s / capacity))
            .collect();
        write!(
            f,
            "{} of {} cores x {:.1} s",
            parts.join(", "),
            self.cores,
            self.wall_s
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_roots() {
        assert_eq!(parse_root("server=42"), Ok(("server".to_owned(), 42)));
        assert!(parse_root("server").is_err());
        assert!(parse_root("server=x").is_err());
    }

    #[test]
    fn counts_its_own_cpu() {
        let watch = CpuWatch::start(&[]);
        // Burn a little CPU in this process, enough for a few ticks.
        let until = Instant::now() + std::time::Duration::from_millis(100);
        let mut x = 0u64;
        while Instant::now() < until {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let used = watch.finish();
        let own = used.cpu_s["bench"];
        assert!(own > 0.0, "no CPU counted for a busy loop: {used:?}");
        assert!(own <= used.wall_s * used.cores as f64 + 0.02, "{used:?}");
    }
}
