"""Tiny LLaVA-1.5 fixtures for glimpse (transformers 5.17.0, Pillow 13, no torchvision).

    python scripts/fixtures_llava.py

Writes only tests/fixtures/llava-tiny*/ and tests/fixtures/goldens/llava_*:

  llava-tiny/       LlavaForConditionalGeneration as 5.17 save_pretrained writes it (fp16): CLIP
                    vision tower (3 layers, patch 6, 24 px), MLP projector, LLaMA decoder (GQA 4q/2kv,
                    explicit head_dim 16 != hidden/heads, rope_theta 5e5, rms eps 1e-5, untied head),
                    LLaMA-style BPE tokenizer with byte fallback (legacy false), chat template,
                    processor_config.json (patch_size 6, num_additional_image_tokens 1).
  llava-tiny-variant/  the rare paths: vision_feature_layer [-1, 1], strategy "full", llama3 rope
                    scaling, attention_bias + mlp_bias, tied embeddings, projector without bias,
                    2 vision layers.
  goldens/llava_<model>.json + .safetensors: per case the rendered prompt, input ids, selected
                    features, projector output, the last 6 prefill logit rows, greedy tokens /
                    log-probs / text (8 new tokens); llava-tiny also pixel values (single-image cases), and for its
                    "single" case every vision hidden state and the pooler output.
  goldens/llava_tokens.json: encode/decode goldens of the LLaMA tokenizer: LlamaTokenizer's 5.17
                    rebuild, and AutoTokenizer on the llava folder (file as it is).

Deterministic: fixed seeds, one CPU thread.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_common as fc  # noqa: E402  (version checks, helpers, the LLaMA tokenizer and init)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.numpy import save_file as np_save_file  # noqa: E402
from transformers import (  # noqa: E402
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

FIX = fc.FIX
GOLD = FIX / "goldens"
SEED = 1234
MAX_NEW_TOKENS = 8
LOGIT_ROWS = 6
PATCH, IMAGE = 6, 24
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# What `glimpse caption` asks a chat model (README: caption on LLaVA).
CAPTION_INSTRUCTION = "Describe the image in one sentence."

CASES = [
    ("single", ["odd_257x181.png"], "What is shown here?"),
    ("caption", ["wide_301x97.png"], CAPTION_INSTRUCTION),
    ("multi", ["tall_83x311.png", "rgba_150x120.png"], "Compare the two pictures, please."),
]

TOKEN_TEXTS = [
    "",
    "Hello world",
    " Hello  world ",
    "USER: <image>\nWhat is shown? ASSISTANT:",
    "<image><image>\nx",
    "a café in Zürich 🍕 and 東京",
    "line one\n\nline two\t tab",
    "</s> after eos <s>",
]


def make_processor(tok, strategy: str) -> LlavaProcessor:
    ip = CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE},
                               do_center_crop=True, resample=3, image_mean=fc.OPENAI_CLIP_MEAN,
                               image_std=fc.OPENAI_CLIP_STD)
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH, num_additional_image_tokens=1,
                          vision_feature_select_strategy=strategy, chat_template=CHAT_TEMPLATE)


def build_config(variant: bool, vocab: int, image_id: int, pad_id: int) -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2 if variant else 3,
                              num_attention_heads=4,
                              image_size=IMAGE, patch_size=PATCH, projection_dim=16, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5)
    rope = ({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 32} if variant
            else {"rope_type": "default", "rope_theta": 500000.0})
    text = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                       rms_norm_eps=1e-5, rope_parameters=rope, tie_word_embeddings=variant,
                       attention_bias=variant, mlp_bias=variant, bos_token_id=1, eos_token_id=2,
                       pad_token_id=pad_id)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id,
                       projector_hidden_act="gelu",
                       vision_feature_select_strategy="full" if variant else "default",
                       vision_feature_layer=[-1, 1] if variant else -2,
                       multimodal_projector_bias=not variant, image_seq_length=16,
                       tie_word_embeddings=variant, pad_token_id=pad_id)


def model_goldens(model, proc, name: str, img_dir: Path, full: bool) -> tuple[dict, list]:
    tensors, cases = {}, []
    cfg = model.config
    layers = [cfg.vision_feature_layer] if isinstance(cfg.vision_feature_layer, int) else cfg.vision_feature_layer
    for cname, images, text in CASES:
        if not full and cname == "caption":  # size budget: the variant runs one- and two-image cases
            continue
        msgs = [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]}]
        prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
        pil = [Image.open(img_dir / i) for i in images]
        inputs = proc(images=pil, text=prompt, return_tensors="pt")
        ids = inputs["input_ids"]
        px = inputs["pixel_values"]
        with torch.no_grad():
            vo = model.model.vision_tower(px, output_hidden_states=True)
            hs = vo.hidden_states
            pool = [hs[i] for i in layers]
            if cfg.vision_feature_select_strategy == "default":
                pool = [h[:, 1:] for h in pool]
            feat = torch.cat(pool, dim=-1)
            proj = model.model.multi_modal_projector(feat)
            ref = torch.cat(model.model.get_image_features(
                pixel_values=px, vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output)
            assert torch.equal(ref, proj.reshape(-1, proj.shape[-1])), "projector replica"
            logits = model(input_ids=ids, pixel_values=px, attention_mask=inputs["attention_mask"]).logits[0]
            gen = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS,
                                 output_logits=True, return_dict_in_generate=True)
        new = gen.sequences[0, ids.shape[1]:].tolist()
        lps = [torch.log_softmax(l[0].double(), -1)[t].item() for l, t in zip(gen.logits, new)]
        margins = [float((lambda s: s[0] - s[1])(torch.topk(l[0], 2).values)) for l in gen.logits]
        if full and cname != "multi":  # the variant shares the processor: pixels and tower outputs once
            tensors[f"{cname}.pixels"] = fc.f32(px)
        if full and cname == "single":
            for i, h in enumerate(hs):
                tensors[f"{cname}.hidden_states.{i}"] = fc.f32(h)
            tensors[f"{cname}.pooled"] = fc.f32(vo.pooler_output)
        tensors[f"{cname}.features"] = fc.f32(feat)
        tensors[f"{cname}.image_features"] = fc.f32(proj)
        tensors[f"{cname}.logits"] = fc.f32(logits[-LOGIT_ROWS:])  # the text after the last image
        cases.append({"name": cname, "images": images, "text": text, "prompt": prompt,
                      "input_ids": ids[0].tolist(), "generated_ids": new, "logprobs": lps,
                      "decoded": proc.decode(new, skip_special_tokens=True).strip(),
                      "min_top2_margin": min(margins), "logit_rows": LOGIT_ROWS})
        fc.log(f"  {name} {cname}: {len(ids[0])} ids, generated {new}, min margin {min(margins):.4f}")
    return tensors, cases


def token_goldens(tok) -> dict:
    enc = [{"text": t, "ids": tok.encode(t)} for t in TOKEN_TEXTS]
    dec_ids = [[1, 5, 300, 2], [tok.convert_tokens_to_ids("<0xC3>"), tok.convert_tokens_to_ids("<0xA9>"), 40]]
    dec = [{"ids": i, "text": tok.decode(i, skip_special_tokens=True)} for i in dec_ids]
    return {"encode": enc, "decode": dec}


def all_token_goldens(llama_class, auto) -> dict:
    """`llama_class`: LlamaTokenizer (5.17 rebuilds the pipeline: Metaspace "first", no `▁` after
    special tokens), what a llama checkpoint gets; `auto`: what AutoTokenizer gives a llava folder
    (model_type llava is in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS: tokenizer.json as it is)."""
    assert type(auto).__name__ == "TokenizersBackend", type(auto)
    return {"llama_class": token_goldens(llama_class), "llava_auto": token_goldens(auto)}


README = f"""\
# LLaVA fixtures (generated by scripts/fixtures_llava.py; do not edit)

