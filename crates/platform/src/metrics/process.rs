//! The standard `process_*` metrics, read from `/proc/self`.

/// `process_*` as the Prometheus client libraries define them (Linux only;
/// nothing elsewhere). Clock ticks are USER_HZ, 100 on every Linux ABI.
pub(super) fn process_metrics() -> String {
    use std::fmt::Write as _;
    const TICKS_PER_SECOND: f64 = 100.0;
    let mut out = String::new();
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return out;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("btime"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|v| v.parse::<f64>().ok());
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count);
    let mut metric = |name: &str, kind: &str, help: &str, sample: &str, value: Option<f64>| {
        if let Some(value) = value {
            let _ = writeln!(
                out,
                "# HELP {name} {help}.\n# TYPE {name} {kind}\n{sample} {value}"
            );
        }
    };
    metric(
        "process_cpu_seconds",
        "counter",
        "Total user and system CPU time spent in seconds",
        "process_cpu_seconds_total",
        field(11)
            .zip(field(12))
            .map(|(user, system)| (user + system) / TICKS_PER_SECOND),
    );
    metric(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes",
        "process_resident_memory_bytes",
        kib("VmRSS:").map(|k| k * 1024.0),
    );
    metric(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes",
        "process_virtual_memory_bytes",
        field(20),
    );
    metric(
        "process_threads",
        "gauge",
        "Number of OS threads in the process",
        "process_threads",
        field(17),
    );
    metric(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors",
        "process_open_fds",
        Some(open_fds as f64),
    );
    metric(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since the Unix epoch in seconds",
        "process_start_time_seconds",
        boot.zip(field(19))
            .map(|(boot, ticks)| boot + ticks / TICKS_PER_SECOND),
    );
    out
}
