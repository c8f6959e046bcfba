//! CPU time, memory and thread counts read from /proc (Linux), for the tool itself and for the
//! server given by `--server-pid`. Every reader returns `None` where /proc cannot tell.

use serde_json::{Value, json};

/// Clock ticks per second of /proc/PID/stat's utime and stime (USER_HZ: 100 on every Linux ABI).
const USER_HZ: f64 = 100.0;

/// user + system CPU seconds of process `pid` ("self" for this one), all its threads included.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// Busy CPU seconds of the whole machine, all cores (/proc/stat: user, nice, system, irq,
/// softirq, steal), so that CPU used by other processes during a run shows.
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user)
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7).unwrap_or(&0);
    Some(busy as f64 / USER_HZ)
}

/// A `Key:   123 kB` line of /proc/PID/status ("VmRSS", "Threads", ...), as a number.
pub fn status_field(pid: &str, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    field(&status, key)
}

/// A field of /proc/meminfo ("KernelStack", ...), in kB.
pub fn meminfo_kb(key: &str) -> Option<u64> {
    field(&std::fs::read_to_string("/proc/meminfo").ok()?, key)
}

fn field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        if k.trim() != key {
            return None;
        }
        v.split_whitespace().next()?.parse().ok()
    })
}

/// CPU use of the tool and (optionally) the server between two instants.
#[derive(Clone, Copy)]
pub struct CpuMark {
    pub tool: Option<f64>,
    pub server: Option<f64>,
    pub machine: Option<f64>,
    /// When the mark was taken (ns on the tool's clock).
    pub at: u64,
}

impl CpuMark {
    pub fn now(server_pid: Option<u32>) -> CpuMark {
        CpuMark {
            at: crate::conn::now_ns(),
            tool: cpu_seconds("self"),
            server: server_pid.and_then(|p| cpu_seconds(&p.to_string())),
            machine: machine_busy_seconds(),
        }
    }
}

pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// JSON and a human line for the CPU spent between `a` and `b` over `wall` seconds.
pub fn cpu_report(a: CpuMark, b: CpuMark) -> (Value, String) {
    let wall = b.at.saturating_sub(a.at) as f64 / 1e9;
    let diff = |x: Option<f64>, y: Option<f64>| Some(y? - x?);
    let tool = diff(a.tool, b.tool);
    let server = diff(a.server, b.server);
    let machine = diff(a.machine, b.machine);
    // What neither the tool nor the server used: other processes (and interrupt work charged to
    // no process). Large values mean the figures are disturbed.
    let others = match (machine, tool) {
        (Some(m), Some(t)) => Some((m - t - server.unwrap_or(0.0)).max(0.0)),
        _ => None,
    };
    let share = |s: Option<f64>| s.map(|s| if wall > 0.0 { s / wall } else { 0.0 });
    let r3 = |x: Option<f64>| x.map(|x| (x * 1000.0).round() / 1000.0);
    let json = json!({
        "wall_s": r3(Some(wall)),
        "cores": cores(),
        "tool_s": r3(tool),
        "tool_cores": r3(share(tool)),
        "server_s": r3(server),
        "server_cores": r3(share(server)),
        "machine_busy_cores": r3(share(machine)),
        "other_cores": r3(share(others)),
    });
    let fmt = |name: &str, s: Option<f64>| match s {
        Some(s) => format!("{name} {:.2}", share(Some(s)).unwrap_or(0.0)),
        None => format!("{name} n/a"),
    };
    let human = format!(
        "cores used: {}, {}, {} (machine busy {:.2} of {}) over {wall:.2}s",
        fmt("tool", tool),
        if server.is_some() {
            fmt("server", server)
        } else {
            "server n/a (--server-pid)".into()
        },
        if server.is_some() {
            fmt("others", others)
        } else {
            fmt("others+server", others)
        },
        share(machine).unwrap_or(0.0),
        cores()
    );
    (json, human)
}

/// Server-side memory figures (kB) and thread count at one instant.
#[derive(Clone, Copy, Default)]
pub struct MemMark {
    pub server_rss_kb: Option<u64>,
    pub server_threads: Option<u64>,
    pub kernel_stack_kb: Option<u64>,
    pub tool_rss_kb: Option<u64>,
    pub tool_threads: Option<u64>,
}

impl MemMark {
    pub fn now(server_pid: Option<u32>) -> MemMark {
        let pid = server_pid.map(|p| p.to_string());
        MemMark {
            server_rss_kb: pid.as_deref().and_then(|p| status_field(p, "VmRSS")),
            server_threads: pid.as_deref().and_then(|p| status_field(p, "Threads")),
            kernel_stack_kb: meminfo_kb("KernelStack"),
            tool_rss_kb: status_field("self", "VmRSS"),
            tool_threads: status_field("self", "Threads"),
        }
    }

    pub fn json(&self) -> Value {
        json!({
            "server_rss_kb": self.server_rss_kb,
            "server_threads": self.server_threads,
            "kernel_stack_kb": self.kernel_stack_kb,
            "tool_rss_kb": self.tool_rss_kb,
            "tool_threads": self.tool_threads,
        })
    }
}

/// Waits (at most `limit`) until the server's thread count and RSS have not changed for 500 ms,
/// so that "before" figures are not taken while an earlier run's connections are still being
/// torn down. Returns how long it waited.
pub fn settle(server_pid: Option<u32>, limit: std::time::Duration) -> std::time::Duration {
    let started = std::time::Instant::now();
    let Some(pid) = server_pid.map(|p| p.to_string()) else {
        return std::time::Duration::ZERO;
    };
    let sample = || (status_field(&pid, "Threads"), status_field(&pid, "VmRSS"));
    let mut last = sample();
    let mut stable_since = std::time::Instant::now();
    while started.elapsed() < limit {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = sample();
        if now != last {
            last = now;
            stable_since = std::time::Instant::now();
        } else if stable_since.elapsed() >= std::time::Duration::from_millis(500) {
            break;
        }
    }
    started.elapsed()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_proc() {
        assert!(super::cpu_seconds("self").is_some());
        assert!(super::status_field("self", "VmRSS").unwrap() > 0);
        assert!(super::status_field("self", "Threads").unwrap() >= 1);
    }
}
