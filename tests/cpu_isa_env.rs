//! A CPU executor built directly by library code (not through `Backend`, which checks first)
//! under an unusable `GLIMPSE_CPU_ISA`: running a GEMM-sized Linear is an error naming the
//! variable, not a panic, and the executor stays usable. Its own test binary, because the
//! variable is read once per process.

use std::sync::Arc;

use glimpse::backend::cpu::CpuExecutor;
use glimpse::backend::Executor;
use glimpse::graph::{Fused, Graph, WeightTable};
use glimpse::weights::Weight;
use half::f16;

#[test]
fn an_unknown_isa_is_an_error_from_run() {
    // Set before anything in this process reads it (the only test of this binary).
    std::env::set_var("GLIMPSE_CPU_ISA", "avx9000");
    let (rows, k, n) = (9, 16, 8); // above the GEMV rows: the GEMM path that reads the variable
    let mut table = WeightTable::default();
    let w = table.add("w", Weight::from_vec(vec![n, k], (0..n * k).map(|i| f16::from_f32(i as f32 * 0.01)).collect()));
    let mut g = Graph::new();
    let (x, y) = (g.buffer("x", rows, k), g.buffer("y", rows, n));
    g.linear(x, w, None, Fused::NONE, y, rows);
    let phase = g.take_phase("linear");
    let mut cpu = CpuExecutor::new(Arc::new(table), &g.buffers);
    cpu.write(x, &vec![0.5; rows * k]).unwrap();
    let err = cpu.run(&phase).unwrap_err().to_string();
    assert!(err.contains("GLIMPSE_CPU_ISA=avx9000") && err.contains("unknown CPU path"), "{err}");
    // The output buffer is still whole: reading it works and gives its full size.
    assert_eq!(cpu.read(y, rows).unwrap().len(), rows * n);
}
