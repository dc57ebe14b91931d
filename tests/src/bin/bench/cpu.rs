//! CPU time as the kernel accounts it (`/proc`), for the benchmarks that count a host's CPU
//! apart: one parser of `/proc/stat`'s per-CPU lines and one tick-to-time conversion.

use std::fs;

/// One CPU's line of `/proc/stat`, in ticks (`USER_HZ`).
pub struct CpuTicks {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub irq: u64,
    pub softirq: u64,
    /// Time the hypervisor ran something else while this CPU wanted to run.
    pub steal: u64,
}

impl CpuTicks {
    /// CPU `cpu`'s ticks so far.
    pub fn of(cpu: usize) -> Self {
        let stat = fs::read_to_string("/proc/stat").expect("/proc/stat");
        let name = format!("cpu{cpu}");
        let line = stat.lines().find(|l| l.split_whitespace().next() == Some(name.as_str())).unwrap_or_else(|| panic!("no {name} in /proc/stat"));
        let v: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
        // user nice system idle iowait irq softirq steal ...
        let f = |i: usize| v.get(i).copied().unwrap_or(0);
        Self { user: f(0), nice: f(1), system: f(2), irq: f(5), softirq: f(6), steal: f(7) }
    }

    /// Ticks the CPU spent working here (user, nice, system, irq, softirq).
    pub fn busy(&self) -> u64 {
        self.user + self.nice + self.system + self.irq + self.softirq
    }
}

/// `ticks` of `USER_HZ` in ms.
pub fn ticks_ms(ticks: u64) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    #[expect(clippy::cast_precision_loss, reason = "ticks are small")]
    let ms = ticks as f64 * 1000.0 / hz as f64;
    ms
}

/// Process `pid`'s user + system time so far, ms.
pub fn process_ms(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    // Fields after the command name (which may hold spaces): state is field 3; utime 14, stime 15.
    let rest = &stat[stat.rfind(')').expect("stat") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    ticks_ms(f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime"))
}

/// This process's user + system time so far, in seconds, to the microsecond (`getrusage`):
/// finer than [`process_ms`]'s ticks, for a few milliseconds of CPU spread over many tasks.
pub fn own_seconds() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let u = unsafe {
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()), 0, "getrusage");
        u.assume_init()
    };
    #[expect(clippy::cast_precision_loss, reason = "seconds and microseconds of a run")]
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}
