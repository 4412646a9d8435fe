#!/usr/bin/env python3
"""Tiny IDEFICS (`IdeficsForVisionText2Text`, transformers 5.17.0) models and their goldens.

Writes only tests/fixtures/idefics-tiny*/ and tests/fixtures/goldens/idefics_*:

  idefics-tiny/         the model as 5.17 save_pretrained writes it (fp16): IDEFICS vision transformer
                        (CLIP-like, 2 layers, hidden 32, 30 px images, patch 6: 26 tokens with CLS), the
                        Perceiver Resampler (6 latents, depth 2, 2 heads of 16, qk layer norms), a LLaMA
                        decoder (2 layers, hidden 64, 4 heads of 16: head sizes the CUDA kernels take) with a gated cross-attention layer before every
                        layer (cross_layer_interval 1), float alphas, qk layer norms, decoupled
                        embeddings and head (vocab_size + 2 additional ids), the LLaMA-style tokenizer
                        with <fake_token_around_image>, <image> and <end_of_utterance>, and the processor
  idefics-tiny-plain/   the other paths: no resampler (every vision token, CLS included, is a key),
                        cross_layer_interval 2 over 4 layers, vector alphas, no qk layer norms
  goldens/idefics_<model>.json + .safetensors: per case the interleaved prompt, the processor's text,
                        input ids and per-token image index (image_attention_mask as an index, -1 for
                        none), pixel values, the vision tower's last hidden state, the resampler output,
                        the last 6 prefill logit rows, and 8 greedy tokens with their log-probs and text

Every alpha is random and nonzero (transformers initializes them to zero, which would hide every
cross-attention path). Reference: float32, eager attention, CPU, one thread. Run standalone or from
make_fixtures.py.
"""
from __future__ import annotations

import shutil

import torch
from PIL import Image
from safetensors.numpy import save_file as np_save_file

import fixtures_common as fc
from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsImageProcessorPil, IdeficsProcessor
from transformers.models.idefics.processing_idefics import image_attention_mask_for_packed_input_ids

SEED = 9090
MAX_NEW_TOKENS = 8
LOGIT_ROWS = 6
IMAGE, PATCH = 30, 6
SPECIALS = ["<fake_token_around_image>", "<end_of_utterance>"]
# (name, interleaved prompt: strings are text, ("img", file) an image)
CASES = [
    ("one", ["User:", ("img", "wide_301x97.png"), "Describe this image.\nAssistant:"]),
    ("two", ["User:", ("img", "tall_83x311.png"), "What is this?\nAssistant: A cat.\n", "User:",
             ("img", "odd_257x181.png"), " And this? \nAssistant:"]),
    ("three", ["Look at these pictures", ("img", "palette_100x80.png"), ("img", "grey_67x45.png"),
               "and then", ("img", "photo_q90.jpg"), "Which is brightest?</s>Answer:"]),
]
MODELS = {
    "idefics-tiny": dict(use_resampler=True, cross_layer_interval=1, alpha_type="float", qk_layer_norms=True,
                         qk_layer_norms_perceiver=True, num_hidden_layers=2),
    "idefics-tiny-plain": dict(use_resampler=False, cross_layer_interval=2, alpha_type="vector",
                               qk_layer_norms=False, qk_layer_norms_perceiver=False, num_hidden_layers=4),
}


def make_processor(workdir) -> IdeficsProcessor:
    tok = fc.llama_bpe_tokenizer(workdir)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    image_processor = IdeficsImageProcessorPil(image_size=IMAGE)
    return IdeficsProcessor(image_processor=image_processor, tokenizer=tok, image_size=IMAGE)


