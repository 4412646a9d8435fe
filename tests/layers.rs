//! The shared layer builders (src/models/layers.rs) on paths BLIP-2 does not take: a LLaMA-style
//! pre-norm block (RMSNorm, grouped-query attention with RoPE over a KV cache, SiLU gated MLP).

use std::sync::Arc;

use glimpse::backend::cpu::CpuExecutor;
use glimpse::backend::Executor;
use glimpse::graph::{rope_inv_freq, Activation, Buf, Graph, Op, Phase, RopeScaling, WeightTable};
use glimpse::models::layers::{
    load_attention, pre_norm, AttentionLayer, AttnCall, AttnSpec, GatedMlp, GatedScratch, KvCache, NormLayer,
};
use glimpse::models::Loader;
use glimpse::synth::random_normal;
use glimpse::weights::{Checkpoint, Weight};
use half::f16;

const H: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HD: usize = 8;
const INTER: usize = 48;

struct Block {
    attn_norm: NormLayer,
    attn: AttentionLayer,
    mlp_norm: NormLayer,
    mlp: GatedMlp,
}

fn load_block() -> (Arc<WeightTable>, Block) {
    let shapes: [(&str, Vec<usize>); 9] = [
        ("l.input_layernorm.weight", vec![H]),
        ("l.q_proj.weight", vec![HEADS * HD, H]),
        ("l.k_proj.weight", vec![KV_HEADS * HD, H]),
        ("l.v_proj.weight", vec![KV_HEADS * HD, H]),
        ("l.o_proj.weight", vec![H, HEADS * HD]),
        ("l.post_attention_layernorm.weight", vec![H]),
        ("l.gate_proj.weight", vec![INTER, H]),
        ("l.up_proj.weight", vec![INTER, H]),
        ("l.down_proj.weight", vec![H, INTER]),
    ];
    let tensors = shapes.iter().enumerate().map(|(i, (name, shape))| {
        let n = shape.iter().product();
        let scale = if shape.len() == 1 { 0.2 } else { 1.0 / (shape[1] as f32).sqrt() };
        let offset = if shape.len() == 1 { 1.0 } else { 0.0 };
        let data = random_normal(n, i as u64 + 1).iter().map(|&v| f16::from_f32(offset + scale * v)).collect();
        (name.to_string(), Weight::from_vec(shape.clone(), data))
    });
    let ckpt = Checkpoint::in_memory("<llama block>", tensors);
    let mut table = WeightTable::default();
    let mut ld = Loader { ckpt: &ckpt, table: &mut table };
    let rms = |ld: &mut Loader, name: &str| NormLayer::RmsNorm { weight: ld.tensor(name, &[H]).unwrap(), eps: 1e-6 };
    let attn_norm = rms(&mut ld, "l.input_layernorm.weight");
    let mut attn = load_attention(
        &mut ld,
        &AttnSpec {
            names: ["l.q_proj", "l.k_proj", "l.v_proj", "l.o_proj"],
            q_in: H,
            kv_in: H,
            heads: HEADS,
            kv_heads: KV_HEADS,
            head_dim: HD,
            bias: false,
            scale: (HD as f32).powf(-0.5),
        },
    )
    .unwrap();
    attn.rope = Some(rope_inv_freq(HD, 10000.0, RopeScaling::Default).into());
    let mlp_norm = rms(&mut ld, "l.post_attention_layernorm.weight");
    let lin = |ld: &mut Loader, name: &str, i, o| ld.linear(name, i, o, false).unwrap();
    let mlp = GatedMlp {
        gate: lin(&mut ld, "l.gate_proj", H, INTER),
        up: lin(&mut ld, "l.up_proj", H, INTER),
        down: lin(&mut ld, "l.down_proj", INTER, H),
        act: Activation::Silu,
    };
    (Arc::new(table), Block { attn_norm, attn, mlp_norm, mlp })
}

