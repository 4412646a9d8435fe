#!/usr/bin/env python3
"""A tiny SmolVLM (`Idefics3ForConditionalGeneration`, transformers 5.17.0) and its goldens.

Writes only tests/fixtures/smolvlm-tiny/ and tests/fixtures/goldens/smolvlm_*:

  smolvlm-tiny/   the model as 5.17 save_pretrained writes it (fp16): Idefics3 vision transformer
                  (2 layers, hidden 32, 32 px frames, patch 4: an 8x8 grid), pixel shuffle by 2 and
                  the bias-free modality projection (16 image tokens per frame), a LLaMA decoder
                  (GQA 4q/2kv, tied embeddings like SmolVLM-256M/500M), the byte-level BPE tokenizer
                  with Idefics3's special tokens, SmolVLM's chat template, and the processor
                  (longest edge 128, tiles of 32: up to 4x4 tiles plus the global image)
  goldens/smolvlm_tiny.json + .safetensors: per case the rendered prompt, input ids, tile grids,
                  pixel values, the vision tower's last hidden state, the connector output, the
                  last 6 prefill logit rows, and 8 greedy tokens with their log-probs and text
  goldens/smolvlm_nosplit.json: with do_image_splitting off, the one- and two-image cases' input
                  ids, frame counts, greedy tokens, log-probs and text
  smolvlm2-tiny/  the same shapes as SmolVLM2 (`SmolVLMForConditionalGeneration`, model_type
                  `smolvlm`, vision `smolvlm_vision`) with other random weights, and SmolVLM's
                  processor_config.json (written here: SmolVLMProcessor needs a video processor,
                  which needs torchvision)
  goldens/smolvlm2_tiny.json: its greedy tokens, log-probs and text for one question
  smolvlm-grid19/ a model whose frames are 19 x 19 patches (76 px, patch 4, scale factor 1), where
                  transformers' float32 position ids skip and repeat (config and weights only)
  goldens/smolvlm_grid19.safetensors: one seeded frame's pixel values and the connector output
  smolvlm-floor35/ frames of 35 px at patch 4, which the patch conv floors to 8 x 8 patches
                  (config and weights only); goldens/smolvlm_floor35.safetensors: one seeded frame's
                  pixel values and the connector output
  goldens/idefics3_positions.json: for 1..64 patches per side, the bucket each row (and column)
                  of a full patch grid gets in Idefics3VisionEmbeddings (float32, CPU): the
                  position id of patch (r, c) is bucket[r] * n + bucket[c]

Reference: float32, eager attention, CPU, one thread. Run standalone or from make_fixtures.py.
"""
from __future__ import annotations

import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file as np_save_file

import fixtures_common as fc
import fixtures_idefics3 as fi
from transformers import (
    GPT2TokenizerFast,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
)

NAME = "smolvlm-tiny"
SEED = 4321
MAX_NEW_TOKENS = 8
LOGIT_ROWS = 6
FRAME, PATCH, SCALE = 32, 4, 2
IMAGE_SEQ_LEN = (FRAME // PATCH) ** 2 // SCALE ** 2
# HuggingFaceTB/SmolVLM-*-Instruct's chat template.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
CASES = [
    ("single", ["wide_301x97.png"], "What is shown here?"),
    ("small", ["tiny_13x9.png"], "Describe the image in one sentence."),
    ("two", ["tall_83x311.png", "odd_257x181.png"], "Compare the two pictures."),
]


def make_processor() -> Idefics3Processor:
    tok = fc.opt_bpe_tokenizer(400)
    fast = GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                             pad_token="<pad>", unk_token="<unk>", add_prefix_space=False)
    fast.add_special_tokens({"additional_special_tokens": fi.EXTRA_TOKENS + ["<|im_start|>"]})
    return Idefics3Processor(image_processor=fi.processor(128, FRAME, True, 1), tokenizer=fast,
                             image_seq_len=IMAGE_SEQ_LEN, chat_template=CHAT_TEMPLATE)


def build_config(tok) -> Idefics3Config:
    vocab = (len(tok) + 15) // 16 * 16 + 16  # ids past the tokenizer exist, as in real checkpoints
    eou, pad = tok.convert_tokens_to_ids("<end_of_utterance>"), tok.convert_tokens_to_ids("<pad>")
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=FRAME, patch_size=PATCH, hidden_act="gelu_pytorch_tanh",
                                  layer_norm_eps=1e-6)
    text = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                       rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                       tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=eou,
                       pad_token_id=pad)
    return Idefics3Config(vision_config=vision, text_config=text, scale_factor=SCALE,
                          image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=True,
                          pad_token_id=pad)


