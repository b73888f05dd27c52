//! Numbers out: latency histograms (hdrhistogram, microseconds), CPU time of the tool
//! and the server, the server's memory, the summary line, the JSON line and the SVG
//! percentile plot.

use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// A latency histogram in microseconds, 1 µs .. 1 h, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds")
}

/// `p50`, `p99`, `p999`, `max` and `mean`, in milliseconds.
pub fn latency_json(h: &Histogram<u64>) -> Value {
    let ms = |us: u64| us as f64 / 1000.0;
    json!({
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
        "mean_ms": h.mean() / 1000.0,
        "samples": h.len(),
    })
}

/// One line for people.
pub fn latency_line(h: &Histogram<u64>) -> String {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} samples)",
        ms(0.5),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0,
        h.len()
    )
}

/// CPU seconds (user + system) this process has used.
pub fn own_cpu() -> f64 {
    // SAFETY: getrusage writes into the struct we pass; RUSAGE_SELF is always valid.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// CPU seconds (user + system) process `pid` has used, from `/proc`.
pub fn process_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf with a valid name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks.max(1.0))
}

/// Resident memory of process `pid` in KiB (`VmRSS`).
pub fn process_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Cores used over `elapsed`: the tool's own, and the server's if its pid is known.
pub struct CpuMeter {
    started: std::time::Instant,
    own: f64,
    server: Option<(u32, f64)>,
}

impl CpuMeter {
    pub fn start(server_pid: Option<u32>) -> CpuMeter {
        CpuMeter {
            started: std::time::Instant::now(),
            own: own_cpu(),
            server: server_pid.and_then(|p| process_cpu(p).map(|c| (p, c))),
        }
    }

    /// `{"tool_cpu_cores", "server_cpu_cores"}` since `start`.
    pub fn json(&self) -> Value {
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let tool = (own_cpu() - self.own) / secs;
        let server = self
            .server
            .and_then(|(pid, before)| process_cpu(pid).map(|now| (now - before) / secs));
        json!({"tool_cpu_cores": round2(tool), "server_cpu_cores": server.map(round2)})
    }
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Prints the human summary on stderr and the JSON line on stdout.
pub fn emit(summary: &str, record: &Value) {
    eprintln!("{summary}");
    println!("{record}");
}

/// Writes the latency percentile curve (x: percentile on a log scale of 1/(1-q), y:
/// latency in ms) as a self-contained SVG.
pub fn plot(path: &Path, title: &str, h: &Histogram<u64>) -> std::io::Result<()> {
    let (w, hgt, left, bottom) = (720.0, 420.0, 70.0, 50.0);
    let quantiles: Vec<f64> = (0..=400)
        .map(|i| 1.0 - 10f64.powf(-(i as f64) / 100.0))
        .filter(|q| *q < 1.0)
        .collect();
    let max_ms = (h.max() as f64 / 1000.0).max(0.001);
    let x_of = |q: f64| left + (-(1.0 - q).log10() / 4.0) * (w - left - 20.0);
    let y_of = |ms: f64| hgt - bottom - (ms / max_ms) * (hgt - bottom - 30.0);
    let points: Vec<String> = quantiles
        .iter()
        .map(|q| {
            let ms = h.value_at_quantile(*q) as f64 / 1000.0;
            format!("{:.1},{:.1}", x_of(*q), y_of(ms))
        })
        .collect();
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{hgt}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"18\" font-size=\"14\">{}</text>\n\
         <line x1=\"{left}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"30\" x2=\"{left}\" y2=\"{y0}\" stroke=\"black\"/>\n",
        escape(title),
        y0 = hgt - bottom,
        x1 = w - 20.0,
    );
    for (q, label) in [
        (0.0, "p0"),
        (0.9, "p90"),
        (0.99, "p99"),
        (0.999, "p99.9"),
        (0.9999, "p99.99"),
    ] {
        let x = x_of(q);
        svg.push_str(&format!(
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>\n\
             <line x1=\"{x:.1}\" y1=\"30\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\n",
            hgt - bottom + 18.0,
            hgt - bottom
        ));
    }
    for i in 0..=4 {
        let ms = max_ms * i as f64 / 4.0;
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{ms:.1} ms</text>\n",
            left - 6.0,
            y_of(ms) + 4.0
        ));
    }
    svg.push_str(&format!(
        "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>\n</svg>\n",
        points.join(" ")
    ));
    std::fs::write(path, svg)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A progress bar on stderr over `total` (hidden with `quiet`).
pub fn progress(total: u64, what: &str, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
