//! Per-buffer dtype (`graph::DType`): which operands may be fp32 (`backend::check_dtypes`, the
//! rule both executors apply), and what an fp32 residual stream buys under the fp16 emulation:
//! values past fp16's range (65504) survive, and nothing on the stream is rounded to fp16.
//! The CUDA side of the same graphs is in tests/backend_ops.rs.

use std::sync::Arc;

use glimpse::backend::cpu::CpuExecutor;
use glimpse::backend::Executor;
use glimpse::graph::{Activation, Attention, Buf, DType, Fused, Graph, KvLen, Op, Phase, WeightTable, W};
use glimpse::synth::random_normal;
use glimpse::weights::Weight;
use half::f16;

const D: usize = 24;
const ROWS: usize = 5;

/// `fc [D, D]` with entries around `scale`, `norm [D]` around 1.
fn weights(scale: f32) -> Arc<WeightTable> {
    let mut t = WeightTable::default();
    let fc = random_normal(D * D, 7).iter().map(|&v| f16::from_f32(scale * (1.0 + 0.1 * v))).collect();
    t.add("fc.weight", Weight::from_vec(vec![D, D], fc));
    let norm = random_normal(D, 8).iter().map(|&v| f16::from_f32(1.0 + 0.2 * v)).collect();
    t.add("norm.weight", Weight::from_vec(vec![D], norm));
    Arc::new(t)
}

/// x (fp16) -> Convert -> stream (`dtype`); stream += fc(x) twice; y = RMSNorm(stream) (fp16);
/// back = Convert(stream) (fp16).
struct StreamGraph {
    g: Graph,
    phase: Phase,
    x: Buf,
    stream: Buf,
    y: Buf,
    back: Buf,
}

fn stream_graph(dtype: DType) -> StreamGraph {
    let mut g = Graph::new();
    let x = g.buffer("x", ROWS, D);
    let stream = g.typed_buffer("stream", ROWS, D, dtype);
    let y = g.buffer("y", ROWS, D);
    let back = g.buffer("back", ROWS, D);
    g.push(Op::Convert { x, out: stream, rows: ROWS });
    for _ in 0..2 {
        g.linear(x, W(0), None, Fused::add(Activation::None, Some(stream)), stream, ROWS);
    }
    g.push(Op::RmsNorm { x: stream, residual: None, weight: W(1), eps: 1e-6, out: y, rows: ROWS });
    g.push(Op::Convert { x: stream, out: back, rows: ROWS });
    let phase = g.take_phase("stream");
    StreamGraph { g, phase, x, stream, y, back }
}

fn run(sg: &StreamGraph, w: &Arc<WeightTable>, emulate: bool, x: &[f32]) -> CpuExecutor {
    let mut exec = CpuExecutor::new(Arc::clone(w), &sg.g.buffers);
    if emulate {
        exec.emulate_fp16(|_| false);
    }
    exec.write(sg.x, x).unwrap();
    exec.run(&sg.phase).unwrap();
    exec
}

#[test]
fn an_fp32_stream_survives_values_past_fp16_range() {
    // Rows of 24 inputs ~ 3..7 against weights ~ 600: |stream| reaches ~1e5 > 65504.
    let w = weights(600.0);
    let x = fp16_values(random_normal(ROWS * D, 3).iter().map(|v| 3.0 + v.abs()));
    let mut reference = run(&stream_graph(DType::F32), &w, false, &x);
    let sg = stream_graph(DType::F32);
    let mut exec = run(&sg, &w, true, &x);
    let (want, got) = (reference.read(sg.stream, ROWS).unwrap(), exec.read(sg.stream, ROWS).unwrap());
    assert!(
        want.iter().any(|v| v.abs() > 65504.0),
        "the test must overflow fp16: max {:?}",
        want.iter().fold(0f32, |a, v| a.max(v.abs()))
    );
    // The stream itself is never rounded (x holds fp16 values already), so it equals the f32
    // reference exactly.
    assert_eq!(got, want);
    // The norm of it is finite and within one fp16 rounding of the reference.
    let (y, y_ref) = (exec.read(sg.y, ROWS).unwrap(), reference.read(sg.y, ROWS).unwrap());
    for (a, b) in y.iter().zip(&y_ref) {
        assert!(a.is_finite() && (a - b).abs() <= 1e-3 * b.abs().max(1.0), "rms_norm {a} vs {b}");
    }
    // Converting it back to fp16 overflows, as torch's `.half()` does.
    assert!(exec.read(sg.back, ROWS).unwrap().iter().any(|v| v.is_infinite()));

    // The same graph with an fp16 stream overflows under the emulation.
    let sg16 = stream_graph(DType::F16);
    let mut exec16 = run(&sg16, &w, true, &x);
    assert!(exec16.read(sg16.stream, ROWS).unwrap().iter().any(|v| v.is_infinite()));
}

/// Inputs that fp16 holds exactly, so the emulation's rounding of written inputs changes nothing.
fn fp16_values(v: impl Iterator<Item = f32>) -> Vec<f32> {
    v.map(|x| f16::from_f32(x).to_f32()).collect()
}