def goldens(model, proc) -> tuple[dict, list]:
    tensors, cases = {}, []
    img_dir = fc.FIX / "images"
    for cname, pngs, text in CASES:
        msgs = [{"role": "user", "content": [{"type": "image"} for _ in pngs] + [{"type": "text", "text": text}]}]
        prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
        images = [Image.open(img_dir / p) for p in pngs]
        inputs = proc(text=[prompt], images=[images], return_tensors="pt")
        tiles = proc.image_processor([images], return_row_col_info=True)
        ids, px = inputs["input_ids"], inputs["pixel_values"]
        assert inputs["pixel_attention_mask"].all(), "one prompt's frames are never padded"
        frames = px[0]
        with torch.no_grad():
            hidden = model.model.vision_model(pixel_values=frames).last_hidden_state
            connector = model.model.connector(hidden)
            ref = model.model.get_image_features(pixel_values=px,
                                                 pixel_attention_mask=inputs["pixel_attention_mask"]).pooler_output
            assert torch.equal(ref, connector), "connector replica"
            logits = model(input_ids=ids, pixel_values=px, attention_mask=inputs["attention_mask"],
                           pixel_attention_mask=inputs["pixel_attention_mask"]).logits[0]
            gen = model.generate(input_ids=ids, pixel_values=px, attention_mask=inputs["attention_mask"],
                                 pixel_attention_mask=inputs["pixel_attention_mask"], do_sample=False, num_beams=1,
                                 max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS,
                                 output_logits=True, return_dict_in_generate=True)
        new = gen.sequences[0, ids.shape[1]:].tolist()
        lps = [torch.log_softmax(l[0].double(), -1)[t].item() for l, t in zip(gen.logits, new)]
        margins = [float((lambda s: s[0] - s[1])(torch.topk(l[0], 2).values)) for l in gen.logits]
        tensors[f"{cname}.pixels"] = fc.f32(frames)
        tensors[f"{cname}.vision"] = fc.f32(hidden)
        tensors[f"{cname}.connector"] = fc.f32(connector)
        tensors[f"{cname}.logits"] = fc.f32(logits[-LOGIT_ROWS:])
        grids = [[int(r), int(c)] for r, c in zip(tiles["rows"][0], tiles["cols"][0])]
        cases.append({"name": cname, "images": pngs, "text": text, "prompt": prompt, "grids": grids,
                      "frames": int(frames.shape[0]), "input_ids": ids[0].tolist(), "generated_ids": new,
                      "logprobs": lps, "decoded": proc.decode(new, skip_special_tokens=True),
                      "min_top2_margin": min(margins), "logit_rows": LOGIT_ROWS})
        fc.log(f"  {NAME} {cname}: {frames.shape[0]} frames, {len(ids[0])} ids, generated {new}, "
               f"min margin {min(margins):.4f}")
    return tensors, cases


def no_split(model, proc) -> None:
    """The same model with `do_image_splitting` off: each image one frame (resized to the tile),
    its prompt one global image; greedy tokens for the one- and two-image cases."""
    flat = Idefics3Processor(image_processor=fi.processor(128, FRAME, False, 1), tokenizer=proc.tokenizer,
                             image_seq_len=IMAGE_SEQ_LEN, chat_template=CHAT_TEMPLATE)
    cases = []
    for cname, pngs, text in [c for c in CASES if c[0] != "small"]:
        msgs = [{"role": "user", "content": [{"type": "image"} for _ in pngs] + [{"type": "text", "text": text}]}]
        prompt = flat.apply_chat_template(msgs, add_generation_prompt=True)
        images = [Image.open(fc.FIX / "images" / p) for p in pngs]
        inputs = flat(text=[prompt], images=[images], return_tensors="pt")
        assert inputs["pixel_values"].shape[1] == len(pngs), "one frame per image"
        with torch.no_grad():
            gen = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS,
                                 min_new_tokens=MAX_NEW_TOKENS, output_logits=True, return_dict_in_generate=True)
        ids = inputs["input_ids"]
        new = gen.sequences[0, ids.shape[1]:].tolist()
        lps = [torch.log_softmax(l[0].double(), -1)[t].item() for l, t in zip(gen.logits, new)]
        margins = [float((lambda s: s[0] - s[1])(torch.topk(l[0], 2).values)) for l in gen.logits]
        cases.append({"name": cname, "images": pngs, "text": text, "frames": int(inputs["pixel_values"].shape[1]),
                      "input_ids": ids[0].tolist(), "generated_ids": new, "logprobs": lps,
                      "decoded": proc.decode(new, skip_special_tokens=True), "min_top2_margin": min(margins)})
        fc.log(f"  {NAME} no split {cname}: generated {new}, min margin {min(margins):.4f}")
    fc.write_json(fc.GOLD / "smolvlm_nosplit.json", {
        "model": NAME,
        "reference": "smolvlm-tiny with Idefics3ImageProcessorPil(do_image_splitting=False); otherwise as "
                     "smolvlm_tiny.json",
        "cases": cases,
    })


