//! `ringfwd bench --plot FILE.svg`: one SVG with the run's throughput over time (both
//! directions, from the forward's byte counters sampled every 50 ms) and two latency
//! distributions: time to first byte (the buckets of `ringfwd_connection_first_byte_seconds`)
//! and the client-side 1-byte echo round trip (bucketed the same way).
//! With `--connections` (request/response): requests per second over time, the round trips'
//! distribution, and CPU microseconds per request of each process on the path.
//!
//! Drawn with plotters' SVG backend only (no fonts, no bitmaps).

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::bench::Report;
use crate::bench::rr::RrReport;
use crate::metrics::histogram::LocalHistogram;
use crate::metrics::names::LATENCY_BUCKETS;

const DOWN: RGBColor = RGBColor(31, 119, 180);
const UP: RGBColor = RGBColor(255, 127, 14);

/// Gbit/s between consecutive samples, `(midpoint seconds, [up, down])`.
pub fn rates(series: &[(f64, [u64; 2])]) -> Vec<(f64, [f64; 2])> {
    series
        .windows(2)
        .filter(|w| w[1].0 > w[0].0)
        .map(|w| {
            let dt = w[1].0 - w[0].0;
            let g = |d: usize| w[1].1[d].saturating_sub(w[0].1[d]) as f64 * 8.0 / dt / 1e9;
            ((w[0].0 + w[1].0) / 2.0, [g(0), g(1)])
        })
        .collect()
}

/// Requests per second between consecutive samples of a running count, `(midpoint, rate)`.
pub fn request_rates(series: &[(f64, u64)]) -> Vec<(f64, f64)> {
    series
        .windows(2)
        .filter(|w| w[1].0 > w[0].0)
        .map(|w| {
            let n = w[1].1.saturating_sub(w[0].1) as f64;
            ((w[0].0 + w[1].0) / 2.0, n / (w[1].0 - w[0].0))
        })
        .collect()
}

/// Upper bound of a latency bucket as a short label (`200µs`, `5ms`, `+Inf`).
fn bucket_label(bounds: &[f64], i: usize) -> String {
    match bounds.get(i) {
        None => "+Inf".into(),
        Some(&s) if s < 1e-3 => format!("{:.0}µs", s * 1e6),
        Some(&s) if s < 1.0 => format!("{}ms", s * 1e3),
        Some(&s) => format!("{s}s"),
    }
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn draw_throughput(area: &Area<'_>, r: &Report) -> Result<(), String> {
    let points = rates(&r.series);
    let tmax = points.last().map_or(1.0, |p| p.0).max(0.1);
    let ymax = points
        .iter()
        .flat_map(|p| p.1)
        .fold(0.0f64, f64::max)
        .max(0.1)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("throughput over time ({})", r.mode),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..tmax, 0f64..ymax)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("Gbit/s")
        .draw()
        .map_err(|e| e.to_string())?;
    for (dir, name, color) in [(1, "down", DOWN), (0, "up", UP)] {
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.0, p.1[dir])),
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

