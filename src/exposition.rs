//! What `/metrics` (Prometheus text format 0.0.4) and `/debug/vars` (expvar's JSON, with the
//! book's names) show. Rendered by the supervisor from the loops' [`LoopMetrics`] added up and
//! from its own view of the process; no worker is asked anything, so a scrape never waits on,
//! or blocks, a worker.
//!
//! Written by hand rather than with `prometheus-client`: that crate encodes OpenMetrics text
//! (`application/openmetrics-text`, `# EOF`), not the 0.0.4 format asked for, and its counters
//! are shared read-modify-write atomics, where greenlight's are per-loop plain stores summed
//! at scrape time.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::metrics::{
    CloseReason, ConnState, DURATION_BUCKETS_US, LoopMetrics, STATUSES, Snapshot,
};

/// The content type of `/metrics`.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The statuses greenlight answers on its own, before any route (protocol errors).
const ERROR_STATUSES: [u16; 8] = [400, 408, 413, 414, 417, 431, 501, 505];

/// The supervisor's view of the process at this wake-up.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessView {
    /// In the lame duck or the drain.
    pub draining: bool,
    /// When the first SIGINT/SIGTERM came, seconds since the Unix epoch.
    pub shutdown_started: Option<f64>,
    /// Seconds since the drain (after any lame duck) began; 0 before.
    pub drain_seconds: f64,
    /// Connections the supervisor accepted, ever.
    pub accepted: u64,
    /// Connections closed at once for being over `--max-connections`.
    pub over_limit: u64,
    /// Times accepting paused for lack of descriptors.
    pub accept_pauses: u64,
    /// `--max-connections` in force.
    pub max_connections: usize,
}

/// The sources a scrape reads: every worker's metrics, the admin listener's, the process view.
#[derive(Debug, Clone)]
pub struct Exposition {
    workers: Vec<Arc<LoopMetrics>>,
    admin: Arc<LoopMetrics>,
    /// Updated by the supervisor at every wake-up.
    pub view: ProcessView,
    started_at: SystemTime,
}

impl Exposition {
    /// Reads `workers` (the API) and `admin` (the admin listener's own requests).
    pub fn new(workers: Vec<Arc<LoopMetrics>>, admin: Arc<LoopMetrics>) -> Exposition {
        Exposition {
            workers,
            admin,
            view: ProcessView::default(),
            started_at: SystemTime::now(),
        }
    }