def smolvlm2(proc) -> None:
    """SmolVLM2's classes at smolvlm-tiny's shapes; pixels and prompt as Idefics3's processor
    makes them (checked equal to SmolVLMImageProcessorPil's pixels)."""
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    out = fc.FIX / "smolvlm2-tiny"
    base = build_config(proc.tokenizer)
    vision = SmolVLMVisionConfig(**{k: v for k, v in base.vision_config.to_dict().items()
                                    if k in Idefics3VisionConfig().to_dict() and k != "model_type"})
    cfg = SmolVLMConfig(vision_config=vision, text_config=base.text_config, scale_factor=SCALE,
                        image_token_id=base.image_token_id, tie_word_embeddings=True, pad_token_id=base.pad_token_id)
    torch.manual_seed(SEED + 2)
    model = SmolVLMForConditionalGeneration(cfg).eval()
    fc.reinit_randn_(model, SEED + 2)
    model.to(torch.float16).save_pretrained(out)
    proc.tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    ip = {"do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
          "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SmolVLMImageProcessor",
          "image_std": [0.5, 0.5, 0.5], "max_image_size": {"longest_edge": FRAME}, "resample": 1,
          "rescale_factor": 1 / 255, "size": {"longest_edge": 128}}
    fc.write_json(out / "processor_config.json", {"image_processor": ip, "image_seq_len": IMAGE_SEQ_LEN,
                                                  "processor_class": "SmolVLMProcessor"})
    model = SmolVLMForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    png, text = "odd_257x181.png", "What is shown here?"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    image = Image.open(fc.FIX / "images" / png)
    inputs = proc(text=[prompt], images=[[image]], return_tensors="pt")
    smol = SmolVLMImageProcessorPil(**{k: v for k, v in ip.items() if k != "image_processor_type"})
    assert torch.equal(smol([[image]], return_tensors="pt")["pixel_values"], inputs["pixel_values"]), "pixels"
    with torch.no_grad():
        gen = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS,
                             min_new_tokens=MAX_NEW_TOKENS, output_logits=True, return_dict_in_generate=True)
    new = gen.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    lps = [torch.log_softmax(l[0].double(), -1)[t].item() for l, t in zip(gen.logits, new)]
    margins = [float((lambda s: s[0] - s[1])(torch.topk(l[0], 2).values)) for l in gen.logits]
    fc.write_json(fc.GOLD / "smolvlm2_tiny.json", {
        "model": "smolvlm2-tiny",
        "reference": "SmolVLMForConditionalGeneration.from_pretrained(dir, dtype=float32, attn_implementation="
                     "'eager'), CPU; Idefics3Processor inputs (pixels equal to SmolVLMImageProcessorPil's); "
                     f"generate(do_sample=False, max_new_tokens={MAX_NEW_TOKENS}, min_new_tokens={MAX_NEW_TOKENS})",
        "image": png, "text": text, "input_ids": inputs["input_ids"][0].tolist(), "generated_ids": new,
        "logprobs": lps, "decoded": proc.decode(new, skip_special_tokens=True), "min_top2_margin": min(margins),
    })
    fc.log(f"  smolvlm2-tiny: {inputs['pixel_values'].shape[1]} frames, generated {new}, min margin {min(margins):.4f}")


def position_buckets() -> dict:
    """Idefics3VisionEmbeddings' fractional-coordinate buckets of a full n x n grid in float32,
    as its forward computes them (not the identity for n = 19, 25, 29, 31, 38, ...)."""
    out = {}
    for n in range(1, 65):
        boundaries = torch.arange(1 / n, 1.0, 1 / n)
        step = 1.0 / torch.tensor([n])
        coords = (torch.arange(n, dtype=torch.float32)[None, :] * step[:, None]).clamp(max=(1.0 - 1e-6))
        out[str(n)] = torch.bucketize(coords.to(torch.float32), boundaries, right=True)[0].tolist()
    return out


