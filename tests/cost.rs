//! The floors' cost model (src/cost.rs) on small hand-built phases whose FLOPs and bytes are
//! counted by hand here, and on the BLIP-2 tiny plan against its known closed form.

use glimpse::cost::{op_flops, GraphCost};
use glimpse::graph::{Activation, Attention, Fused, Graph, KvLen, Op, WeightTable};
use glimpse::weights::Weight;
use half::f16;

fn table(shapes: &[(&str, Vec<usize>)]) -> WeightTable {
    let mut t = WeightTable::default();
    for (name, shape) in shapes {
        t.add(*name, Weight::from_vec(shape.clone(), vec![f16::ONE; shape.iter().product()]));
    }
    t
}

fn attention(g: &mut Graph, kv_len: KvLen, causal: bool, q_len: usize) -> Attention {
    let (q, k) = (g.buffer("q", 2 * q_len, 4 * 8), g.buffer("k", 2 * 16, 2 * 8));
    let out = g.buffer("o", 2 * q_len, 4 * 8);
    Attention {
        q: q.into(),
        k: k.into(),
        v: k.into(),
        out,
        batch: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        q_len,
        kv_len,
        kv_batch_stride: 16,
        causal,
        scale: 1.0,
        key_mask: None,
        mask_per_query: false,
        head_bias: None,
    }
}

#[test]
fn attention_flops_count_the_keys_each_row_sees() {
    let w = WeightTable::default();
    let mut g = Graph::new();
    // 4 FLOPs per (head dim x key) for QKᵀ and PV; batch 2 x 4 heads x 8 dims = 64 per key.
    let per_key = 4.0 * 2.0 * 4.0 * 8.0;
    let full = attention(&mut g, KvLen::Fixed(10), false, 3);
    assert_eq!(op_flops(&Op::Attention(full), &w, 0), per_key * 30.0);
    // Causal self-attention over 3 rows: 1 + 2 + 3 keys.
    let causal = attention(&mut g, KvLen::Fixed(3), true, 3);
    assert_eq!(op_flops(&Op::Attention(causal), &w, 0), per_key * 6.0);
    // Over a cache holding 5 tokens: rows see 6, 7, 8 keys causally, 8 each otherwise.
    let cached = attention(&mut g, KvLen::Cache, true, 3);
    assert_eq!(op_flops(&Op::Attention(cached), &w, 5), per_key * 21.0);
    let cached_full = attention(&mut g, KvLen::Cache, false, 3);
    assert_eq!(op_flops(&Op::Attention(cached_full), &w, 5), per_key * 24.0);
}

#[test]
fn phase_bytes_are_weights_inputs_outputs_and_cache() {
    let w = table(&[("emb", vec![50, 4]), ("fc", vec![6, 4]), ("fc_b", vec![6]), ("head", vec![50, 6])]);
    let (emb, fc, fc_b, head) =
        (glimpse::graph::W(0), glimpse::graph::W(1), glimpse::graph::W(2), glimpse::graph::W(3));
    let mut g = Graph::new();
    let x = g.buffer("x", 3, 4);
    let prev = g.buffer("prev", 3, 6); // written by an earlier phase
    let h = g.buffer("h", 3, 6);
    let logits = g.buffer("logits", 3, 50);
    g.push(Op::Embed { table: emb, out: x });
    g.linear(x, fc, Some(fc_b), Fused::add(Activation::Gelu, Some(prev)), h, 3);
    g.linear(h, head, None, Fused::NONE, logits, 3);
    let phase = g.take_phase("step");
    let cost = GraphCost { graph: &g, weights: &w, act_bytes: 4.0 };

    let flops = 2.0 * 3.0 * (6.0 * 4.0 + 50.0 * 6.0);
    // Weights: 3 gathered embedding rows of 4, fc + bias, head (fp16). Activations (f32): the
    // earlier phase's `prev` in, the logits out (the host reads them); `x` and `h` stay inside.
    let weights = (3.0 * 4.0 + 6.0 * 4.0 + 6.0 + 50.0 * 6.0) * 2.0;
    let io = (3.0 * 6.0 + 3.0 * 50.0) * 4.0;
    let c = cost.phase(&phase, 0, &[], &[logits]);
    assert_eq!((c.flops, c.bytes), (flops, weights + io));
    // Without the host reading the logits they are not an output of the phase.
    assert_eq!(cost.phase(&phase, 0, &[], &[]).bytes, weights + 3.0 * 6.0 * 4.0);
}

#[test]
fn a_tied_head_reads_the_whole_table_once() {
    let w = table(&[("emb", vec![50, 4])]);
    let emb = glimpse::graph::W(0);
    let mut g = Graph::new();
    let x = g.buffer("x", 2, 4);
    let logits = g.buffer("logits", 2, 50);
    g.push(Op::Embed { table: emb, out: x });
    g.linear(x, emb, None, Fused::NONE, logits, 2);
    let phase = g.take_phase("step");
    let c = GraphCost { graph: &g, weights: &w, act_bytes: 2.0 }.phase(&phase, 0, &[], &[]);
    assert_eq!(c.bytes, 50.0 * 4.0 * 2.0);
}

#[test]
fn cache_reads_grow_with_position() {
    let w = WeightTable::default();
    let mut g = Graph::new();
    let a = attention(&mut g, KvLen::Cache, true, 1);
    g.push(Op::Attention(a));
    let phase = g.take_phase("decode");
    let cost = GraphCost { graph: &g, weights: &w, act_bytes: 2.0 };
    // K and V: batch 2 x 2 kv heads x 8 dims per key, fp16; the q rows are the phase's input.
    let q_in = (2 * 32) as f64 * 2.0;
    let per_key = 2.0 * (2 * 2 * 8) as f64 * 2.0;
    assert_eq!(cost.phase(&phase, 9, &[], &[]).bytes, q_in + per_key * 10.0);
    assert_eq!(cost.phase(&phase, 19, &[], &[]).bytes, q_in + per_key * 20.0);
}
