//! Turning samples into a report: medians with their range, ratios to direct TCP, daemon CPU and
//! memory, and the targets we hold ourselves to.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use crate::{Mode, Results, Sample};

/// A median and the range it came from.
#[derive(Debug, Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Option<Self> {
        values.retain(|v| v.is_finite());
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: values[0],
            max: values[n - 1],
        })
    }

    fn show(self, digits: usize) -> String {
        if (self.max - self.min).abs() < f64::EPSILON {
            format!("{:.digits$}", self.median)
        } else {
            format!(
                "{:.digits$} ({:.digits$}..{:.digits$})",
                self.median, self.min, self.max
            )
        }
    }
}

fn spread(
    results: &Results,
    test: &str,
    mode: Mode,
    value: impl Fn(&Sample) -> f64,
) -> Option<Spread> {
    Spread::of(
        results
            .samples
            .iter()
            .filter(|s| s.test == test && s.mode == mode)
            .map(value)
            .collect(),
    )
}

fn tests(results: &Results) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for s in &results.samples {
        if !names.contains(&s.test) {
            names.push(s.test.clone());
        }
    }
    names
}

/// The Markdown report.
pub(crate) fn markdown(results: &Results) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Machine: {}. Repetitions: {}{}. Medians, with min..max over repetitions when they differ.\n",
        results.machine,
        results.reps,
        if results.quick {
            " (quick mode: short tests)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "| test | unit | direct | culvert | culvert / direct | daemon CPU (node-a + node-b) | CPU per unit |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for test in tests(results) {
        let throughput = test.starts_with("throughput");
        let (unit, per) = if throughput {
            ("Gbit/s", "CPU-s/GiB")
        } else {
            ("ops/s", "CPU-µs/op")
        };
        let direct = spread(results, &test, Mode::Direct, |s| s.rate);
        let culvert = spread(results, &test, Mode::Culvert, |s| s.rate);
        let ratio = direct.zip(culvert).map(|(d, c)| c.median / d.median);
        let cpu = spread(results, &test, Mode::Culvert, |s| s.cpu[0] + s.cpu[1]);
        let per_unit = spread(results, &test, Mode::Culvert, |s| {
            s.cpu_per_unit[0] + s.cpu_per_unit[1]
        });
        let digits = if throughput { 2 } else { 0 };
        let _ = writeln!(
            md,
            "| {test} | {unit} | {} | {} | {} | {} | {} {per} |",
            direct.map_or_else(|| "-".into(), |s| s.show(digits)),
            culvert.map_or_else(|| "-".into(), |s| s.show(digits)),
            ratio.map_or_else(|| "-".into(), |r| format!("{r:.2}×")),
            cpu.map_or_else(|| "-".into(), |s| format!("{:.2} CPU-s/s", s.median)),
            per_unit.map_or_else(|| "-".into(), |s| format!("{:.2}", s.median)),
        );
    }

    let _ = writeln!(
        md,
        "\nLatency percentiles (µs, medians over repetitions):\n"
    );
    let _ = writeln!(md, "| test | mode | p50 | p90 | p99 | p99.9 |");
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for test in tests(results) {
        for mode in [Mode::Direct, Mode::Culvert] {
            let q = |i: usize| {
                spread(results, &test, mode, |s| {
                    s.latency_us.map_or(f64::NAN, |l| l[i])
                })
            };
            let Some(p50) = q(0) else { continue };
            let cells: Vec<String> = [Some(p50), q(1), q(2), q(3)]
                .iter()
                .map(|s| s.map_or_else(|| "-".into(), |s| format!("{:.1}", s.median)))
                .collect();
            let _ = writeln!(md, "| {test} | {mode:?} | {} |", cells.join(" | "));
        }
    }

    let idle = results
        .idle_rss_kib
        .iter()
        .flat_map(|r| r.iter().copied())
        .max()
        .unwrap_or(0);
    let peak = results
        .samples
        .iter()
        .flat_map(|s| s.hwm_kib.iter().copied())
        .max()
        .unwrap_or(0);
    let (file, anon) = results
        .idle_split_kib
        .iter()
        .flat_map(|r| r.iter().copied())
        .max_by_key(|(file, anon)| file + anon)
        .unwrap_or((0, 0));
    let mib = |kib: u64| kib as f64 / 1024.0;
    let _ = writeln!(
        md,
        "\nDaemon memory: idle RSS after start, largest of both nodes over repetitions: {:.1} MiB \
         ({:.1} MiB code and libraries, {:.1} MiB heap and stacks); peak (VmHWM) over the whole run: {:.1} MiB.\n",
        mib(idle),
        mib(file),
        mib(anon),
        mib(peak)
    );

    let _ = writeln!(md, "Targets:\n");
    for line in targets(results, idle, peak) {
        let _ = writeln!(md, "- {line}");
    }
    md
}