def grid19(proc) -> None:
    out = fc.FIX / "smolvlm-grid19"
    base = build_config(proc.tokenizer)
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                  image_size=76, patch_size=4, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    cfg = Idefics3Config(vision_config=vision, text_config=base.text_config, scale_factor=1,
                         image_token_id=base.image_token_id, tie_word_embeddings=True, pad_token_id=base.pad_token_id)
    torch.manual_seed(SEED + 3)
    model = Idefics3ForConditionalGeneration(cfg).eval()
    fc.reinit_randn_(model, SEED + 3)
    model.to(torch.float16).save_pretrained(out)
    model = Idefics3ForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(SEED + 3)
    pixels = torch.rand((1, 1, 3, 76, 76), generator=g) * 2 - 1
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels).pooler_output
    np_save_file({"pixels": fc.f32(pixels[0]), "connector": fc.f32(feats)}, str(fc.GOLD / "smolvlm_grid19.safetensors"))


def floor35(proc) -> None:
    """Frames of 35 px at patch 4: the conv floors to 8 x 8 patches and never reads the last 3
    pixels of each row and column (SmolVLM-Instruct's 384 px at patch 14 is 27 x 27 the same way)."""
    out = fc.FIX / "smolvlm-floor35"
    base = build_config(proc.tokenizer)
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                  image_size=35, patch_size=4, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    cfg = Idefics3Config(vision_config=vision, text_config=base.text_config, scale_factor=2,
                         image_token_id=base.image_token_id, tie_word_embeddings=True, pad_token_id=base.pad_token_id)
    torch.manual_seed(SEED + 4)
    model = Idefics3ForConditionalGeneration(cfg).eval()
    fc.reinit_randn_(model, SEED + 4)
    model.to(torch.float16).save_pretrained(out)
    model = Idefics3ForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(SEED + 4)
    pixels = torch.rand((1, 1, 3, 35, 35), generator=g) * 2 - 1
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels).pooler_output
    assert feats.shape[-2] == 16, feats.shape
    np_save_file({"pixels": fc.f32(pixels[0]), "connector": fc.f32(feats)}, str(fc.GOLD / "smolvlm_floor35.safetensors"))


def main() -> None:
    torch.manual_seed(SEED)
    out = fc.FIX / NAME
    for p in [out, fc.FIX / "smolvlm2-tiny", fc.FIX / "smolvlm-grid19", fc.FIX / "smolvlm-floor35"] + list(fc.GOLD.glob("smolvlm_*")) + list(fc.GOLD.glob("smolvlm2_*")):
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    proc = make_processor()
    cfg = build_config(proc.tokenizer)
    model = Idefics3ForConditionalGeneration(cfg).eval()
    fc.reinit_randn_(model, SEED)
    model.to(torch.float16).save_pretrained(out)
    proc.save_pretrained(out)  # (reloading it needs torchvision for Idefics3: the one in memory is used)
    model = Idefics3ForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    tensors, cases = goldens(model, proc)
    np_save_file(tensors, str(fc.GOLD / "smolvlm_tiny.safetensors"))
    fc.write_json(fc.GOLD / "smolvlm_tiny.json", {
        "model": NAME,
        "reference": "Idefics3ForConditionalGeneration.from_pretrained(dir, dtype=float32, attn_implementation="
                     "'eager'), CPU; processor.apply_chat_template(one user message: images then text, "
                     f"add_generation_prompt=True); generate(do_sample=False, max_new_tokens={MAX_NEW_TOKENS}, "
                     f"min_new_tokens={MAX_NEW_TOKENS})",
        "image_seq_len": IMAGE_SEQ_LEN,
        "cases": cases,
    })
    no_split(model, proc)
    smolvlm2(proc)
    grid19(proc)
    floor35(proc)
    fc.write_json(fc.GOLD / "idefics3_positions.json", {
        "reference": "Idefics3VisionEmbeddings.forward's bucketize of a full grid, float32, torch "
                     f"{torch.__version__} CPU", "buckets": position_buckets()})
    files = list(out.glob("*")) + list((fc.FIX / "smolvlm2-tiny").glob("*")) + list(fc.GOLD.glob("smolvlm*"))
    total = sum(p.stat().st_size for p in files)
    fc.log(f"smolvlm fixtures: {total / 1e3:.0f} KB")


if __name__ == "__main__":
    main()
