"""Tiny InstructBLIP (Vicuna-style LLaMA decoder) fixtures for glimpse (transformers 5.17.0, Pillow 13).

    python scripts/fixtures_instructblip.py

Writes only tests/fixtures/instructblip-tiny/ and tests/fixtures/goldens/instructblip_*:

  instructblip-tiny/  InstructBlipForConditionalGeneration as 5.17 save_pretrained writes it (fp16):
                      BLIP vision (2 layers, patch 6, 24 px), instruction-aware Q-Former (3 layers,
                      cross-attention in layers 0 and 2, 4 queries, 32 positions), language_projection,
                      LLaMA decoder (GQA 4q/2kv, head_dim 16, rope_theta 5e5, untied head); the LLaMA-style
                      tokenizer of the llava fixture with BOS `</s>` (as the Vicuna conversion sets it),
                      and the Q-Former's tiny BERT WordPiece tokenizer in qformer_tokenizer/ ([DEC] as
                      bos_token, truncation_side left), as InstructBlipProcessor.save_pretrained writes them.
  goldens/instructblip_tiny.json + .safetensors: per case the prompt, LLM input ids, Q-Former ids and
                      mask, pixels, vision output, Q-Former query output, projector output, the last
                      prefill logit rows, greedy tokens / log-probs / text (8 new tokens); a batch case
                      (two images, two questions of different lengths, padding=True).

Deterministic: fixed seeds, one CPU thread.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_common as fc  # noqa: E402  (version checks, corpus, helpers, the LLaMA tokenizer and init)

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.numpy import save_file as np_save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    BertTokenizer,
    BlipImageProcessorPil,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    LlamaTokenizer,
)

FIX = fc.FIX
GOLD = FIX / "goldens"
NAME = "instructblip-tiny"
SEED = 4321
MAX_NEW_TOKENS = 8
LOGIT_ROWS = 4
PATCH, IMAGE = 6, 24
NUM_QUERY = 4

CASES = [
    # "" is what `glimpse caption` sends: transformers 5.17 cannot generate without a text
    # (get_image_features calls ones_like(qformer_input_ids=None)), so the empty prompt it is.
    ("caption", "odd_257x181.png", ""),
    ("question", "wide_301x97.png", "What is unusual about this image?"),
    ("detail", "odd_257x181.png", "Describe the picture in detail, please."),
]
BATCH = (["tall_83x311.png", "rgba_150x120.png"], ["What is shown here?", "Is the picture bright or dark at the top?"])


def bert_tokenizer(work: Path) -> BertTokenizer:
    """bert-base-uncased in miniature: lower-casing BertNormalizer, BertPreTokenizer, WordPiece
    with `##` continuations, [CLS] $A [SEP]; then [DEC] added as bos_token (conversion script)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    common = "what is unusual about this image describe the picture in detail please shown here bright or dark at top"
    corpus = sorted({w for line in fc.CORPUS for w in line.lower().split() if w.isascii() and w.isalpha()})
    words = sorted(set(common.split()) | set(corpus[:120]))
    letters = sorted({c for w in words for c in w})
    pieces = specials + list("?,.!'") + letters + ["##" + c for c in letters] + ["##s", "##ing", "##ed"] + words
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    work.mkdir(parents=True, exist_ok=True)
    (work / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    t = BertTokenizer(vocab=str(work / "vocab.txt"), do_lower_case=True, truncation_side="left")
    t.add_special_tokens({"bos_token": "[DEC]"})
    assert t.convert_tokens_to_ids("[DEC]") == len(vocab), "[DEC] appended after the vocabulary"
    ids = t("What is unusual, here?")["input_ids"]
    assert ids[0] == vocab["[CLS]"] and ids[-1] == vocab["[SEP]"], ids
    return t


def llama_tokenizer(work: Path) -> LlamaTokenizer:
    """The llava fixture's tokenizer with the Vicuna conversion's special tokens: bos and unk `</s>`
    (so the BOS the processor inserts is id 2), pad `<pad>`, `<image>` already in the vocabulary."""
    fc.llama_bpe_tokenizer(work)
    cfg = json.loads((work / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg.update(bos_token="</s>", unk_token="</s>", truncation_side="left")
    (work / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1, ensure_ascii=False), encoding="utf-8")
    # The converted tokenizer.json's template inserts `</s>` (LlamaTokenizerFast built it from bos_token).
    spec = json.loads((work / "tokenizer.json").read_text(encoding="utf-8"))
    bos = {"SpecialToken": {"id": "</s>", "type_id": 0}}
    spec["post_processor"].update(single=[bos, {"Sequence": {"id": "A", "type_id": 0}}],
                                  pair=[bos, {"Sequence": {"id": "A", "type_id": 0}},
                                        {"SpecialToken": {"id": "</s>", "type_id": 1}},
                                        {"Sequence": {"id": "B", "type_id": 1}}],
                                  special_tokens={"</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}})
    (work / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    t = LlamaTokenizer.from_pretrained(work)
    assert t.encode("x")[0] == 2, "BOS `</s>` expected"
    return t


def build_config(vocab: int, qvocab: int, image_id: int, pad_id: int) -> InstructBlipConfig:
    vision = InstructBlipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, image_size=IMAGE, patch_size=PATCH,
                                      layer_norm_eps=1e-6, qkv_bias=True)
    qformer = InstructBlipQFormerConfig(vocab_size=qvocab, hidden_size=32, num_hidden_layers=3,
                                        num_attention_heads=4, intermediate_size=48, max_position_embeddings=48,
                                        cross_attention_frequency=2, encoder_hidden_size=32)
    text = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                       rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=pad_id)
    return InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                              text_config=text.to_dict(), num_query_tokens=NUM_QUERY, image_token_index=image_id)


def make_processor(tok, qtok) -> InstructBlipProcessor:
    ip = BlipImageProcessorPil(size={"height": IMAGE, "width": IMAGE}, resample=Image.Resampling.BICUBIC,
                               image_mean=fc.OPENAI_CLIP_MEAN, image_std=fc.OPENAI_CLIP_STD, do_convert_rgb=True)
    return InstructBlipProcessor(image_processor=ip, tokenizer=tok, qformer_tokenizer=qtok,
                                 num_query_tokens=NUM_QUERY)


def stages(model, inputs) -> dict:
    """Vision output, Q-Former query rows and projector output, recomputed stage by stage and
    checked against get_image_features."""
    with torch.no_grad():
        px = inputs["pixel_values"]
        vision = model.vision_model(pixel_values=px).last_hidden_state
        q = model.query_tokens.expand(px.shape[0], -1, -1)
        mask = torch.cat([torch.ones(q.shape[:2], dtype=torch.long), inputs["qformer_attention_mask"]], 1)
        qout = model.qformer(input_ids=inputs["qformer_input_ids"], attention_mask=mask, query_embeds=q,
                             encoder_hidden_states=vision).last_hidden_state[:, :NUM_QUERY]
        proj = model.language_projection(qout)
        ref = model.get_image_features(pixel_values=px, qformer_input_ids=inputs["qformer_input_ids"],
                                       qformer_attention_mask=inputs["qformer_attention_mask"],
                                       return_dict=True).pooler_output
        assert torch.equal(ref, proj), "stage replica"
    return {"vision": vision, "qformer": qout, "image_features": proj}


def generate(model, inputs):
    with torch.no_grad():
        gen = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS,
                             output_logits=True, return_dict_in_generate=True)
    start = inputs["input_ids"].shape[1]
    rows = []
    for b in range(inputs["input_ids"].shape[0]):
        new = gen.sequences[b, start:].tolist()
        steps = [l[b] for l in gen.logits][:len(new)]
        lps = [torch.log_softmax(l.double(), -1)[t].item() for l, t in zip(steps, new)]
        margins = [float((lambda s: s[0] - s[1])(torch.topk(l, 2).values)) for l in steps]
        rows.append((new, lps, min(margins)))
    return rows


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for p in list(FIX.glob("instructblip-tiny*")) + list(GOLD.glob("instructblip_*")):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    img_dir = FIX / "images"
    work = FIX / "instructblip-tiny-work"
    tok = llama_tokenizer(work / "llm")
    qtok = bert_tokenizer(work / "qformer")
    image_id, pad_id = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<pad>")
    vocab = (len(tok) + 15) // 16 * 16
    cfg = build_config(vocab, len(qtok), image_id, pad_id)
    model = InstructBlipForConditionalGeneration(cfg).eval()
    fc.reinit_randn_(model, SEED)
    out = FIX / NAME
    model.to(torch.float16).save_pretrained(out)
    make_processor(tok, qtok).save_pretrained(out)
    proc = InstructBlipProcessor.from_pretrained(out)
    assert (out / "qformer_tokenizer" / "tokenizer.json").exists(), sorted(p.name for p in out.rglob("*"))
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == image_id
    assert type(proc.image_processor) is BlipImageProcessorPil
    assert type(AutoTokenizer.from_pretrained(out)).__name__ == "LlamaTokenizer"
    model = InstructBlipForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
    # 5.17 refuses to caption without a text: the empty prompt stands for captioning.
    try:
        model.generate(**proc(images=Image.open(img_dir / CASES[0][1]), return_tensors="pt"), max_new_tokens=2)
        no_text = "generates"
    except Exception as e:  # noqa: BLE001  (recorded in the goldens)
        no_text = f"{type(e).__name__}: {e}"
    fc.log(f"  generate without text: {no_text}")

    tensors, cases = {}, []
    for cname, image, text in CASES:
        inputs = proc(images=Image.open(img_dir / image), text=text, return_tensors="pt")
        s = stages(model, inputs)
        with torch.no_grad():
            logits = model(**inputs).logits[0]
        (new, lps, margin), = generate(model, inputs)
        tensors[f"{cname}.pixels"] = fc.f32(inputs["pixel_values"])
        for k, v in s.items():
            tensors[f"{cname}.{k}"] = fc.f32(v[0])
        tensors[f"{cname}.logits"] = fc.f32(logits[-LOGIT_ROWS:])
        cases.append({"name": cname, "image": image, "text": text,
                      "input_ids": inputs["input_ids"][0].tolist(),
                      "qformer_input_ids": inputs["qformer_input_ids"][0].tolist(),
                      "generated_ids": new, "logprobs": lps,
                      "decoded": proc.decode(new, skip_special_tokens=True).strip(),
                      "min_top2_margin": margin, "logit_rows": LOGIT_ROWS})
        fc.log(f"  {cname}: {len(inputs['input_ids'][0])} ids, q-former {inputs['qformer_input_ids'][0].tolist()}, "
               f"generated {new}, margin {margin:.4f}")

    images, texts = BATCH
    inputs = proc(images=[Image.open(img_dir / i) for i in images], text=texts, padding=True, return_tensors="pt")
    rows = generate(model, inputs)
    batch = {"images": images, "texts": texts, "input_ids": inputs["input_ids"].tolist(),
             "attention_mask": inputs["attention_mask"].tolist(),
             "qformer_input_ids": inputs["qformer_input_ids"].tolist(),
             "qformer_attention_mask": inputs["qformer_attention_mask"].tolist(),
             "generated_ids": [r[0] for r in rows], "logprobs": [r[1] for r in rows],
             "min_top2_margin": min(r[2] for r in rows)}
    tensors["batch.qformer"] = fc.f32(stages(model, inputs)["qformer"])
    # Each row alone gives the same tokens (transformers' left padding is exact).
    for b, (image, text) in enumerate(zip(images, texts)):
        alone = proc(images=Image.open(img_dir / image), text=text, return_tensors="pt")
        assert generate(model, alone)[0][0] == rows[b][0], f"batch row {b} differs from its single run"
    fc.log(f"  batch: generated {batch['generated_ids']}")

    np_save_file(tensors, str(GOLD / "instructblip_tiny.safetensors"))
    fc.write_json(GOLD / "instructblip_tiny.json", {
        "model": NAME,
        "reference": "InstructBlipForConditionalGeneration.from_pretrained(dir, dtype=float32, attn_implementation="
                     "'eager'), CPU; InstructBlipProcessor(images=..., text=...); generate(do_sample=False, "
                     f"num_beams=1, max_new_tokens={MAX_NEW_TOKENS})",
        "num_query_tokens": NUM_QUERY, "image_token_index": image_id, "generate_without_text": no_text,
        "cases": cases, "batch": batch,
    })
    shutil.rmtree(work)
    (out / "README.md").write_text(README, encoding="utf-8")
    total = sum(p.stat().st_size for p in list(out.rglob("*")) + list(GOLD.glob("instructblip_*")) if p.is_file())
    fc.log(f"instructblip fixtures: {total / 1e3:.0f} KB")


README = f"""\
# InstructBLIP fixtures (generated by scripts/fixtures_instructblip.py; do not edit)

- `instructblip-tiny/`: InstructBlipForConditionalGeneration as transformers 5.17 `save_pretrained`
  writes it (keys `vision_model.*`, `qformer.*` with `embeddings.word_embeddings` /
  `position_embeddings` / `layernorm` and the text FFN `intermediate` / `output`, `query_tokens`,
  `language_projection.*`, `language_model.model.*`, `language_model.lm_head.weight`), fp16.
  Vision 2 layers, hidden 32, patch {PATCH}, {IMAGE} px; Q-Former 3 layers (cross-attention in 0 and 2),
  hidden 32, {NUM_QUERY} queries, 48 positions; LLaMA 2 layers, 4 query / 2 kv heads of head_dim 16,
  rope_theta 5e5, untied head. The LLM tokenizer (root) has BOS `</s>` as the Vicuna conversion sets it;
  `qformer_tokenizer/` holds the BERT WordPiece Q-Former tokenizer ([DEC] bos, truncation left), as
  InstructBlipProcessor.save_pretrained writes it.
- `goldens/instructblip_tiny.json|.safetensors`: cases `caption` (the empty prompt), `question`,
  `detail`: LLM input ids ({NUM_QUERY} `<image>` ids, then BOS and the prompt), Q-Former ids, pixels,
  vision output, Q-Former query rows, projector output, the last {LOGIT_ROWS} prefill logit rows,
  {MAX_NEW_TOKENS} greedy tokens, log-probs, decoded text; `batch`: two images with two questions of
  different lengths (padding=True: LLM ids left-padded after the image ids, Q-Former ids right-padded),
  generated tokens per row (each equal to the row run alone). Reference: float32 eager CPU.
"""


if __name__ == "__main__":
    main()
