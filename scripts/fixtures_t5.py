"""Tiny BLIP-2 Flan-T5 fixtures for glimpse (transformers 5.17.0, Pillow 13, no torchvision).

    python scripts/fixtures_t5.py

Writes only tests/fixtures/blip2-flan-t5-tiny/ and tests/fixtures/goldens/t5_*:

  blip2-flan-t5-tiny/  Blip2ForConditionalGeneration with a T5 text config, as 5.17 save_pretrained
                    writes it (fp16), plus an untied `language_model.lm_head.weight` written into the
                    file afterwards (a fresh 5.17 T5 always ties it; hub Flan checkpoints store both,
                    and 5.17 keeps them apart on load). Vision 1 layer (hidden 32, 224 px, patch 14),
                    Q-Former 2 layers (hidden 32, cross-attention every layer), 32 queries, T5 with
                    gated-gelu + dense_act_fn "gelu" (erf, as the hub BLIP-2 Flan configs), d_model 32,
                    3 heads x 16 (inner 48 != d_model), d_ff 48, 2 encoder + 2 decoder layers, 8 buckets, max distance 20,
                    a Unigram T5 tokenizer (T5Tokenizer 5.17: Metaspace, `$A </s>`) with 4 extra ids.
  goldens/t5_blip2-flan-t5-tiny.json + .safetensors: per case the prompt, encoder input ids,
                    vision / Q-Former / projection / encoder outputs, the first decoder logits and
                    greedy tokens / log-probs / text (transformers' default of 20 new tokens); a
                    batch-2 case; 3-beam tokens and score of one caption; the relative-position
                    buckets of transformers for both directions; T5 tokenizer encodings.

Pixels are the BLIP goldens (goldens/pixels_blip.safetensors, BlipImageProcessor PIL path).
Goldens run in fp32 on the fp16-rounded weights. Deterministic: fixed seeds, one CPU thread.
"""

from __future__ import annotations

import json
import math
from collections import Counter
import shutil
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_common as fc  # noqa: E402  (version checks, corpus, helpers, BLIP-2's processor)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.numpy import load_file as np_load_file  # noqa: E402
from safetensors.numpy import save_file as np_save_file  # noqa: E402
from safetensors.torch import load_file as pt_load_file  # noqa: E402
from safetensors.torch import save_file as pt_save_file  # noqa: E402
from transformers import (  # noqa: E402
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    T5Config,
    T5Tokenizer,
)
from transformers.models.t5.modeling_t5 import T5Attention  # noqa: E402

FIX = fc.FIX
GOLD = FIX / "goldens"
NAME = "blip2-flan-t5-tiny"
SEED = 4321
EXTRA_IDS = 4
NUM_QUERY = 32

VISION = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=1)
QFORMER = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2,
               cross_attention_frequency=1)
TEXT = dict(d_model=32, d_kv=16, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=3,
            relative_attention_num_buckets=8, relative_attention_max_distance=20,
            feed_forward_proj="gated-gelu", dense_act_fn="gelu", layer_norm_epsilon=1e-6)

# (case name, pixel golden names, prompt or None for captioning)
CASES = [
    ("caption_odd", ["odd_257x181"], None),
    ("caption_wide", ["wide_301x97"], None),
    ("question_tall", ["tall_83x311"], "Question: what is on the plate? Answer:"),
    ("batch2", ["rgba_150x120", "exact_224x224"], "Question: where is the dog sitting? Answer:"),
]


def build_tokenizer() -> T5Tokenizer:
    """A Unigram vocabulary counted from the corpus (deterministic, unlike the Unigram trainer):
    the 80 most frequent words with their `▁`, frequent `▁`-less suffixes, and every character,
    scored by log relative frequency (so Viterbi prefers whole words)."""
    corpus = [l for l in fc.CORPUS if l.isascii()] + [l for l in fc.MULTILINE_CORPUS if l.isascii()]
    words = Counter(w for line in corpus for w in line.split())
    total = sum(words.values())
    chars = Counter(c for w, n in words.items() for c in w for _ in range(n))
    pieces: dict[str, float] = {"\u2581": math.log(0.5)}
    for w, n in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[:80]:
        pieces["\u2581" + w] = math.log(n / total)
    for suffix in ["ing", "ed", "s", "er", "ly"]:
        pieces[suffix] = math.log(0.01)
    nchars = sum(chars.values())
    for c, n in sorted(chars.items()):
        pieces.setdefault(c, math.log(n / nchars) - 4.0)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + list(pieces.items())
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(EXTRA_IDS - 1, -1, -1)]
    return T5Tokenizer(vocab=vocab, extra_ids=EXTRA_IDS)