/// One pass of the block over `seq` new rows per sequence, in place on the returned input buffer.
fn pass(g: &mut Graph, blk: &Block, cache: &KvCache, seq: usize, tag: &str) -> Buf {
    let rows = cache.batch * seq;
    let x = g.buffer(format!("{tag}.x"), rows, H);
    let normed = g.buffer(format!("{tag}.normed"), rows, H);
    let s = blk.attn.scratch(g, tag, rows, rows);
    let gs = GatedScratch {
        gate: g.buffer(format!("{tag}.gate"), rows, INTER),
        up: g.buffer(format!("{tag}.up"), rows, INTER),
        hidden: g.buffer(format!("{tag}.hidden"), rows, INTER),
    };
    let call = AttnCall::new(cache.batch, seq, cache.keys(0)).causal();
    pre_norm(g, &blk.attn_norm, x, normed, rows, |g, h, r| blk.attn.emit(g, &s, h, &call, r));
    pre_norm(g, &blk.mlp_norm, x, normed, rows, |g, h, r| blk.mlp.emit(g, h, &gs, r, rows));
    x
}

#[test]
fn llama_block_decodes_as_it_prefills() {
    let (weights, blk) = load_block();
    let (batch, n) = (2, 6);
    let input = random_normal(batch * n * H, 99);
    let rows_of = |from: usize, to: usize| -> Vec<f32> {
        (0..batch).flat_map(|b| input[(b * n + from) * H..(b * n + to) * H].to_vec()).collect()
    };

    // The whole sequence in one prefill.
    let mut g = Graph::new();
    let cache = KvCache::new(&mut g, "full", 1, batch, n, KV_HEADS * HD);
    let x = pass(&mut g, &blk, &cache, n, "full");
    let full: Phase = g.take_phase("full");
    let kinds: Vec<&str> = full.ops.iter().map(Op::kind).collect();
    assert_eq!(
        kinds,
        [
            "rms_norm",
            "linear",
            "linear",
            "linear",
            "rope",
            "rope",
            "kv_append",
            "attention",
            "linear",
            "rms_norm",
            "linear",
            "linear",
            "gated_act",
            "linear"
        ]
    );
    let Some(Op::Attention(a)) = full.ops.iter().find(|op| op.kind() == "attention") else { unreachable!() };
    assert_eq!((a.heads, a.kv_heads, a.causal, a.kv_batch_stride), (HEADS, KV_HEADS, true, n));
    let mut ex = CpuExecutor::new(weights.clone(), &g.buffers);
    ex.write(x, &input).unwrap();
    ex.set_position(0);
    ex.run(&full).unwrap();
    let want = ex.read(x, batch * n).unwrap();

    // n - 1 rows of prefill, then one decode step over the cache.
    let mut g = Graph::new();
    let cache = KvCache::new(&mut g, "inc", 1, batch, n, KV_HEADS * HD);
    let xp = pass(&mut g, &blk, &cache, n - 1, "prefill");
    let prefill = g.take_phase("prefill");
    let xd = pass(&mut g, &blk, &cache, 1, "decode");
    let decode = g.take_phase("decode");
    let mut ex = CpuExecutor::new(weights, &g.buffers);
    ex.write(xp, &rows_of(0, n - 1)).unwrap();
    ex.set_position(0);
    ex.run(&prefill).unwrap();
    ex.write(xd, &rows_of(n - 1, n)).unwrap();
    ex.set_position(n - 1);
    ex.run(&decode).unwrap();
    let (got_p, got_d) = (ex.read(xp, batch * (n - 1)).unwrap(), ex.read(xd, batch).unwrap());

    let mut max_err = 0f32;
    for b in 0..batch {
        for i in 0..n {
            let got = if i < n - 1 { &got_p[(b * (n - 1) + i) * H..][..H] } else { &got_d[b * H..][..H] };
            let w = &want[(b * n + i) * H..][..H];
            max_err = got.iter().zip(w).map(|(g, w)| (g - w).abs()).fold(max_err, f32::max);
        }
    }
    // Same f32 arithmetic row by row; only the attention's summation length differs per row.
    assert!(max_err < 1e-5, "prefill+decode differs from one prefill by {max_err}");
    let magnitude = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
    assert!(magnitude > 0.5, "the block did something: max |x| = {magnitude}");
}
