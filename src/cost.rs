//! What a phase of a graph must at least move and compute, read off its ops: the floors of
//! `glimpse bench` for any model family, with no per-model formulas.
//!
//! FLOPs: 2 per multiply-add of every Linear and of the patch convolution, and of attention's
//! QKᵀ and PV over the keys each query row actually sees (causal rows see fewer); norms, RoPE
//! and elementwise ops are ignored (they are not where the time can go).
//!
//! Bytes: every weight the phase reads, once (fp16, or the quantized values and scales of a
//! weight quantized at load), except gathers that read only the rows
//! they need (token embeddings: one row per token; learned positions: the step's rows); the KV
//! cache rows attention reads and `KvAppend` writes; the phase's inputs (buffers it reads before
//! writing them, e.g. pixels or the previous phase's result) and its outputs (buffers it writes
//! that a later phase or the host reads: the next phase's input, the logits). Intermediate
//! activations are not counted: these are lower bounds, not estimates.

use std::collections::HashSet;

use crate::graph::{Buf, Graph, KvLen, Op, Phase, WeightTable};

/// Bytes a phase must move and FLOPs it must do.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cost {
    pub bytes: f64,
    pub flops: f64,
}

/// The cost of the phases of one graph.
pub struct GraphCost<'a> {
    pub graph: &'a Graph,
    pub weights: &'a WeightTable,
    /// Bytes per activation element (4 on the CPU executor, 2 on the GPU).
    pub act_bytes: f64,
}

impl GraphCost<'_> {
    /// `phase` run with `position` tokens already in the KV cache. `later` are the phases that
    /// may run after it and `host_reads` the buffers the host reads back (logits): a buffer
    /// `phase` writes is an output when one of them reads it.
    pub fn phase(&self, phase: &Phase, position: usize, later: &[&Phase], host_reads: &[Buf]) -> Cost {
        let mut flops = 0.0;
        let mut cache_bytes = 0.0;
        // Weights read in full count once; gathers (token rows, position rows) count the rows
        // they read, unless the same weight is also read in full (a tied lm_head).
        let mut full = HashSet::new();
        let mut gathered = std::collections::HashMap::new();
        for op in &phase.ops {
            flops += op_flops(op, self.weights, position);
            cache_bytes += self.cache_traffic(op, position);
            for w in op.weights() {
                let row = self.weights.get(w).shape.iter().skip(1).product::<usize>() as f64 * 2.0;
                match *op {
                    Op::Embed { out, .. } => {
                        *gathered.entry(w).or_insert(0.0) += self.graph.desc(out).rows as f64 * row
                    }
                    Op::AddPositions { rows_per_batch, .. } => {
                        *gathered.entry(w).or_insert(0.0) += rows_per_batch as f64 * row
                    }
                    _ => {
                        full.insert(w);
                    }
                }
            }
        }
        let weight_bytes = full.iter().map(|&w| self.weights.get(w).stored_bytes() as f64).sum::<f64>()
            + gathered.iter().filter(|(w, _)| !full.contains(*w)).map(|(_, b)| b).sum::<f64>();
        let (inputs, written) = reads_before_writes(phase);
        let read_later: HashSet<Buf> =
            later.iter().flat_map(|p| reads_before_writes(p).0).chain(host_reads.iter().copied()).collect();
        let size = |b: &Buf| {
            let d = self.graph.desc(*b);
            (d.rows * d.cols) as f64 * self.act_bytes
        };
        let io_bytes = inputs.iter().map(size).sum::<f64>()
            + written.iter().filter(|b| read_later.contains(b)).map(size).sum::<f64>();
        Cost { bytes: weight_bytes + cache_bytes + io_bytes, flops }
    }

    /// KV cache bytes an op reads (attention over the cache) or writes (`KvAppend`).
    fn cache_traffic(&self, op: &Op, position: usize) -> f64 {
        match *op {
            Op::Attention(ref a) if a.kv_len == KvLen::Cache => {
                let keys = (position + a.q_len) as f64;
                2.0 * (a.batch * a.kv_heads * a.head_dim) as f64 * keys * self.act_bytes
            }
            Op::KvAppend { batch, rows_per_batch, cache_k, .. } => {
                2.0 * (batch * rows_per_batch * self.graph.desc(cache_k).cols) as f64 * self.act_bytes
            }
            _ => 0.0,
        }
    }
}

/// The buffers `phase` reads before writing them (its inputs) and those it writes, KV caches
/// excluded from both.
fn reads_before_writes(phase: &Phase) -> (HashSet<Buf>, HashSet<Buf>) {
    let caches: HashSet<Buf> = phase.ops.iter().flat_map(cache_buffers).collect();
    let (mut inputs, mut written) = (HashSet::new(), HashSet::new());
    for op in &phase.ops {
        inputs.extend(op.inputs().into_iter().filter(|b| !written.contains(b) && !caches.contains(b)));
        written.extend(op.outputs().into_iter().filter(|b| !caches.contains(b)));
    }
    (inputs, written)
}

/// The KV cache buffers an op reads or writes (counted by [`GraphCost::cache_traffic`], not as
/// phase inputs or outputs).
fn cache_buffers(op: &Op) -> Vec<Buf> {
    match *op {
        Op::Attention(ref a) if a.kv_len == KvLen::Cache => vec![a.k.buf, a.v.buf],
        Op::KvAppend { cache_k, cache_v, .. } => vec![cache_k, cache_v],
        _ => vec![],
    }
}

/// FLOPs of one op with `position` tokens already cached.
pub fn op_flops(op: &Op, weights: &WeightTable, position: usize) -> f64 {
    match *op {
        Op::Linear { weight, rows, .. } => 2.0 * rows as f64 * weights.get(weight).numel() as f64,
        Op::PatchEmbed { weight, batch, image_size, patch, .. } => {
            let patches = (image_size / patch).pow(2);
            2.0 * (batch * patches) as f64 * weights.get(weight).numel() as f64
        }
        Op::Attention(ref a) => {
            // Keys seen, summed over the query rows of one (batch, head): row i of a causal
            // pass sees `before + i + 1` keys, every row of a full pass sees them all.
            let q = a.q_len;
            let (before, total) = match a.kv_len {
                KvLen::Fixed(n) => (n.saturating_sub(q), n),
                KvLen::Cache => (position, position + q),
            };
            let seen = if a.causal { (q * before + q * (q + 1) / 2) as f64 } else { (q * total) as f64 };
            4.0 * (a.batch * a.heads * a.head_dim) as f64 * seen
        }
        _ => 0.0,
    }
}
