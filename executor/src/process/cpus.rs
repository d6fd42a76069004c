//! Which CPU a pinned sandbox runs on (`pin_cpu = true`).
//!
//! A call crosses processes four times: host to agent (pipe), agent to the
//! runtime (its Runtime API request), back, and agent to host. When the
//! two ends of a hop run on different CPUs, the waker has to wake the other
//! CPU, and on machines where that is dear (virtual machines, above all
//! nested or software virtualization such as PVM, where an idle vCPU halts
//! into the hypervisor) those wake-ups are most of a warm call's latency:
//! on the 2-core PVM development machine a pipe round trip between two
//! threads takes about 67 µs across CPUs and 2 µs on one, and a warm
//! `sluice bench invoke` call about 220 µs against about 100 µs with its
//! sandbox pinned (ARCHITECTURE.md, "Throughput: where the time goes").
//!
//! Pinning keeps the agent and the runtime, which take turns, on one CPU,
//! so two of the four hops stay on it. The price is that the scheduler can
//! no longer move a busy sandbox off a busy CPU, so it is a function's
//! choice, not a default: sandboxes are spread by placing each on the
//! least used of the CPUs sluice itself may run on (its affinity mask at
//! start, so a container's cpuset is respected), lowest number first.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

/// The CPUs sandboxes may be pinned to, and how many pinned sandboxes each
/// holds now.
#[derive(Debug)]
pub struct CpuPlacer {
    /// (CPU number, sandboxes pinned to it).
    cpus: Mutex<Vec<(usize, u32)>>,
}

/// One sandbox's place on a CPU, given back when dropped.
#[derive(Debug)]
pub struct CpuLease {
    placer: Arc<CpuPlacer>,
    cpu: usize,
}

impl CpuLease {
    /// The CPU number.
    pub fn cpu(&self) -> usize {
        self.cpu
    }
}

impl Drop for CpuLease {
    fn drop(&mut self) {
        let mut cpus = self.placer.lock();
        if let Some(slot) = cpus.iter_mut().find(|(c, _)| *c == self.cpu) {
            slot.1 = slot.1.saturating_sub(1);
        }
    }
}

impl CpuPlacer {
    /// A placer over `cpus` (CPU numbers; duplicates are ignored).
    pub fn new(cpus: impl IntoIterator<Item = usize>) -> Self {
        let mut list: Vec<(usize, u32)> = cpus.into_iter().map(|c| (c, 0)).collect();
        list.sort_unstable();
        list.dedup_by_key(|(c, _)| *c);
        Self {
            cpus: Mutex::new(list),
        }
    }

    /// A placer over the CPUs this process may run on, or `None` when they
    /// cannot be read.
    pub fn from_affinity() -> Option<Self> {
        let set = sched_getaffinity(Pid::from_raw(0)).ok()?;
        let cpus: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect();
        (!cpus.is_empty()).then(|| Self::new(cpus))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(usize, u32)>> {
        // A panic while holding the lock cannot leave the counts torn.
        self.cpus.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a place on the least used CPU (the lowest numbered of equals).
    pub fn place(self: &Arc<Self>) -> Option<CpuLease> {
        let mut cpus = self.lock();
        let slot = cpus.iter_mut().min_by_key(|(c, n)| (*n, *c))?;
        slot.1 += 1;
        Some(CpuLease {
            placer: self.clone(),
            cpu: slot.0,
        })
    }

    /// Sandboxes pinned to each CPU now, by CPU number.
    pub fn load(&self) -> Vec<(usize, u32)> {
        self.lock().clone()
    }
}

/// Restricts process (thread) `pid` to `cpu`. Threads and processes it
/// starts afterwards inherit that.
pub(crate) fn pin(pid: u32, cpu: usize) -> nix::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    let pid = i32::try_from(pid).map_err(|_| nix::Error::EINVAL)?;
    sched_setaffinity(Pid::from_raw(pid), &set)
}

/// What waking a thread costs on this machine: the mean round trip of a
/// one-byte ping-pong over two pipes between two threads, on two CPUs and on
/// one (what `sluice doctor` shows, to tell whether `pin_cpu` is worth
/// measuring).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WakeCost {
    /// The threads on two different CPUs.
    pub across: Duration,
    /// Both threads on one CPU.
    pub same: Duration,
}

