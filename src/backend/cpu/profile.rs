//! Where a CPU step spends its time: an optional per-op profile (`SRSDE_CPU_PROFILE=1`, or
//! [`enable`] from `srsde-fast bench --train --device cpu`).
//!
//! Every CPU backend op opens a [`scope`] on the calling thread; the parts of the convolutions (column
//! building, each GEMM kind, col2im) open nested ones. A scope's *self* time is its wall time minus its
//! nested scopes' — ops run their parallel work inside the call, so wall time on the calling thread is
//! the op's cost — and the table adds up to the step. Off (the default), a scope is one relaxed atomic
//! load.
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static FROM_ENV: Once = Once::new();
static TABLE: Mutex<BTreeMap<&'static str, OpStats>> = Mutex::new(BTreeMap::new());

thread_local! {
    /// Wall time of the nested scopes of each open scope on this thread (innermost last).
    static OPEN: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

/// What one op kind cost over the profiled calls.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OpStats {
    pub calls: u64,
    /// Wall seconds on the calling thread, nested scopes excluded.
    pub self_s: f64,
    /// Floating-point operations (GEMM kinds only; 0 elsewhere).
    pub flops: f64,
}

/// Turns the profile on or off (on also when `SRSDE_CPU_PROFILE=1` is set).
pub fn enable(on: bool) {
    FROM_ENV.call_once(|| {});
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn is_enabled() -> bool {
    FROM_ENV.call_once(|| {
        if std::env::var("SRSDE_CPU_PROFILE").is_ok_and(|v| v == "1") {
            ENABLED.store(true, Ordering::Relaxed);
        }
    });
    ENABLED.load(Ordering::Relaxed)
}

/// The profile so far, and a fresh start.
pub fn take() -> BTreeMap<&'static str, OpStats> {
    std::mem::take(&mut *TABLE.lock().unwrap_or_else(|e| e.into_inner()))
}

/// An open scope: adds its self time to `name` when dropped.
pub struct Scope {
    name: &'static str,
    flops: f64,
    start: Instant,
}

/// Opens a scope for `name` (`flops` of GEMM work, else 0); None when profiling is off.
#[inline]
pub fn scope(name: &'static str, flops: f64) -> Option<Scope> {
    if !is_enabled() {
        return None;
    }
    OPEN.with(|o| o.borrow_mut().push(0.0));
    Some(Scope {
        name,
        flops,
        start: Instant::now(),
    })
}

impl Drop for Scope {
    fn drop(&mut self) {
        let wall = self.start.elapsed().as_secs_f64();
        let nested = OPEN.with(|o| {
            let mut o = o.borrow_mut();
            let nested = o.pop().unwrap_or(0.0);
            if let Some(parent) = o.last_mut() {
                *parent += wall;
            }
            nested
        });
        let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
        let s = t.entry(self.name).or_default();
        s.calls += 1;
        s.self_s += (wall - nested).max(0.0);
        s.flops += self.flops;
    }
}

/// Adds `secs` of wall time (and `flops`) to `name` directly, as a nested part of the open scope:
/// for work measured inside parallel tasks and apportioned to the caller's wall time.
pub fn record(name: &'static str, secs: f64, flops: f64) {
    if !is_enabled() {
        return;
    }
    OPEN.with(|o| {
        if let Some(parent) = o.borrow_mut().last_mut() {
            *parent += secs;
        }
    });
    let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let s = t.entry(name).or_default();
    s.calls += 1;
    s.self_s += secs;
    s.flops += flops;
}

/// Work measured inside parallel tasks, booked against the caller's wall time: each part's
/// (`name`, thread-seconds, `flops`) gets the share of the wall time since `started` that its
/// seconds are of `busy` (all the tasks' measured seconds), through [`record`]; what `busy` holds
/// beyond the parts stays with the open scope.
pub fn record_shares(started: Instant, busy: f64, parts: &[(&'static str, f64, f64)]) {
    if !is_enabled() {
        return;
    }
    let wall = started.elapsed().as_secs_f64();
    for &(name, secs, flops) in parts {
        record(name, wall * secs / busy.max(1e-12), flops);
    }
}

/// The GEMM kinds of the table (the rest is "non-GEMM" time; attention's softmax and scratch stay
/// with the attention ops, its matrix products are "gemm attention").
pub const GEMM_KINDS: [&str; 5] = [
    "gemm conv forward",
    "gemm conv input-grad",
    "gemm conv weight-grad",
    "gemm nin/linear",
    "gemm attention",
];

/// The profile as a table: op, calls, ms per step, share, GFLOP/s; then the GEMM total and the
/// non-GEMM share. `steps` divides the totals into per-step times.
pub fn format_table(stats: &BTreeMap<&'static str, OpStats>, steps: usize) -> String {
    use std::fmt::Write as _;
    let total: f64 = stats.values().map(|s| s.self_s).sum();
    let per = |s: f64| 1e3 * s / steps.max(1) as f64;
    let mut rows: Vec<_> = stats.iter().collect();
    rows.sort_by(|a, b| b.1.self_s.total_cmp(&a.1.self_s));
    let mut out = String::new();
    let _ = writeln!(out, "| op | calls / step | ms / step | share | GFLOP/s |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for (name, s) in &rows {
        let rate = if s.flops > 0.0 && s.self_s > 0.0 {
            format!("{:.1}", s.flops / s.self_s / 1e9)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "| {name} | {:.0} | {:.1} | {:.1} % | {rate} |",
            s.calls as f64 / steps.max(1) as f64,
            per(s.self_s),
            100.0 * s.self_s / total.max(1e-12)
        );
    }
    let gemm_s: f64 = GEMM_KINDS
        .iter()
        .filter_map(|k| stats.get(k))
        .map(|s| s.self_s)
        .sum();
    let gemm_f: f64 = GEMM_KINDS
        .iter()
        .filter_map(|k| stats.get(k))
        .map(|s| s.flops)
        .sum();
    let _ = writeln!(
        out,
        "\nprofiled: {:.1} ms / step; GEMM {:.1} ms ({:.1} GFLOP/s over all GEMM kinds), non-GEMM {:.1} % of the step",
        per(total),
        per(gemm_s),
        gemm_f / gemm_s.max(1e-12) / 1e9,
        100.0 * (total - gemm_s) / total.max(1e-12)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn nested_scopes_count_self_time_and_flops() {
        enable(true);
        {
            let _outer = scope("test outer", 0.0);
            std::thread::sleep(Duration::from_millis(30));
            for _ in 0..2 {
                let _inner = scope("test inner", 1e9);
                std::thread::sleep(Duration::from_millis(40));
            }
        }
        let t = TABLE.lock().unwrap().clone();
        enable(false);
        let (outer, inner) = (t["test outer"], t["test inner"]);
        assert_eq!((outer.calls, inner.calls), (1, 2));
        assert_eq!(inner.flops, 2e9);
        assert!(inner.self_s >= 0.08, "inner {inner:?}");
        // The outer scope's self time excludes the 80 ms of its nested scopes.
        assert!(outer.self_s >= 0.03 && outer.self_s < 0.07, "outer {outer:?}");
        let table = format_table(&t, 1);
        assert!(table.contains("| test inner | 2 |"), "{table}");
        assert!(table.contains("non-GEMM"), "{table}");
    }
}
