//! Kernel micro-benchmarks (harness = false): copy bandwidth, GEMV, GEMM, attention, layernorm
//! at BLIP-2 shapes. Median of 25 reps timed with CUDA events after 5 warm-up reps.
//! Prints a markdown table, or JSON lines with `--json`. Without a GPU it says why and exits 0.

use cudarc::driver::sys::CUevent_flags;
use glimpse::backend::cuda::{
    decode_workspace_len, Activation, AttnDims, AttnMask, AttnViews, CudaDevice, DevSlice, Epilogue, GemmDims,
    HeadsView, LinearArgs, NormInput, NormShape, Residual, RopeDims, RowsView, SumOut,
};
use half::f16;

const WARMUP: usize = 5;
const REPS: usize = 25;

struct Row {
    name: String,
    ms: f64,
    metric: String,
    value: f64,
    note: String,
}

fn time<F: FnMut()>(dev: &CudaDevice, mut f: F) -> f64 {
    for _ in 0..WARMUP {
        f();
    }
    let ctx = dev.context();
    let mut t = Vec::with_capacity(REPS);
    for _ in 0..REPS {
        let a = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        let b = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        a.record(dev.stream()).unwrap();
        f();
        b.record(dev.stream()).unwrap();
        b.synchronize().unwrap();
        t.push(a.elapsed_ms(&b).unwrap() as f64);
    }
    t.sort_by(|x, y| x.partial_cmp(y).unwrap());
    t[REPS / 2]
}

