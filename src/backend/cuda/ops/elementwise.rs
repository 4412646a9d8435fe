//! kernels/elementwise.cu: embeddings, positions, image-token scatter, patch im2col, adds, casts,
//! KV append.

use half::f16;

use super::*;
use crate::backend::cuda::error::{bad, GpuResult};
use crate::backend::cuda::memory::{same, DevSlice, DeviceScalar};
use crate::backend::cuda::CudaDevice;

/// Pixel storage accepted by [`CudaDevice::patch_im2col`].
pub trait PixelType: DeviceScalar {
    const IM2COL: &'static str;
}
impl PixelType for f32 {
    const IM2COL: &'static str = "patch_im2col_f32";
}
impl PixelType for f16 {
    const IM2COL: &'static str = "patch_im2col_f16";
}

/// A batch of sequences in one row-major buffer `[batch, seq, dim]`: `seq` rows of `dim`
/// elements per sequence (tokens, patches, or the slots of a KV cache).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqDims {
    pub batch: usize,
    pub seq: usize,
    pub dim: usize,
}

/// A batch of images `[batch, channels, height, width]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageDims {
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

/// One new K row and one new V row per sequence: those of sequence `b` start at element
/// `b * row_stride` of `k` and of `v` (e.g. column slices of a fused qkv buffer).
#[derive(Clone, Copy, Debug)]
pub struct KvRows<'a> {
    pub k: &'a DevSlice<f16>,
    pub v: &'a DevSlice<f16>,
    pub row_stride: usize,
}

impl CudaDevice {
    /// Token embeddings: out[t] = table[ids[t]] for `tokens` ids (device memory).
    pub fn embed_rows(
        &self,
        ids: &DevSlice<i32>,
        table: &DevSlice<f16>,
        out: &DevSlice<f16>,
        tokens: usize,
        dim: usize,
    ) -> GpuResult<()> {
        const K: &str = "embed_rows";
        if tokens == 0 || dim == 0 || table.len() < dim {
            return Err(bad(K, "empty shape or table smaller than one row"));
        }
        need(K, "ids", ids, tokens)?;
        need(K, "out", out, tokens * dim)?;
        disjoint(K, "out", out, "table", table)?;
        disjoint(K, "out", out, "ids", ids)?;
        let vocab = to_i32(K, "vocab", table.len() / dim)?;
        let (t, d) = (to_i32(K, "tokens", tokens)?, to_i32(K, "dim", dim)?);
        let cfg = blocks_of((t as u32, 1, 1), 256);
        let (ip, tp, op) = (ids.ptr(), table.ptr(), out.ptr());
        // SAFETY: ids hold >= tokens ints and out >= tokens*dim halves (checked); vocab is the
        // table's row count, so the device-side id check keeps the gather inside the table; out
        // is disjoint from the inputs; one block per token.
        unsafe { self.launch("elementwise", K, cfg, &[&ip, &tp, &op, &t, &d, &vocab]) }
    }

    /// Learned positions in place on x `[batch, seq, dim]`: x[b, i] += table[max(pos[b] + i, 0) +
    /// offset] for i < seq, with the signed start positions `pos` [batch] (position - left pad)
    /// in device memory.
    pub fn add_positions(
        &self,
        x: &DevSlice<f16>,
        table: &DevSlice<f16>,
        pos: &DevSlice<i32>,
        dims: SeqDims,
        offset: i32,
    ) -> GpuResult<()> {
        const K: &str = "add_positions";
        let SeqDims { batch, seq, dim } = dims;
        if batch == 0 || seq == 0 || dim == 0 || table.len() < dim {
            return Err(bad(K, "empty shape or table smaller than one row"));
        }
        need(K, "x", x, batch * seq * dim)?;
        need(K, "pos", pos, batch)?;
        disjoint(K, "x", x, "table", table)?;
        disjoint(K, "x", x, "pos", pos)?;
        let npos = to_i32(K, "npos", table.len() / dim)?;
        let (s, d) = (to_i32(K, "seq", seq)?, to_i32(K, "dim", dim)?);
        let rows = to_i32(K, "rows", batch * seq)?;
        let cfg = blocks_of((rows as u32, 1, 1), 256);
        let (xp, tp, pp) = (x.ptr(), table.ptr(), pos.ptr());
        // SAFETY: x holds batch*seq*dim halves and pos batch ints (checked); npos is the table's
        // row count and the kernel skips positions outside it; x is disjoint from the table and
        // pos; one block per row of x.
        unsafe { self.launch("elementwise", K, cfg, &[&xp, &tp, &pp, &s, &d, &npos, &offset]) }
    }

