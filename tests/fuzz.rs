//! A short seeded fuzz pass over every target (the full runs are `examples/fuzz.rs`; figures in
//! the README): no input may panic, run over the time bound or grow the heap past the bound.

mod common;

use std::time::Duration;

use glimpse::fuzz::{self, CountingAlloc, Options, Target};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const CASES: u64 = 3000;

#[test]
fn every_target_survives_a_seeded_pass() {
    let opts = Options {
        cases: CASES,
        seed: 20260101,
        time_limit: Duration::from_secs(2),
        memory_limit: 2 << 30,
        ..Options::default()
    };
    let mut failures = Vec::new();
    for target in Target::ALL {
        let seeds = target.seeds(&common::fixtures()).unwrap();
        let report = fuzz::run(target, &seeds, &opts).unwrap();
        println!("{report}");
        assert_eq!(report.cases, CASES);
        assert!(report.peak_case_bytes.is_some(), "the counting allocator is installed");
        failures.extend(report.findings.iter().map(|f| format!("{} case {}: {}", target.name(), f.case, f.what)));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Cases are a pure function of (seed, case): a finding is replayed from its two numbers.
#[test]
fn cases_are_deterministic_and_varied() {
    for target in Target::ALL {
        let seeds = target.seeds(&common::fixtures()).unwrap();
        let a: Vec<Vec<u8>> = (0..50).map(|i| fuzz::make_case(target, &seeds, 9, i)).collect();
        let b: Vec<Vec<u8>> = (0..50).map(|i| fuzz::make_case(target, &seeds, 9, i)).collect();
        assert_eq!(a, b, "{}", target.name());
        let distinct: std::collections::HashSet<&Vec<u8>> = a.iter().collect();
        assert!(distinct.len() > 40, "{}: only {} distinct cases of 50", target.name(), distinct.len());
        assert!(a.iter().any(|c| !seeds.contains(c)), "{}: every case is an unmutated seed", target.name());
    }
}

/// The harness itself: panics, slow cases and heap growth are findings, written atomically
/// under their seed and case number; the run goes on after each.
#[test]
fn harness_reports_and_writes_findings() {
    let dir = common::tempdir();
    let opts = Options {
        cases: 30,
        seed: 3,
        time_limit: Duration::from_millis(50),
        memory_limit: 32 << 20,
        out_dir: Some(dir.path().to_path_buf()),
        ..Options::default()
    };
    let seeds = vec![b"{\"a\": 1}".to_vec()];
    let report = fuzz::run_with(Target::Config, &seeds, &opts, |input| match input.len() % 3 {
        0 => panic!("boom at {}", input.len()),
        1 => std::thread::sleep(Duration::from_millis(80)),
        _ => drop(std::hint::black_box(Vec::<u8>::with_capacity(64 << 20))),
    })
    .unwrap();
    assert_eq!((report.cases, report.findings.len()), (30, 30));
    for f in &report.findings {
        let expected = ["panic: boom at", "slow: ", "memory: "][f.input.len() % 3];
        assert!(f.what.starts_with(expected), "{}", f.what);
        let path = f.written_to.as_ref().unwrap();
        assert_eq!(path.file_name().unwrap().to_string_lossy(), format!("config-seed3-case{}.bin", f.case));
        assert_eq!(std::fs::read(path).unwrap(), f.input);
        assert_eq!(fuzz::make_case(Target::Config, &seeds, 3, f.case), f.input, "replayable from (seed, case)");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 30, "no temp files left");
}