    /// The API's figures, added up over the workers.
    pub fn api(&self) -> Snapshot {
        let mut total = Snapshot::default();
        for worker in &self.workers {
            total.add(&worker.snapshot());
        }
        total
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn prometheus(&self) -> String {
        let api = self.api();
        let admin = self.admin.snapshot();
        let mut out = Text(String::with_capacity(8 * 1024));

        out.family(
            "greenlight_requests_total",
            "counter",
            "API responses sent, by status code (greenlight's own 400/408/413/414/431 included).",
        );
        for (status, count) in STATUSES.iter().zip(api.responses) {
            out.sample(
                "greenlight_requests_total",
                &[("code", &status.to_string())],
                count,
            );
        }
        out.family(
            "greenlight_requests_received_total",
            "counter",
            "API requests whose first byte arrived.",
        );
        out.sample(
            "greenlight_requests_received_total",
            &[],
            api.requests_received,
        );
        out.family(
            "greenlight_request_duration_seconds",
            "histogram",
            "Time from the first byte of a request head to its response queued.",
        );
        let mut cumulative = 0;
        for (bound, count) in DURATION_BUCKETS_US.iter().zip(api.duration_buckets) {
            cumulative += count;
            let le = seconds(*bound);
            out.sample(
                "greenlight_request_duration_seconds_bucket",
                &[("le", &le)],
                cumulative,
            );
        }
        let count = api.duration_buckets.iter().sum::<u64>();
        out.sample(
            "greenlight_request_duration_seconds_bucket",
            &[("le", "+Inf")],
            count,
        );
        out.sample_f64(
            "greenlight_request_duration_seconds_sum",
            &[],
            api.duration_sum_us as f64 / 1e6,
        );
        out.sample("greenlight_request_duration_seconds_count", &[], count);
        out.family(
            "greenlight_requests_in_flight",
            "gauge",
            "API requests received and not yet answered.",
        );
        out.sample("greenlight_requests_in_flight", &[], api.in_flight());
        out.family(
            "greenlight_http_errors_total",
            "counter",
            "Requests greenlight refused on its own before any route, by status code.",
        );
        for status in ERROR_STATUSES {
            let count = STATUSES
                .iter()
                .position(|&s| s == status)
                .and_then(|i| api.responses.get(i).copied())
                .unwrap_or(0);
            out.sample(
                "greenlight_http_errors_total",
                &[("code", &status.to_string())],
                count,
            );
        }

        out.family(
            "greenlight_connections_accepted_total",
            "counter",
            "API connections accepted (those closed at once for being over the limit included).",
        );
        out.sample(
            "greenlight_connections_accepted_total",
            &[],
            self.view.accepted,
        );
        out.family("greenlight_connections_open", "gauge",
            "API connections open, by state: reading a request, writing (handling or sending a response), idle.");
        let writing = api.open(ConnState::Handling) + api.open(ConnState::Writing);
        out.sample(
            "greenlight_connections_open",
            &[("state", "reading")],
            api.open(ConnState::Reading),
        );
        out.sample(
            "greenlight_connections_open",
            &[("state", "writing")],
            writing,
        );
        out.sample(
            "greenlight_connections_open",
            &[("state", "idle")],
            api.open(ConnState::Idle),
        );
        out.family(
            "greenlight_connections_closed_total",
            "counter",
            "API connections closed, by reason.",
        );
        for reason in CloseReason::ALL {
            let count = match reason {
                CloseReason::OverLimit => self.view.over_limit,
                _ => api.closed_for(reason),
            };
            out.sample(
                "greenlight_connections_closed_total",
                &[("reason", reason.as_str())],
                count,
            );
        }
        out.family("greenlight_worker_connections_open", "gauge",
            "API connections open in each worker (one series per worker: how evenly they are spread).");
        for (index, worker) in self.workers.iter().enumerate() {
            let open = worker.snapshot().open_total();
            out.sample(
                "greenlight_worker_connections_open",
                &[("worker", &index.to_string())],
                open,
            );
        }
        out.family(
            "greenlight_max_connections",
            "gauge",
            "--max-connections in force.",
        );
        out.sample(
            "greenlight_max_connections",
            &[],
            self.view.max_connections as u64,
        );
        out.family(
            "greenlight_accept_pauses_total",
            "counter",
            "Times accepting paused for lack of file descriptors.",
        );
        out.sample(
            "greenlight_accept_pauses_total",
            &[],
            self.view.accept_pauses,
        );

        out.family(
            "greenlight_draining",
            "gauge",
            "1 from the first SIGINT/SIGTERM (lame duck and drain) until exit, else 0.",
        );
        out.sample("greenlight_draining", &[], u64::from(self.view.draining));
        out.family(
            "greenlight_shutdown_started_timestamp_seconds",
            "gauge",
            "When the first SIGINT/SIGTERM came (Unix time); 0 while serving.",
        );
        out.sample_f64(
            "greenlight_shutdown_started_timestamp_seconds",
            &[],
            self.view.shutdown_started.unwrap_or(0.0),
        );
        out.family(
            "greenlight_drain_duration_seconds",
            "gauge",
            "How long the drain (after any lame duck) has been going on; 0 before it.",
        );
        out.sample_f64(
            "greenlight_drain_duration_seconds",
            &[],
            self.view.drain_seconds,
        );
        out.family("greenlight_workers", "gauge", "Worker loops.");
        out.sample("greenlight_workers", &[], self.workers.len() as u64);
        out.family(
            "greenlight_build_info",
            "gauge",
            "Always 1; the version as a label.",
        );
        out.sample(
            "greenlight_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1,
        );
        out.family(
            "greenlight_admin_requests_total",
            "counter",
            "Admin listener responses (probes and scrapes), by status code.",
        );
        for (status, count) in STATUSES.iter().zip(admin.responses) {
            if count > 0 || matches!(status, 200 | 503) {
                out.sample(
                    "greenlight_admin_requests_total",
                    &[("code", &status.to_string())],
                    count,
                );
            }
        }
        self.process(&mut out);
        out.0
    }

    /// The standard `process_*` series, as Prometheus' client libraries export them.
    fn process(&self, out: &mut Text) {
        let stat = process_stat();
        out.family(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
        );
        out.sample_f64("process_cpu_seconds_total", &[], stat.cpu_seconds);
        out.family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
        );
        out.sample("process_resident_memory_bytes", &[], stat.resident_bytes);
        out.family(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
        );
        out.sample("process_virtual_memory_bytes", &[], stat.virtual_bytes);
        out.family(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
        );
        out.sample("process_open_fds", &[], open_fds());
        out.family(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
        );
        out.sample("process_max_fds", &[], max_fds());
        out.family(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
        );
        out.sample_f64(
            "process_start_time_seconds",
            &[],
            unix_seconds(self.started_at),
        );
    }