    /// Overwrites, per sequence, the rows whose id == image_token with consecutive rows of
    /// `image_embeds` [B, n_img, D] (in place on `embeds` [B, S, D], the sizes `dims`).
    pub fn image_scatter(
        &self,
        ids: &DevSlice<i32>,
        embeds: &DevSlice<f16>,
        image_embeds: &DevSlice<f16>,
        dims: SeqDims,
        n_img: usize,
        image_token: i32,
    ) -> GpuResult<()> {
        const K: &str = "image_scatter";
        let SeqDims { batch, seq, dim } = dims;
        if batch == 0 || seq == 0 || dim == 0 {
            return Err(bad(K, "empty shape"));
        }
        need(K, "ids", ids, batch * seq)?;
        need(K, "embeds", embeds, batch * seq * dim)?;
        need(K, "image_embeds", image_embeds, batch * n_img * dim)?;
        disjoint(K, "embeds", embeds, "image_embeds", image_embeds)?;
        disjoint(K, "embeds", embeds, "ids", ids)?;
        let cfg = blocks_of((grid_yz(K, "batch", batch)?, 1, 1), 32);
        let (s, d, n) = (to_i32(K, "seq", seq)?, to_i32(K, "dim", dim)?, to_i32(K, "n_img", n_img)?);
        let (ip, ep, mp) = (ids.ptr(), embeds.ptr(), image_embeds.ptr());
        // SAFETY: ids >= B*S, embeds >= B*S*D, image_embeds >= B*n_img*D (checked); the kernel
        // never uses an image row index >= n_img; embeds disjoint from the other inputs; one
        // warp per sequence.
        unsafe { self.launch("elementwise", "image_scatter", cfg, &[&ip, &ep, &mp, &s, &d, &n, &image_token]) }
    }

    /// im2col for a patch x patch, stride patch conv over pixels [B, C, H, W] (f32 or f16) into
    /// out [B * (H/patch) * (W/patch), C*patch*patch] fp16.
    pub fn patch_im2col<T: PixelType>(
        &self,
        pixels: &DevSlice<T>,
        out: &DevSlice<f16>,
        image: ImageDims,
        patch: usize,
    ) -> GpuResult<()> {
        const K: &str = "patch_im2col";
        let ImageDims { batch, channels, height, width } = image;
        if batch == 0 || channels == 0 || patch == 0 || height < patch || width < patch {
            return Err(bad(K, "empty shape or image smaller than one patch"));
        }
        let p = (height / patch) * (width / patch);
        need(K, "pixels", pixels, batch * channels * height * width)?;
        let total = batch * p * channels * patch * patch;
        need(K, "out", out, total)?;
        disjoint(K, "out", out, "pixels", pixels)?;
        let name = T::IM2COL;
        let cfg = elementwise_cfg(total, self.num_sms());
        let (b, c, h, w, pt) = (
            to_i32(K, "batch", batch)?,
            to_i32(K, "channels", channels)?,
            to_i32(K, "height", height)?,
            to_i32(K, "width", width)?,
            to_i32(K, "patch", patch)?,
        );
        let (ip, op) = (pixels.ptr(), out.ptr());
        // SAFETY: pixels hold B*C*H*W elements and out B*P*C*patch^2 (checked); the grid-stride
        // loop stops at that total; out and pixels are disjoint.
        unsafe { self.launch("elementwise", name, cfg, &[&ip, &op, &b, &c, &h, &w, &pt]) }
    }