def build_config(tok, variant: dict) -> IdeficsConfig:
    total = len(tok)
    # <image> and <pad> (nn.Embedding's padding_idx) in the main table; <fake_token_around_image> and
    # <end_of_utterance> in the additional one, as idefics-9b's two additional ids.
    vocab = max(tok.convert_tokens_to_ids("<image>"), tok.pad_token_id) + 1
    vision = dict(embed_dim=32, image_size=IMAGE, patch_size=PATCH, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, hidden_act="gelu", layer_norm_eps=1e-5)
    perceiver = dict(use_resampler=variant["use_resampler"], resampler_n_latents=6, resampler_depth=2,
                     resampler_n_heads=2, resampler_head_dim=16,
                     qk_layer_norms_perceiver=variant["qk_layer_norms_perceiver"])
    return IdeficsConfig(vocab_size=vocab, additional_vocab_size=total - vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=variant["num_hidden_layers"], num_attention_heads=4, rms_norm_eps=1e-6,
                         max_position_embeddings=512, cross_layer_interval=variant["cross_layer_interval"],
                         alpha_type=variant["alpha_type"], alpha_initializer="zeros",
                         qk_layer_norms=variant["qk_layer_norms"], use_resampler=variant["use_resampler"],
                         vision_config=vision, perceiver_config=perceiver, pad_token_id=tok.pad_token_id,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def load_prompt(items):
    return [Image.open(fc.FIX / "images" / it[1]) if isinstance(it, tuple) else it for it in items]


def goldens(model, proc, name: str) -> tuple[dict, list]:
    tensors, cases = {}, []
    for cname, items in CASES:
        prompt = load_prompt(items)
        inputs = proc(text=prompt, return_tensors="pt")
        ids, px, iam = inputs["input_ids"], inputs["pixel_values"], inputs["image_attention_mask"]
        index, _ = image_attention_mask_for_packed_input_ids(ids.clone(), proc.tokenizer, "pt")
        assert torch.equal(torch.nn.functional.one_hot(index.clamp(min=0), px.shape[1]) * (index >= 0)[..., None],
                           iam.long()), "image index replica"
        with torch.no_grad():
            frames = px[0]
            hidden = model.model.vision_model(pixel_values=frames).last_hidden_state
            resampled = model.model.perceiver_resampler(hidden) if model.config.use_resampler else None
            out = model(**inputs)
            logits = out.logits[0]
            ref = out.image_hidden_states[0].reshape(-1, hidden.shape[-1])
            assert torch.equal(ref, (resampled if resampled is not None else hidden).reshape(-1, hidden.shape[-1]))
            gen = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS,
                                 min_new_tokens=MAX_NEW_TOKENS, output_logits=True, return_dict_in_generate=True)
        new = gen.sequences[0, ids.shape[1]:].tolist()
        lps = [torch.log_softmax(l[0].double(), -1)[t].item() for l, t in zip(gen.logits, new)]
        margins = [float((lambda s: s[0] - s[1])(torch.topk(l[0], 2).values)) for l in gen.logits]
        tensors[f"{cname}.pixels"] = fc.f32(frames)
        tensors[f"{cname}.vision"] = fc.f32(hidden)
        if resampled is not None:
            tensors[f"{cname}.resampler"] = fc.f32(resampled)
        tensors[f"{cname}.logits"] = fc.f32(logits[-LOGIT_ROWS:])
        text = proc.tokenizer.decode(ids[0], skip_special_tokens=False)
        cases.append({"name": cname, "items": [list(it) if isinstance(it, tuple) else it for it in items],
                      "text": text, "input_ids": ids[0].tolist(), "image_index": index[0].tolist(),
                      "images": int(px.shape[1]), "generated_ids": new, "logprobs": lps,
                      "decoded": proc.tokenizer.decode(new, skip_special_tokens=True),
                      "min_top2_margin": min(margins), "logit_rows": LOGIT_ROWS})
        fc.log(f"  {name} {cname}: {px.shape[1]} images, {ids.shape[1]} ids, generated {new}, "
               f"min margin {min(margins):.4f}")
    return tensors, cases


def main() -> None:
    for name in MODELS:
        for p in [fc.FIX / name] + list(fc.GOLD.glob(f"{name.replace('-', '_')}.*")):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    for i, (name, variant) in enumerate(MODELS.items()):
        out = fc.FIX / name
        proc = make_processor(out)
        cfg = build_config(proc.tokenizer, variant)
        torch.manual_seed(SEED + i)
        model = IdeficsForVisionText2Text(cfg).eval()
        fc.reinit_randn_(model, SEED + i)
        model.to(torch.float16).save_pretrained(out)
        proc.save_pretrained(out)
        model = IdeficsForVisionText2Text.from_pretrained(out, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
        tensors, cases = goldens(model, proc, name)
        gold = fc.GOLD / name.replace("-", "_")
        np_save_file(tensors, str(gold.with_suffix(".safetensors")))
        fc.write_json(gold.with_suffix(".json"), {
            "model": name,
            "reference": "IdeficsForVisionText2Text.from_pretrained(dir, dtype=float32, attn_implementation='eager'),"
                         " CPU; IdeficsProcessor(text=interleaved prompt); generate(do_sample=False, "
                         f"max_new_tokens={MAX_NEW_TOKENS}, min_new_tokens={MAX_NEW_TOKENS})",
            "cases": cases,
        })
    files = [p for name in MODELS for p in (fc.FIX / name).glob("*")] + list(fc.GOLD.glob("idefics_tiny*"))
    fc.log(f"idefics fixtures: {sum(p.stat().st_size for p in files) / 1e3:.0f} KB")


if __name__ == "__main__":
    main()