    /// `/debug/vars`: expvar's shape (one JSON object), with the book's four names.
    pub fn debug_vars(&self) -> serde_json::Value {
        let api = self.api();
        let by_status: serde_json::Map<String, serde_json::Value> = STATUSES
            .iter()
            .zip(api.responses)
            .filter(|(_, count)| *count > 0)
            .map(|(status, count)| (status.to_string(), count.into()))
            .collect();
        serde_json::json!({
            "cmdline": std::env::args().collect::<Vec<String>>(),
            "total_requests_received": api.requests_received,
            "total_responses_sent": api.responses_sent(),
            "total_processing_time_μs": api.duration_sum_us,
            "total_responses_sent_by_status": by_status,
            "version": env!("CARGO_PKG_VERSION"),
            "timestamp": unix_seconds(SystemTime::now()) as u64,
            "workers": self.workers.len(),
            "connections_open": api.open_total(),
        })
    }
}

/// The text being written, one family at a time.
struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn labels(&mut self, name: &str, labels: &[(&str, &str)]) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                // Label values here are digits, names and versions: nothing to escape.
                let _ = write!(self.0, "{key}=\"{value}\"");
            }
            self.0.push('}');
        }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.labels(name, labels);
        let _ = writeln!(self.0, " {value}");
    }

    fn sample_f64(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.labels(name, labels);
        let _ = writeln!(self.0, " {value}");
    }
}

/// A bucket bound in seconds, as Prometheus writes it (`5e-05` is fine too; this is plainer).
fn seconds(micros: u64) -> String {
    let text = format!("{:.6}", micros as f64 / 1e6);
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

struct ProcessStat {
    cpu_seconds: f64,
    virtual_bytes: u64,
    resident_bytes: u64,
}

/// CPU and memory from `/proc/self/stat` (zeros if it cannot be read).
fn process_stat() -> ProcessStat {
    let text = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = text
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After the command name: state is field 3, so field N is at index N - 3.
    let field = |n: usize| -> u64 { fields.get(n - 3).and_then(|f| f.parse().ok()).unwrap_or(0) };
    // SAFETY: sysconf only reads configuration values.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
            libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
        )
    };
    ProcessStat {
        cpu_seconds: (field(14) + field(15)) as f64 / ticks,
        virtual_bytes: field(23),
        resident_bytes: field(24) * page,
    }
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|entries| entries.count() as u64)
        .unwrap_or(0)
}

fn max_fds() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid rlimit value it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn exposition() -> (Exposition, Arc<LoopMetrics>) {
        let worker = Arc::new(LoopMetrics::default());
        let other = Arc::new(LoopMetrics::default());
        let exposition = Exposition::new(vec![worker.clone(), other.clone()], Arc::default());
        other.responded(404, Duration::from_micros(70));
        (exposition, worker)
    }

    #[test]
    fn every_family_has_help_and_type_and_sums_the_workers() {
        let (exposition, worker) = exposition();
        worker.request_received();
        worker.responded(200, Duration::from_micros(20));
        let text = exposition.prometheus();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {name} "))
                    || text.contains(&format!("# TYPE {family} histogram")),
                "{name} has no TYPE"
            );
            assert!(
                text.contains(&format!("# HELP {family} ")),
                "{family} has no HELP"
            );
        }
        assert!(text.contains("greenlight_requests_total{code=\"200\"} 1\n"));
        assert!(text.contains("greenlight_requests_total{code=\"404\"} 1\n"));
        assert!(text.contains("greenlight_request_duration_seconds_bucket{le=\"0.00005\"} 1\n"));
        assert!(text.contains("greenlight_request_duration_seconds_bucket{le=\"0.0001\"} 2\n"));
        assert!(text.contains("greenlight_request_duration_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("greenlight_request_duration_seconds_count 2\n"));
        assert!(text.contains("greenlight_build_info{version=\""));
        assert!(text.contains("process_open_fds "));
    }

    #[test]
    fn debug_vars_has_the_books_names() {
        let (exposition, worker) = exposition();
        worker.request_received();
        worker.responded(200, Duration::from_micros(20));
        let vars = exposition.debug_vars();
        assert_eq!(vars["total_responses_sent"], 2);
        assert_eq!(vars["total_requests_received"], 1);
        assert_eq!(vars["total_processing_time_μs"], 90);
        assert_eq!(vars["total_responses_sent_by_status"]["200"], 1);
        assert_eq!(vars["total_responses_sent_by_status"]["404"], 1);
        assert_eq!(vars["workers"], 2);
        assert!(vars["timestamp"].is_u64() && vars["version"].is_string());
    }

    #[test]
    fn bucket_bounds_read_plainly() {
        assert_eq!(seconds(50), "0.00005");
        assert_eq!(seconds(1_000_000), "1");
        assert_eq!(seconds(2_500), "0.0025");
    }
}