    /// ViT embeddings: out[b,0] = cls + pos[0]; out[b,1+p] = patches[b,p] + pos[1+p], with
    /// patches `[batch, seq, dim]` (`seq` = patches per image) and out `[batch, seq + 1, dim]`.
    /// Without `cls` (SigLIP): out[b,p] = patches[b,p] + pos[p], out `[batch, seq, dim]`.
    pub fn vit_embed(
        &self,
        patches: &DevSlice<f16>,
        cls: Option<&DevSlice<f16>>,
        pos: &DevSlice<f16>,
        out: &DevSlice<f16>,
        dims: SeqDims,
    ) -> GpuResult<()> {
        const K: &str = "vit_embed";
        let SeqDims { batch, seq: num_patches, dim } = dims;
        if batch == 0 || dim == 0 {
            return Err(bad(K, "empty shape"));
        }
        let lead = usize::from(cls.is_some());
        need(K, "patches", patches, batch * num_patches * dim)?;
        need(K, "pos", pos, (num_patches + lead) * dim)?;
        let total = batch * (num_patches + lead) * dim;
        need(K, "out", out, total)?;
        disjoint(K, "out", out, "patches", patches)?;
        disjoint(K, "out", out, "pos", pos)?;
        if let Some(cls) = cls {
            need(K, "cls", cls, dim)?;
            disjoint(K, "out", out, "cls", cls)?;
        }
        let cfg = elementwise_cfg(total, self.num_sms());
        let (b, np, d) = (to_i32(K, "batch", batch)?, to_i32(K, "num_patches", num_patches)?, to_i32(K, "dim", dim)?);
        let c = lead as i32;
        // No class token: a null pointer the kernel never reads (C = 0).
        let (pp, cp, ep, op) = (patches.ptr(), cls.map_or(0, |c| c.ptr()), pos.ptr(), out.ptr());
        // SAFETY: all lengths checked against B*(P+C)*D / B*P*D / (P+C)*D / D; out disjoint from
        // the inputs; grid-stride loop bounded by the total; cls is read only when C = 1.
        unsafe { self.launch("elementwise", "vit_embed", cfg, &[&pp, &cp, &ep, &op, &b, &np, &d, &c]) }
    }

    /// y = a + b (n elements); y may be exactly a or b.
    pub fn add(&self, a: &DevSlice<f16>, b: &DevSlice<f16>, y: &DevSlice<f16>, n: usize) -> GpuResult<()> {
        const K: &str = "add_f16";
        need(K, "a", a, n)?;
        need(K, "b", b, n)?;
        need(K, "y", y, n)?;
        let a_n = a.slice(0, n).unwrap();
        let b_n = b.slice(0, n).unwrap();
        let y_n = y.slice(0, n).unwrap();
        for (name, s) in [("a", &a_n), ("b", &b_n)] {
            if overlaps(&y_n, s) && !same(&y_n, s) {
                return Err(bad(K, format!("y partially overlaps {name}")));
            }
        }
        if n == 0 {
            return Ok(());
        }
        let cfg = elementwise_cfg(n, self.num_sms());
        let (ap, bp, yp, nn) = (a.ptr(), b.ptr(), y.ptr(), n as i64);
        // SAFETY: a, b, y hold >= n elements; y is exactly a/b or disjoint (same-thread
        // read-then-write); grid-stride loop bounded by n.
        unsafe { self.launch("elementwise", K, cfg, &[&ap, &bp, &yp, &nn]) }
    }

