//! Sizes the reference CPU ops and the CUDA launchers take alike, one named struct per group of
//! arguments that always travel together.

/// The sizes of a linear layer's product `Y[m, n] = X[m, k] · W[n, k]ᵀ`: `m` rows (tokens), `n`
/// output features, `k` input features (PyTorch `Linear` layout for W).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmDims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// One normalisation call (LayerNorm, RMSNorm): `rows` rows of `dim` values, each normalised
/// over its `dim` values with `eps` added to the variance (mean square).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormShape {
    pub rows: usize,
    pub dim: usize,
    pub eps: f32,
}