#[test]
fn an_fp32_stream_is_not_rounded_to_fp16() {
    let w = weights(0.05);
    let x = fp16_values(random_normal(ROWS * D, 11).into_iter());
    let mut reference = run(&stream_graph(DType::F32), &w, false, &x);
    let sg = stream_graph(DType::F32);
    let mut exec = run(&sg, &w, true, &x);
    // Emulated with an fp32 stream == the f32 reference, exactly.
    let stream = exec.read(sg.stream, ROWS).unwrap();
    assert_eq!(stream, reference.read(sg.stream, ROWS).unwrap());
    // The fp16 stream differs from it (every update rounded), so the test can tell the two apart.
    let sg16 = stream_graph(DType::F16);
    let mut exec16 = run(&sg16, &w, true, &x);
    let stream16 = exec16.read(sg16.stream, ROWS).unwrap();
    assert_ne!(stream16, stream);
    assert!(stream16.iter().all(|&v| f16::from_f32(v).to_f32() == v), "the fp16 stream holds fp16 values");
}

fn attention(q: Buf, out: Buf) -> Op {
    Op::Attention(Attention {
        q: q.into(),
        k: q.into(),
        v: q.into(),
        out,
        batch: 1,
        heads: 2,
        kv_heads: 2,
        head_dim: D / 2,
        q_len: ROWS,
        kv_len: KvLen::Fixed(ROWS),
        kv_batch_stride: ROWS,
        causal: false,
        scale: 1.0,
        key_mask: None,
        mask_per_query: false,
        head_bias: None,
    })
}

/// Runs one op on the CPU executor and returns its error message (the CUDA executor calls the
/// same `backend::validate_op` before launching anything).
fn rejection(build: impl Fn(&mut Graph, Buf, Buf, Buf) -> Op) -> Option<String> {
    let mut g = Graph::new();
    let a16 = g.buffer("a16", ROWS, D);
    let b16 = g.buffer("b16", ROWS, D);
    let s32 = g.typed_buffer("s32", ROWS, D, DType::F32);
    let op = build(&mut g, a16, b16, s32);
    g.push(op);
    let phase = g.take_phase("p");
    let mut exec = CpuExecutor::new(weights(0.1), &g.buffers);
    exec.run(&phase).err().map(|e| e.to_string())
}

#[test]
fn fp32_operands_are_allowed_only_where_both_executors_support_them() {
    let linear = |x: Buf, residual: Option<Buf>, out: Buf| Op::Linear {
        x: x.into(),
        weight: W(0),
        bias: None,
        act: Activation::Gelu,
        residual,
        out,
        rows: ROWS,
    };
    let rms =
        |x: Buf, residual: Option<Buf>, out: Buf| Op::RmsNorm { x, residual, weight: W(1), eps: 1e-5, out, rows: ROWS };
    // Allowed: Linear into an fp32 stream (in place or from another fp32 buffer), a norm of an
    // fp32 stream, Convert both ways.
    assert_eq!(rejection(|_, a, _, s| linear(a, Some(s), s)), None);
    assert_eq!(rejection(|_, a, _, s| linear(a, None, s)), None);
    assert_eq!(rejection(|_, _, b, s| rms(s, None, b)), None);
    assert_eq!(
        rejection(|g, _, b, s| {
            let s2 = g.typed_buffer("s2", ROWS, D, DType::F32);
            rms(s, Some(s2), b)
        }),
        None
    );
    assert_eq!(rejection(|_, a, _, s| Op::Convert { x: a, out: s, rows: ROWS }), None);
    // An fp32 attention key mask (one row of ROWS keys for the single sequence).
    assert_eq!(
        rejection(|g, a, b, _| {
            let mask = g.typed_buffer("mask32", 1, ROWS, DType::F32);
            let Op::Attention(mut at) = attention(a, b) else { unreachable!() };
            at.key_mask = Some(mask);
            Op::Attention(at)
        }),
        None
    );
    assert_eq!(rejection(|_, a, _, s| Op::Convert { x: s, out: a, rows: ROWS }), None);

    // Rejected, naming the op and the buffer.
    let cases: Vec<(&str, Option<String>)> = vec![
        ("fp32 Linear input", rejection(|_, _, b, s| linear(s, None, b))),
        ("fp16 residual into an fp32 output", rejection(|_, a, b, s| linear(a, Some(b), s))),
        (
            "fp32 norm output",
            rejection(|g, a, _, _| {
                let o = g.typed_buffer("o32", ROWS, D, DType::F32);
                rms(a, None, o)
            }),
        ),
        ("fp16 residual with an fp32 norm input", rejection(|_, _, b, s| rms(s, Some(b), b))),
        ("fp32 attention input", rejection(|_, _, b, s| attention(s, b))),
        ("fp32 attention output", rejection(|_, a, _, s| attention(a, s))),
    ];
    for (what, err) in cases {
        let err = err.unwrap_or_else(|| panic!("{what}: accepted"));
        assert!(err.contains("s32") || err.contains("o32"), "{what}: {err}");
        assert!(err.contains("fp32") || err.contains("F32"), "{what}: {err}");
    }
    // Convert checks its shapes.
    let err = rejection(|g, a, _, _| {
        let wide = g.typed_buffer("wide", ROWS, D + 1, DType::F32);
        Op::Convert { x: a, out: wide, rows: ROWS }
    });
    assert!(err.is_some_and(|e| e.contains("convert") && e.contains("wide")));
}