fn draw_buckets(
    area: &Area<'_>,
    title: &str,
    bounds: &[f64],
    counts: &[u64],
    color: RGBColor,
) -> Result<(), String> {
    let ymax = counts.iter().copied().max().unwrap_or(0).max(1) as f64 * 1.1;
    let n = counts.len();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..n as f64, 0f64..ymax)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor()).abs() < 1e-9 && i < n {
                bucket_label(bounds, i)
            } else {
                String::new()
            }
        })
        .x_desc("bucket upper bound (le)")
        .y_desc("count")
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(counts.iter().enumerate().map(|(i, &c)| {
            Rectangle::new(
                [(i as f64 + 0.1, 0.0), (i as f64 + 0.9, c as f64)],
                color.filled(),
            )
        }))
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn draw_request_rate(area: &Area<'_>, r: &RrReport) -> Result<(), String> {
    let points = request_rates(&r.series);
    let tmax = points.last().map_or(1.0, |p| p.0).max(0.1);
    let ymax = points.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1.0) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "requests per second, {} connections x {} bytes ({})",
                r.connections, r.message, r.mode
            ),
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..tmax, 0f64..ymax)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("requests/s")
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(points, DOWN.stroke_width(2)))
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Horizontal bars, one per label, with the value written after each.
fn draw_bars(area: &Area<'_>, title: &str, bars: &[(String, f64)]) -> Result<(), String> {
    let n = bars.len().max(1);
    let xmax = bars.iter().map(|b| b.1).fold(0.0f64, f64::max).max(1.0) * 1.35;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(10)
        .build_cartesian_2d(0f64..xmax, 0f64..n as f64)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc("CPU µs per request")
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, (label, v)) in bars.iter().enumerate() {
        let y = (n - 1 - i) as f64;
        chart
            .draw_series([Rectangle::new(
                [(0.0, y + 0.15), (*v, y + 0.85)],
                UP.mix(0.6).filled(),
            )])
            .map_err(|e| e.to_string())?;
        chart
            .draw_series([Text::new(
                format!("{label}: {v:.1}"),
                (0.0, y + 0.5),
                ("sans-serif", 13),
            )])
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Write the request/response picture for `r` to `path`.
pub fn rr_svg(path: &Path, r: &RrReport) -> Result<(), String> {
    let root = SVGBackend::new(path, (1100, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (top, bottom) = root.split_vertically(420);
    let (left, right) = bottom.split_horizontally(550);
    draw_request_rate(&top, r)?;
    let hist = LocalHistogram::new(LATENCY_BUCKETS);
    for &ns in &r.latencies_ns {
        hist.observe(ns as f64 / 1e9);
    }
    draw_buckets(
        &left,
        &format!(
            "round trip (p50 {:.3} ms, p99 {:.3} ms, {} requests)",
            r.latency_ms.p50, r.latency_ms.p99, r.requests
        ),
        LATENCY_BUCKETS,
        &hist.counts(),
        DOWN,
    )?;
    let mut bars: Vec<(String, f64)> = r
        .cpu
        .iter()
        .map(|c| (format!("{} ({})", c.role, c.process), c.us_per_request))
        .collect();
    bars.push(("whole machine".into(), r.machine_us_per_request));
    draw_bars(&right, "CPU per request", &bars)?;
    root.present()
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Write the bench picture for `r` to `path`.
pub fn bench_svg(path: &Path, r: &Report) -> Result<(), String> {
    let root = SVGBackend::new(path, (1100, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (top, bottom) = root.split_vertically(420);
    let (left, right) = bottom.split_horizontally(550);
    draw_throughput(&top, r)?;
    let (bounds, counts) = &r.first_byte_hist;
    draw_buckets(
        &left,
        &format!(
            "new connection time to first byte ({} connections)",
            r.first_byte_ms.2
        ),
        bounds,
        counts,
        DOWN,
    )?;
    let echo = LocalHistogram::new(LATENCY_BUCKETS);
    for d in &r.echo {
        echo.observe(d.as_secs_f64());
    }
    draw_buckets(
        &right,
        &format!("1-byte echo round trip ({} round trips)", r.echo.len()),
        LATENCY_BUCKETS,
        &echo.counts(),
        UP,
    )?;
    root.present()
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_interval_gbits() {
        let s = [
            (0.0, [0, 0]),
            (0.5, [0, 125_000_000]),
            (1.0, [62_500_000, 125_000_000]),
        ];
        let r = rates(&s);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].0, 0.25);
        assert_eq!(r[0].1, [0.0, 2.0]);
        assert_eq!(r[1].1, [1.0, 0.0]);
    }

    #[test]
    fn request_rates_are_per_interval() {
        let r = request_rates(&[(0.0, 0), (0.1, 100), (0.3, 100), (0.3, 500)]);
        assert_eq!(r.len(), 2);
        assert!((r[0].0 - 0.05).abs() < 1e-9 && (r[0].1 - 1000.0).abs() < 1e-6);
        assert_eq!(r[1].1, 0.0);
    }

    #[test]
    fn bucket_labels_read_like_durations() {
        assert_eq!(bucket_label(LATENCY_BUCKETS, 0), "100µs");
        assert_eq!(bucket_label(LATENCY_BUCKETS, 3), "1ms");
        assert_eq!(bucket_label(LATENCY_BUCKETS, 12), "1s");
        assert_eq!(bucket_label(LATENCY_BUCKETS, LATENCY_BUCKETS.len()), "+Inf");
    }
}