- `llava-tiny/`: LlavaForConditionalGeneration as transformers 5.17 `save_pretrained` writes it
  (keys `vision_tower.*`, `language_model.model.*`, `language_model.lm_head.weight`,
  `multi_modal_projector.*`), fp16. CLIP vision 3 layers, hidden 32, patch {PATCH}, {IMAGE} px;
  LLaMA 2 layers, hidden 32, 4 query / 2 kv heads of head_dim 16, rope_theta 5e5, rms eps 1e-5,
  untied head; vocab padded past the tokenizer. tokenizer.json / tokenizer_config.json are
  hub-style (legacy normalizer, `legacy: false`, byte fallback); 5.17 rebuilds them on load.
  chat_template.jinja is llava-1.5-hf's; processor_config.json: patch {PATCH},
  num_additional_image_tokens 1 ({(IMAGE // PATCH) ** 2} image tokens per image).
- `llava-tiny-variant/`: vision_feature_layer [-1, 1], strategy "full", llama3 RoPE, attention
  and MLP biases, tied embeddings, projector without bias, 2 vision layers.
- `goldens/llava_<model>.json|.safetensors`: cases `single`, `caption` (the CLI's caption
  instruction "{CAPTION_INSTRUCTION}"), `multi` (two images): prompt, input ids, pixels, vision
  hidden states + pooler output (`single` of llava-tiny), features, projector output, the last
  {LOGIT_ROWS} prefill logit rows, {MAX_NEW_TOKENS} greedy tokens, log-probs, decoded text.
  `goldens/llava_tokens.json`: tokenizer encode/decode goldens, as LlamaTokenizer (5.17 rebuild)
  and as AutoTokenizer loads a llava folder (tokenizer.json as it is). Reference: float32 eager CPU.
"""


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for p in list(FIX.glob("llava-tiny*")) + list(GOLD.glob("llava_*")):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    img_dir = FIX / "images"
    work = FIX / "llava-tiny-work"
    tok = fc.llama_bpe_tokenizer(work)
    image_id, pad_id = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<pad>")
    vocab = (len(tok) + 15) // 16 * 16 + 16  # padded like 32064: ids past the tokenizer exist
    for name, variant in [("llava-tiny", False), ("llava-tiny-variant", True)]:
        cfg = build_config(variant, vocab, image_id, pad_id)
        torch.manual_seed(SEED + variant)
        model = LlavaForConditionalGeneration(cfg).eval()
        fc.reinit_randn_(model, SEED + 7 * variant)
        out = FIX / name
        model.to(torch.float16).save_pretrained(out)
        make_processor(tok, cfg.vision_feature_select_strategy).save_pretrained(out)
        # The hub's files (legacy normalizer, `legacy: false`), which 5.17 rebuilds on load.
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(work / f, out / f)
        proc = LlavaProcessor.from_pretrained(out)
        if not variant:
            fc.write_json(GOLD / "llava_tokens.json", all_token_goldens(tok, proc.tokenizer))
        model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
        tensors, cases = model_goldens(model, proc, name, img_dir, full=not variant)
        np_save_file(tensors, str(GOLD / f"llava_{name}.safetensors"))
        fc.write_json(GOLD / f"llava_{name}.json", {
            "model": name,
            "reference": "LlavaForConditionalGeneration.from_pretrained(dir, dtype=float32, attn_implementation="
                         "'eager'), CPU; processor.apply_chat_template(one user message: images then text, "
                         f"add_generation_prompt=True); generate(do_sample=False, max_new_tokens={MAX_NEW_TOKENS})",
            "caption_instruction": CAPTION_INSTRUCTION,
            "cases": cases,
        })
    shutil.rmtree(work)
    (FIX / "llava-tiny" / "README.md").write_text(README, encoding="utf-8")
    total = sum(p.stat().st_size for p in list(FIX.glob("llava-tiny*/*")) + list(GOLD.glob("llava_*")))
    fc.log(f"llava fixtures: {total / 1e3:.0f} KB")


if __name__ == "__main__":
    main()