fn targets(results: &Results, idle_kib: u64, peak_kib: u64) -> Vec<String> {
    let mut lines = Vec::new();
    let mut ratio_target = |test: &str, min: f64| {
        let d = spread(results, test, Mode::Direct, |s| s.rate);
        let c = spread(results, test, Mode::Culvert, |s| s.rate);
        if let Some((d, c)) = d.zip(c) {
            let r = c.median / d.median;
            lines.push(format!(
                "{test}: culvert/direct {r:.2} (target ≥ {min}): {}",
                verdict(r >= min)
            ));
        }
    };
    ratio_target("throughput, 1 stream, a→b", 0.55);
    ratio_target("throughput, 1 stream, b→a", 0.55);
    ratio_target("connections, 1 worker", 0.4);
    ratio_target("connections, 8 workers", 0.5);
    for (i, name, budget) in [(0, "p50", 22.0), (2, "p99", 30.0)] {
        let q = |mode| {
            spread(results, "request/response, 1 B", mode, |s| {
                s.latency_us.map_or(f64::NAN, |l| l[i])
            })
        };
        if let Some((d, c)) = q(Mode::Direct).zip(q(Mode::Culvert)) {
            let added = c.median - d.median;
            lines.push(format!(
                "request/response 1 B {name}: {:.1} µs vs direct {:.1} µs, +{added:.1} µs (target ≤ +{budget} µs): {}",
                c.median, d.median, verdict(added <= budget)
            ));
        }
    }
    let mib = |k: u64| k as f64 / 1024.0;
    lines.push(format!(
        "idle RSS {:.1} MiB (target ≤ 8 MiB): {}",
        mib(idle_kib),
        verdict(mib(idle_kib) <= 8.0)
    ));
    lines.push(format!(
        "peak RSS {:.1} MiB (target ≤ 20 MiB): {}",
        mib(peak_kib),
        verdict(mib(peak_kib) <= 20.0)
    ));
    lines
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

/// Prints, for every test and mode, NEW's median rate as a ratio of OLD's.
pub(crate) fn compare(old: &Path, new: &Path) -> anyhow::Result<()> {
    let load = |p: &Path| -> anyhow::Result<Results> {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", p.display()))
    };
    let (old, new) = (load(old)?, load(new)?);
    println!("| test | mode | old | new | new / old |\n|---|---|---|---|---|");
    for test in tests(&new) {
        for mode in [Mode::Direct, Mode::Culvert] {
            let a = spread(&old, &test, mode, |s| s.rate);
            let b = spread(&new, &test, mode, |s| s.rate);
            if let Some((a, b)) = a.zip(b) {
                println!(
                    "| {test} | {mode:?} | {:.2} | {:.2} | {:.2}× |",
                    a.median,
                    b.median,
                    b.median / a.median
                );
            }
        }
    }
    Ok(())
}

/// A one-line description of this machine.
pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} × {cpu}, Linux {}", kernel.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Sample;

    fn sample(test: &str, mode: Mode, rep: usize, rate: f64, p50: f64, p99: f64) -> Sample {
        Sample {
            test: test.into(),
            mode,
            rep,
            rate,
            latency_us: Some([p50, p50, p99, p99]),
            cpu: [0.1, 0.2],
            cpu_per_unit: [1.0, 2.0],
            rss_kib: [4096, 4096],
            hwm_kib: [8192, 30 * 1024],
        }
    }

    #[test]
    fn median_of_odd_and_even_counts_and_its_range() {
        let s = Spread::of(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(vec![4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert_eq!(Spread::of(vec![f64::NAN]).map(|s| s.median), None);
        assert_eq!(s.show(1), "2.0 (1.0..3.0)");
        assert_eq!(Spread::of(vec![5.0]).unwrap().show(0), "5");
    }

    #[test]
    fn targets_compare_medians_with_direct_in_the_same_run() {
        let rr = "request/response, 1 B";
        let conn = "connections, 1 worker";
        let results = Results {
            machine: "test".into(),
            quick: false,
            reps: 3,
            idle_rss_kib: vec![[7000, 7200]],
            idle_split_kib: vec![[(6000, 1000), (6100, 1100)]],
            samples: (0..3)
                .flat_map(|rep| {
                    [
                        sample(rr, Mode::Direct, rep, 100.0, 50.0, 80.0),
                        sample(rr, Mode::Culvert, rep, 60.0, 70.0 + rep as f64, 100.0),
                        sample(conn, Mode::Direct, rep, 1000.0, 1.0, 1.0),
                        sample(
                            conn,
                            Mode::Culvert,
                            rep,
                            300.0 + rep as f64 * 200.0,
                            1.0,
                            1.0,
                        ),
                    ]
                })
                .collect(),
        };
        let lines = targets(&results, 7200, 30 * 1024);
        assert!(
            lines.contains(
                &"connections, 1 worker: culvert/direct 0.50 (target ≥ 0.4): met".to_owned()
            ),
            "{lines:#?}"
        );
        assert!(
            lines.iter().any(|l| l
                .starts_with("request/response 1 B p50: 71.0 µs vs direct 50.0 µs, +21.0 µs")
                && l.ends_with("met")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("request/response 1 B p99") && l.ends_with("met")),
            "{lines:#?}"
        );
        assert!(
            lines.contains(&"idle RSS 7.0 MiB (target ≤ 8 MiB): met".to_owned()),
            "{lines:#?}"
        );
        assert!(
            lines.contains(&"peak RSS 30.0 MiB (target ≤ 20 MiB): **missed**".to_owned()),
            "{lines:#?}"
        );
        let md = markdown(&results);
        assert!(
            md.contains("| connections, 1 worker | ops/s | 1000 | 500 (300..700) | 0.50× |"),
            "{md}"
        );
    }
}
