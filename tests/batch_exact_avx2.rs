//! tests/batch_exact.rs's executor and model checks on the forced `avx2` CPU path
//! (`GLIMPSE_CPU_ISA=avx2`: the `gemm` crate's GEMM, the AVX2 GEMVs). One test, in its own
//! binary, because the variable is read once per process and must be set before anything reads
//! it.

mod common;
#[path = "batch_exact/shared.rs"]
mod shared;

#[test]
fn on_the_avx2_path_batched_rows_and_answers_equal_them_alone() {
    if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
        println!("skipped: this CPU lacks AVX2 + FMA, so the avx2 path is not what it would run");
        return;
    }
    std::env::set_var("GLIMPSE_CPU_ISA", "avx2");
    assert_eq!(glimpse::backend::cpu::gemm::selected(), Ok(glimpse::backend::cpu::gemm::Isa::Avx2));
    shared::decode_step_rows_equal_rows_alone("avx2 decode");
    shared::prefill_rows_equal_rows_alone("avx2 prefill");
    shared::batched_answers_equal_answers_alone("blip2-opt-tiny", true);
    shared::batched_answers_equal_answers_alone("blip2-flan-t5-tiny", false);
}