fn rand_halves(dev: &CudaDevice, n: usize, seed: u64) -> DevSlice<f16> {
    let mut s = seed;
    let v: Vec<f16> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            f16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1)
        })
        .collect();
    dev.upload(&v).unwrap()
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let dev = match CudaDevice::new(0) {
        Ok(d) => d,
        Err(e) => {
            println!("kernels bench skipped: {e}");
            return;
        }
    };
    let mut rows: Vec<Row> = Vec::new();

    // copy bandwidth: device-to-device memcpy of 1 GiB (read + write counted)
    let bytes = 1usize << 30;
    let src = dev.alloc::<u8>(bytes).unwrap();
    let dst = dev.alloc::<u8>(bytes).unwrap();
    let ms = time(&dev, || dev.copy_device(&src, &dst).unwrap());
    let copy_gbs = 2.0 * bytes as f64 / (ms * 1e-3) / 1e9;
    rows.push(Row {
        name: "memcpy d2d 1 GiB".into(),
        ms,
        metric: "GB/s".into(),
        value: copy_gbs,
        note: "read+write".into(),
    });
    drop((src, dst));

    // GEMV, M = 1 (decode): (N, K) = out x in
    for &(n, k) in &[(10240usize, 2560usize), (2560, 10240), (2560, 2560)] {
        let x = rand_halves(&dev, k, 1);
        let w = rand_halves(&dev, n * k, 2);
        let b = rand_halves(&dev, n, 3);
        let y = dev.alloc::<f16>(n).unwrap();
        let epilogue = Epilogue { bias: Some(&b), ..Epilogue::default() };
        let ms = time(&dev, || {
            dev.gemv(LinearArgs { x: &x, w: &w, epilogue, y: &y, dims: GemmDims { m: 1, n, k } }).unwrap()
        });
        let gbs = (2 * (n * k + k + 2 * n)) as f64 / (ms * 1e-3) / 1e9;
        rows.push(Row {
            name: format!("gemv m=1 n={n} k={k}"),
            ms,
            metric: "GB/s".into(),
            value: gbs,
            note: format!("{:.0}% of copy", 100.0 * gbs / copy_gbs),
        });
    }

    // GEMM (prefill / vision)
    for &(m, n, k) in &[
        (257usize, 4224usize, 1408usize),
        (257, 6144, 1408),
        (257, 1408, 6144),
        (512, 2560, 2560),
        (1024, 10240, 2560),
        (1024, 2560, 10240),
        (1024, 6144, 1408),
    ] {
        let x = rand_halves(&dev, m * k, 4);
        let w = rand_halves(&dev, n * k, 5);
        let b = rand_halves(&dev, n, 6);
        let y = dev.alloc::<f16>(m * n).unwrap();
        let epilogue = Epilogue { bias: Some(&b), act: Activation::Gelu, residual: Residual::None };
        let ms =
            time(&dev, || dev.gemm(LinearArgs { x: &x, w: &w, epilogue, y: &y, dims: GemmDims { m, n, k } }).unwrap());
        let tf = 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12;
        rows.push(Row {
            name: format!("gemm m={m} n={n} k={k} +bias+gelu"),
            ms,
            metric: "TFLOP/s".into(),
            value: tf,
            note: String::new(),
        });
    }

    // attention at BLIP-2 shapes: (name, batch, heads, sq, skv, d, causal)
    for &(name, b, h, sq, skv, d, causal) in &[
        ("vit self-attn", 1usize, 16usize, 257usize, 257usize, 88usize, false),
        ("qformer self-attn", 1, 12, 32, 32, 64, false),
        ("qformer cross-attn", 1, 12, 32, 257, 64, false),
        ("opt prefill causal", 1, 32, 64, 64, 80, true),
    ] {
        let q = rand_halves(&dev, b * sq * h * d, 7);
        let kk = rand_halves(&dev, b * skv * h * d, 8);
        let v = rand_halves(&dev, b * skv * h * d, 9);
        let o = dev.alloc::<f16>(b * sq * h * d).unwrap();
        let hv = |buf, rows| HeadsView { buf, offset: 0, batch_stride: rows * h * d, row_stride: h * d };
        let mask = AttnMask { causal: causal.then_some(0), ..Default::default() };
        let views = AttnViews { q: hv(&q, sq), k: hv(&kk, skv), v: hv(&v, skv), o: hv(&o, sq) };
        let dims = AttnDims { batch: b, heads: h, q_len: sq, kv_len: skv, head_dim: d, scale: 0.1 };
        let ms = time(&dev, || dev.attention(views, dims, mask).unwrap());
        let tf = 4.0 * (b * h * sq * skv * d) as f64 / (ms * 1e-3) / 1e12;
        rows.push(Row {
            name: format!("attention {name} b={b} h={h} sq={sq} skv={skv} d={d}"),
            ms,
            metric: "TFLOP/s".into(),
            value: tf,
            note: String::new(),
        });
    }
    // decode attention, OPT-2.7b: 32 heads x 80, cache 2048 full
    {
        let (b, h, d, max_len) = (1usize, 32usize, 80usize, 2048usize);
        let q = rand_halves(&dev, b * h * d, 10);
        let kc = rand_halves(&dev, b * max_len * h * d, 11);
        let vc = rand_halves(&dev, b * max_len * h * d, 12);
        let lens = dev.upload(&[max_len as i32]).unwrap();
        let ws = dev.alloc::<f32>(decode_workspace_len(b, h, d, max_len)).unwrap();
        let o = dev.alloc::<f16>(b * h * d).unwrap();
        let hv = |buf, rows| HeadsView { buf, offset: 0, batch_stride: rows * h * d, row_stride: h * d };
        let views = AttnViews { q: hv(&q, 1), k: hv(&kc, max_len), v: hv(&vc, max_len), o: hv(&o, 1) };
        let dims = AttnDims { batch: b, heads: h, q_len: 1, kv_len: max_len, head_dim: d, scale: 0.1 };
        let ms = time(&dev, || dev.decode_attention(views, &lens, &ws, dims, AttnMask::default()).unwrap());
        let gbs = (2 * 2 * b * max_len * h * d) as f64 / (ms * 1e-3) / 1e9;
        rows.push(Row {
            name: "decode attention h=32 d=80 len=2048".into(),
            ms,
            metric: "GB/s".into(),
            value: gbs,
            note: format!("{:.0}% of copy", 100.0 * gbs / copy_gbs),
        });
    }

    // layernorm with fused residual (ViT 257 x 1408, OPT decode 1 x 2560)
    for &(r, dim) in &[(257usize, 1408usize), (1, 2560), (1024, 2560)] {
        let x = rand_halves(&dev, r * dim, 13);
        let res = rand_halves(&dev, r * dim, 14);
        let w = rand_halves(&dev, dim, 15);
        let bb = rand_halves(&dev, dim, 16);
        let y = dev.alloc::<f16>(r * dim).unwrap();
        let s = dev.alloc::<f16>(r * dim).unwrap();
        let input = NormInput { x: &x, residual: Some(&res), sum_out: SumOut::To(&s) };
        let shape = NormShape { rows: r, dim, eps: 1e-5 };
        let ms = time(&dev, || dev.layernorm(input, &w, Some(&bb), &y, shape).unwrap());
        let gbs = (2 * 4 * r * dim) as f64 / (ms * 1e-3) / 1e9;
        rows.push(Row {
            name: format!("layernorm+residual rows={r} dim={dim}"),
            ms,
            metric: "GB/s".into(),
            value: gbs,
            note: String::new(),
        });
    }

    // CLIP's unit embeddings: a batch of 32 ViT-L/14 projections into fp32.
    {
        let (r, dim) = (32usize, 768usize);
        let (x, y) = (rand_halves(&dev, r * dim, 16), dev.alloc::<f32>(r * dim).unwrap());
        let ms = time(&dev, || dev.l2_normalize(&x, &y, r, dim).unwrap());
        rows.push(Row {
            name: format!("l2_normalize rows={r} dim={dim} -> f32"),
            ms,
            metric: "GB/s".into(),
            value: (r * dim * (2 + 4)) as f64 / (ms * 1e-3) / 1e9,
            note: "launch-bound at this size".into(),
        });
    }

    // LLaMA-7B shapes: RMSNorm (decode and a 1024-token prefill), SwiGLU on a fused [rows, 2I]
    // gate|up buffer, RoPE on q (32 heads x 128), GQA decode attention (32 q / 8 kv heads).
    for &r in &[1usize, 1024] {
        let dim = 4096;
        let (x, w, y) =
            (rand_halves(&dev, r * dim, 17), rand_halves(&dev, dim, 18), dev.alloc::<f16>(r * dim).unwrap());
        let input = NormInput { x: &x, residual: None, sum_out: SumOut::None };
        let ms = time(&dev, || dev.rmsnorm(input, &w, &y, NormShape { rows: r, dim, eps: 1e-6 }).unwrap());
        let gbs = (2 * 2 * r * dim) as f64 / (ms * 1e-3) / 1e9;
        rows.push(Row {
            name: format!("rmsnorm rows={r} dim={dim}"),
            ms,
            metric: "GB/s".into(),
            value: gbs,
            note: String::new(),
        });

        let inter = 11008;
        let (gu, out) = (rand_halves(&dev, r * 2 * inter, 19), dev.alloc::<f16>(r * inter).unwrap());
        let gate = RowsView { buf: &gu, offset: 0, row_stride: 2 * inter };
        let up = RowsView { buf: &gu, offset: inter, row_stride: 2 * inter };
        let ms = time(&dev, || dev.gated_act(gate, up, Activation::Silu, &out, r, inter).unwrap());
        let gbs = (3 * 2 * r * inter) as f64 / (ms * 1e-3) / 1e9;
        rows.push(Row {
            name: format!("gated silu rows={r} I={inter} (fused)"),
            ms,
            metric: "GB/s".into(),
            value: gbs,
            note: String::new(),
        });

        let (heads, d) = (32, 128);
        let q = rand_halves(&dev, r * heads * d, 20);
        let inv: Vec<f32> = glimpse::graph::rope_inv_freq(d, 10000.0, glimpse::graph::RopeScaling::Default);
        let inv = dev.upload(&inv).unwrap();
        let start = dev.upload(&[7i32]).unwrap();
        let view = RowsView { buf: &q, offset: 0, row_stride: heads * d };
        let dims = RopeDims { batch: 1, seq: r, heads, head_dim: d };
        let ms = time(&dev, || dev.rope(view, &inv, &start, dims).unwrap());
        let gbs = (2 * 2 * r * heads * d) as f64 / (ms * 1e-3) / 1e9;
        rows.push(Row {
            name: format!("rope rows={r} heads={heads} d={d}"),
            ms,
            metric: "GB/s".into(),
            value: gbs,
            note: String::new(),
        });
    }
    {
        let (b, h, kvh, d, len) = (1usize, 32usize, 8usize, 128usize, 4096usize);
        let q = rand_halves(&dev, b * h * d, 21);
        let k = rand_halves(&dev, b * len * kvh * d, 22);
        let v = rand_halves(&dev, b * len * kvh * d, 23);
        let o = dev.alloc::<f16>(b * h * d).unwrap();
        let ws = dev.alloc::<f32>(decode_workspace_len(b, h, d, len)).unwrap();
        let kv_len = dev.upload(&vec![len as i32; b]).unwrap();
        let hv = |buf, rows: usize, heads: usize| HeadsView {
            buf,
            offset: 0,
            batch_stride: rows * heads * d,
            row_stride: heads * d,
        };
        let mask = AttnMask { kv_heads: Some(kvh), ..AttnMask::default() };
        let views = AttnViews { q: hv(&q, 1, h), k: hv(&k, len, kvh), v: hv(&v, len, kvh), o: hv(&o, 1, h) };
        let dims = AttnDims { batch: b, heads: h, q_len: 1, kv_len: len, head_dim: d, scale: 0.088 };
        let ms = time(&dev, || dev.decode_attention(views, &kv_len, &ws, dims, mask).unwrap());
        let gbs = (2 * 2 * b * len * kvh * d) as f64 / (ms * 1e-3) / 1e9;
        rows.push(Row {
            name: format!("gqa decode attention h={h}/{kvh} d={d} len={len}"),
            ms,
            metric: "GB/s".into(),
            value: gbs,
            note: format!("{:.0}% of copy", 100.0 * gbs / copy_gbs),
        });
    }

    if json {
        for r in &rows {
            println!(
                "{{\"name\":{:?},\"device\":{:?},\"ms\":{:.5},\"metric\":{:?},\"value\":{:.3},\"note\":{:?}}}",
                r.name,
                dev.name(),
                r.ms,
                r.metric,
                r.value,
                r.note
            );
        }
    } else {
        println!(
            "device: {} ({:?}), kernels: {}",
            dev.name(),
            dev.compute_capability(),
            glimpse::backend::cuda::kernel_archs()
        );
        println!("| kernel | median ms | value | unit | note |");
        println!("|---|---:|---:|---|---|");
        for r in &rows {
            println!("| {} | {:.4} | {:.1} | {} | {} |", r.name, r.ms, r.value, r.metric, r.note);
        }
    }
}