def reinit_(model: Blip2ForConditionalGeneration) -> None:
    """Deterministic per-name init (each tensor from its own generator), rounded to fp16."""
    layer_norms = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        g = torch.Generator().manual_seed(SEED * 1_000_003 + zlib.crc32(name.encode()))
        t = torch.empty(p.shape, dtype=torch.float32)
        if name in layer_norms or name.endswith("layer_norm.weight"):  # nn.LayerNorm and T5LayerNorm
            t.normal_(0.0, 0.1, generator=g).add_(1.0)
        elif name.endswith(".bias"):
            t.normal_(0.0, 0.1, generator=g)
        elif name.endswith("shared.weight"):
            t.normal_(0.0, 1.0, generator=g)
        elif name.endswith("relative_attention_bias.weight"):
            t.normal_(0.0, 1.0, generator=g)
        elif name.endswith("position_embedding"):
            t.normal_(0.0, 0.5, generator=g)
        elif name.endswith("class_embedding") or name == "query_tokens":
            t.normal_(0.0, 1.0, generator=g)
        elif p.dim() >= 2:
            fan_in = int(np.prod(p.shape[1:]))
            t.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=g)
        else:
            raise RuntimeError(f"no init rule for {name} {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(t.half().float())


def lm_head_weight(shape, eos: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + 7)
    w = torch.empty(shape).normal_(0.0, 2.0 / math.sqrt(shape[1]), generator=g)
    w[eos] *= 2.0  # so that some answers end with </s>
    return w.half()


def relative_buckets() -> dict:
    rel = torch.arange(-300, 301)
    out = {"relative_position": rel.tolist()}
    for nb, maxd in [(32, 128), (8, 20)]:
        for bidir in [True, False]:
            b = T5Attention._relative_position_bucket(rel, bidirectional=bidir, num_buckets=nb, max_distance=maxd)
            out[f"{'bi' if bidir else 'causal'}_{nb}_{maxd}"] = b.tolist()
    return out


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    out_dir = FIX / NAME
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)

    tokenizer = build_tokenizer()
    image_processor = fc.blip2_processor(fc.opt_bpe_tokenizer(64), NUM_QUERY).image_processor
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=NUM_QUERY)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    vocab = (len(tok) + 7) // 8 * 8
    fc.log(f"t5 tokenizer: {len(tok)} tokens, <image> = {image_id}, model vocab {vocab}")

    text = T5Config(vocab_size=vocab, tie_word_embeddings=False, decoder_start_token_id=0, bos_token_id=1,
                    eos_token_id=1, pad_token_id=0, **TEXT)
    cfg = Blip2Config(
        vision_config=Blip2VisionConfig(image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True,
                                        hidden_act="gelu", **VISION),
        qformer_config=Blip2QFormerConfig(layer_norm_eps=1e-12, hidden_act="gelu",
                                          encoder_hidden_size=VISION["hidden_size"], **QFORMER),
        text_config=text,
        num_query_tokens=NUM_QUERY,
        image_token_index=image_id,
    )
    model = Blip2ForConditionalGeneration(cfg).eval()
    reinit_(model)
    model.to(torch.float16).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    # The untied Flan head: written next to `shared`, as hub checkpoints hold it.
    st = out_dir / "model.safetensors"
    tensors = pt_load_file(str(st))
    shared = tensors["language_model.shared.weight"]
    tensors["language_model.lm_head.weight"] = lm_head_weight(tuple(shared.shape), 1)
    pt_save_file(tensors, str(st), metadata={"format": "pt"})

    model = Blip2ForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32).eval()
    lm = model.language_model
    assert not torch.equal(lm.lm_head.weight, lm.shared.weight), "the head must stay untied"
    assert lm.config.scale_decoder_outputs is False
    fc.log(f"params: {sum(p.numel() for p in model.parameters())}")

    pixels_all = np_load_file(str(GOLD / "pixels_blip.safetensors"))
    caught = {}
    hooks = [
        mod.register_forward_hook(lambda m, i, o, k=key: caught.__setitem__(k, o[0] if isinstance(o, tuple) else o))
        for key, mod in [("vision", model.vision_model), ("qformer", model.qformer),
                         ("image_embeds", model.language_projection), ("encoder", lm.encoder)]
    ]
    arrays, cases = {}, []
    for name, images, prompt in CASES:
        pil = [Image.open(FIX / "images" / f"{i}.png") for i in images]
        px = processor.image_processor(pil, return_tensors="pt").pixel_values
        lut = pixels_all["_lut"]
        for b, i in enumerate(images):  # the BLIP pixel goldens (uint8 + LUT), bit for bit
            recon = np.take_along_axis(lut[:, None, :].repeat(224, 1), pixels_all[i].astype(np.int64), axis=2)
            assert np.array_equal(recon, px[b].numpy()), i
        if prompt is None:
            ids = torch.tensor([[image_id] * NUM_QUERY + [text.bos_token_id]] * len(images))
            mask = torch.ones_like(ids)
        else:
            enc = processor.tokenizer([prompt] * len(images), return_tensors="pt")
            ids = torch.cat([torch.full((len(images), NUM_QUERY), image_id), enc.input_ids], 1)
            mask = torch.cat([torch.ones(len(images), NUM_QUERY, dtype=torch.long), enc.attention_mask], 1)
            # The processor with images expands <image> itself: same ids, same pixels.
            full = processor(images=pil, text=[prompt] * len(images), return_tensors="pt")
            assert torch.equal(full.input_ids, ids), (full.input_ids, ids)
            assert torch.equal(full.pixel_values, px)
        with torch.no_grad():
            first = model(pixel_values=px, input_ids=ids, attention_mask=mask,
                          decoder_input_ids=torch.zeros(len(images), 1, dtype=torch.long))
            # Vision outputs are large (257 rows an image): kept for the first case only.
            for key in ["vision", "qformer", "image_embeds", "encoder"][(name != CASES[0][0]):]:
                v = caught[key]
                v = v.last_hidden_state if hasattr(v, "last_hidden_state") else v
                arrays[f"{name}.{key}"] = fc.f32(v.reshape(-1, v.shape[-1]))
            arrays[f"{name}.first_logits"] = fc.f32(first.logits[:, 0])
            gen = model.generate(pixel_values=px, input_ids=None if prompt is None else ids,
                                 attention_mask=None if prompt is None else mask,
                                 return_dict_in_generate=True, output_logits=True)
        seqs = gen.sequences
        assert (seqs[:, 0] == 0).all(), seqs
        steps = torch.stack(gen.logits, 1).double().log_softmax(-1)
        items = []
        for b in range(len(images)):
            toks = seqs[b, 1:].tolist()
            # Finished rows are padded with pad (0) after </s>.
            if 1 in toks:
                toks = toks[: toks.index(1) + 1]
            lps = [steps[b, i, t].item() for i, t in enumerate(toks)]
            top2 = torch.stack(gen.logits, 1)[b].topk(2, -1).values
            margin = (top2[: len(toks), 0] - top2[: len(toks), 1]).min().item()
            items.append({"image": images[b] + ".png", "generated_ids": toks, "logprobs": lps,
                          "text": tok.decode(toks, skip_special_tokens=True).strip(), "min_margin": margin})
        case = {"name": name, "prompt": prompt, "input_ids": ids[0].tolist(), "items": items}
        if name == "caption_wide":  # beam search through the same decoder (3 beams, defaults otherwise)
            with torch.no_grad():
                beam = model.generate(pixel_values=px, num_beams=3, return_dict_in_generate=True, output_scores=True)
            bt = beam.sequences[0, 1:].tolist()
            bt = bt[: bt.index(1) + 1] if 1 in bt else bt
            case["beam3"] = {"generated_ids": bt, "score": beam.sequences_scores[0].item()}
            fc.log(f"  {name} beam3: {bt}")
        cases.append(case)
        fc.log(f"  {name}: {[it['generated_ids'] for it in items]} {[it['text'] for it in items]}")
    for h in hooks:
        h.remove()
    np_save_file(arrays, str(GOLD / f"t5_{NAME}.safetensors"))
    tokens = {t: tok(t).input_ids for t in ["", "a dog", "  two   cats\nand a dog ", "Question: what is it? Answer:",
                                             "<image>x", "zebra qq"]}
    fc.write_json(GOLD / f"t5_{NAME}.json", {"cases": cases, "buckets": relative_buckets(), "tokens": tokens,
                                             "num_parameters": sum(p.numel() for p in model.parameters())})
    (out_dir / "README.md").write_text(__doc__, encoding="utf-8")
    size = sum(f.stat().st_size for f in out_dir.iterdir()) + sum(f.stat().st_size for f in GOLD.glob("t5_*"))
    fc.log(f"t5 fixtures: {size / 1e3:.0f} KB")


if __name__ == "__main__":
    main()