impl WakeCost {
    /// Whether waking another CPU is dear enough here that pinning
    /// sandboxes is likely to shorten small calls: a cross-CPU round trip
    /// at least 10 µs and four times one on a single CPU (about 67 µs
    /// against 2 µs on the PVM development machine, where pinning halved a
    /// warm call's latency).
    pub fn pinning_helps(&self) -> bool {
        self.across >= Duration::from_micros(10) && self.across >= self.same * 4
    }
}

/// Measures [`WakeCost`] over `rounds` round trips each way, on the first
/// two CPUs this process may use; `None` with fewer than two, or when the
/// threads cannot be pinned.
pub fn measure_wake_cost(rounds: u32) -> Option<WakeCost> {
    let cpus: Vec<usize> = CpuPlacer::from_affinity()?
        .load()
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    let (&a, &b) = (cpus.first()?, cpus.get(1)?);
    let rounds = rounds.max(1);
    Some(WakeCost {
        across: ping_pong(a, b, rounds).ok()? / rounds,
        same: ping_pong(a, a, rounds).ok()? / rounds,
    })
}

/// `rounds` one-byte round trips between a thread on CPU `a` and one on
/// CPU `b`: their total time. Both are threads of their own, so the
/// caller's affinity is left alone.
fn ping_pong(a: usize, b: usize, rounds: u32) -> std::io::Result<Duration> {
    let (to_echo, echo_in) = nix::unistd::pipe()?;
    let (back, echo_out) = nix::unistd::pipe()?;
    let pinned = |cpu: usize| pin(0, cpu).map_err(std::io::Error::from);
    let echo = std::thread::Builder::new().name("wake-echo".into()).spawn(
        move || -> std::io::Result<()> {
            pinned(b)?;
            let (mut input, mut output) = (File::from(to_echo), File::from(echo_out));
            let mut byte = [0u8];
            for _ in 0..rounds {
                input.read_exact(&mut byte)?;
                output.write_all(&byte)?;
            }
            Ok(())
        },
    )?;
    let ping = std::thread::Builder::new().name("wake-ping".into()).spawn(
        move || -> std::io::Result<Duration> {
            pinned(a)?;
            let (mut output, mut input) = (File::from(echo_in), File::from(back));
            let mut byte = [1u8];
            let started = Instant::now();
            for _ in 0..rounds {
                output.write_all(&byte)?;
                input.read_exact(&mut byte)?;
            }
            Ok(started.elapsed())
        },
    )?;
    // A failed side closes its pipe ends, so the other fails too.
    let took = ping
        .join()
        .map_err(|_| std::io::Error::other("ping thread panicked"))?;
    echo.join()
        .map_err(|_| std::io::Error::other("echo thread panicked"))??;
    took
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandboxes_go_to_the_least_used_cpu_and_give_it_back() {
        let placer = Arc::new(CpuPlacer::new([3, 1, 1]));
        let a = placer.place().unwrap();
        let b = placer.place().unwrap();
        let c = placer.place().unwrap();
        assert_eq!((a.cpu(), b.cpu(), c.cpu()), (1, 3, 1));
        assert_eq!(placer.load(), vec![(1, 2), (3, 1)]);
        drop(b);
        assert_eq!(placer.place().unwrap().cpu(), 3);
        drop((a, c));
        assert_eq!(placer.load(), vec![(1, 0), (3, 0)]);
        assert!(Arc::new(CpuPlacer::new([])).place().is_none());
    }

    #[test]
    fn wake_costs_are_measured_where_there_are_two_cpus() {
        let cpus = CpuPlacer::from_affinity()
            .expect("this process's CPUs")
            .load();
        let cost = measure_wake_cost(200);
        assert_eq!(cost.is_some(), cpus.len() >= 2, "{cpus:?}: {cost:?}");
        if let Some(c) = cost {
            assert!(
                c.across > Duration::ZERO && c.same > Duration::ZERO,
                "{c:?}"
            );
        }
        let dear = WakeCost {
            across: Duration::from_micros(28),
            same: Duration::from_micros(2),
        };
        assert!(dear.pinning_helps());
        let cheap = WakeCost {
            across: Duration::from_micros(6),
            same: Duration::from_micros(2),
        };
        assert!(!cheap.pinning_helps());
    }

    #[test]
    fn the_process_affinity_is_read() {
        let placer = CpuPlacer::from_affinity().expect("this process's CPUs");
        assert!(!placer.load().is_empty());
    }
}