    /// f32 -> f16 (round to nearest even), n elements.
    pub fn cast_f32_f16(&self, x: &DevSlice<f32>, y: &DevSlice<f16>, n: usize) -> GpuResult<()> {
        self.cast("cast_f32_f16", x, y, n)
    }
    /// f16 -> f32, n elements.
    pub fn cast_f16_f32(&self, x: &DevSlice<f16>, y: &DevSlice<f32>, n: usize) -> GpuResult<()> {
        self.cast("cast_f16_f32", x, y, n)
    }
    fn cast<A: DeviceScalar, B: DeviceScalar>(
        &self,
        name: &'static str,
        x: &DevSlice<A>,
        y: &DevSlice<B>,
        n: usize,
    ) -> GpuResult<()> {
        need(name, "x", x, n)?;
        need(name, "y", y, n)?;
        disjoint(name, "y", y, "x", x)?;
        if n == 0 {
            return Ok(());
        }
        let cfg = elementwise_cfg(n, self.num_sms());
        let (xp, yp, nn) = (x.ptr(), y.ptr(), n as i64);
        // SAFETY: x and y hold >= n elements of the kernel's types, do not overlap; the
        // grid-stride loop is bounded by n.
        unsafe { self.launch("elementwise", name, cfg, &[&xp, &yp, &nn]) }
    }

    /// Appends one token's k/v rows per sequence (`new`) at position pos[b] (device memory) of
    /// caches `[B, max_len, row]` (`cache`: `seq` = max_len, `dim` = row).
    pub fn kv_append(
        &self,
        new: KvRows<'_>,
        k_cache: &DevSlice<f16>,
        v_cache: &DevSlice<f16>,
        pos: &DevSlice<i32>,
        cache: SeqDims,
    ) -> GpuResult<()> {
        const K: &str = "kv_append";
        let KvRows { k: k_new, v: v_new, row_stride: new_row_stride } = new;
        let SeqDims { batch, seq: max_len, dim: row } = cache;
        if batch == 0 || max_len == 0 || row == 0 || new_row_stride < row {
            return Err(bad(K, "empty shape or new_row_stride < row"));
        }
        let new_len = (batch - 1) * new_row_stride + row;
        need(K, "k_new", k_new, new_len)?;
        need(K, "v_new", v_new, new_len)?;
        need(K, "k_cache", k_cache, batch * max_len * row)?;
        need(K, "v_cache", v_cache, batch * max_len * row)?;
        need(K, "pos", pos, batch)?;
        for (cn, c) in [("k_cache", k_cache), ("v_cache", v_cache)] {
            disjoint(K, cn, c, "k_new", k_new)?;
            disjoint(K, cn, c, "v_new", v_new)?;
            disjoint(K, cn, c, "pos", pos)?;
        }
        disjoint(K, "k_cache", k_cache, "v_cache", v_cache)?;
        let cfg = blocks_of((grid_yz(K, "batch", batch)?, 1, 1), 256);
        let (kn, vn, rs, kc, vc, pp) =
            (k_new.ptr(), v_new.ptr(), new_row_stride as i64, k_cache.ptr(), v_cache.ptr(), pos.ptr());
        let (ml, r) = (to_i32(K, "max_len", max_len)?, to_i32(K, "row", row)?);
        // SAFETY: new rows (B-1)*stride + row and caches B*max_len*row elements fit (checked);
        // positions are range-checked on device (out-of-range sequences skipped); caches are
        // disjoint from the sources and each other; one block per sequence.
        unsafe { self.launch("elementwise", K, cfg, &[&kn, &vn, &rs, &kc, &vc, &pp, &ml, &r]) }
    }

    /// x[i] += delta for the first n ints (advance positions / KV lengths on device).
    pub fn add_i32(&self, x: &DevSlice<i32>, delta: i32, n: usize) -> GpuResult<()> {
        const K: &str = "add_i32";
        need(K, "x", x, n)?;
        if n == 0 {
            return Ok(());
        }
        let nn = to_i32(K, "n", n)?;
        let cfg = blocks_of(((n as u32).div_ceil(256), 1, 1), 256);
        let xp = x.ptr();
        // SAFETY: x holds >= n ints; threads with i >= n do nothing.
        unsafe { self.launch("elementwise", K, cfg, &[&xp, &delta, &nn]) }
    }
}
