#!/usr/bin/env python3
"""Generate glimpse's CLIP fixtures with Hugging Face transformers 5.17.0 (standalone; also called
from make_fixtures.py's main()).

    python scripts/fixtures_clip.py

Writes only:
  tests/fixtures/clip-tiny/              tiny CLIPModel (fp16 safetensors) + CLIPProcessor
                                         (CLIPTokenizer with a tiny CLIP-style `</w>` BPE vocab,
                                         CLIPImageProcessor, PIL backend)
  tests/fixtures/clip-tiny-text/         CLIPTextModelWithProjection with the same text weights
  tests/fixtures/clip-tiny-vision/       CLIPVisionModelWithProjection with the same vision weights
  tests/fixtures/goldens/clip_tiny.json          token ids, labels, probabilities (and metadata)
  tests/fixtures/goldens/clip_tiny.safetensors   pixels, embeddings, logits (float32)

The reference runs fp32 math (`from_pretrained(dtype=float32)`, eager attention, CPU, one thread)
on the fp16-rounded weights stored in the folders, as the BLIP-2 goldens do, so glimpse's exact
CPU executor (fp32 math over fp16 weights) can be held to ~1e-5 relative.
Deterministic: fixed seeds, one thread; running it twice gives byte-identical files.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import save_file as np_save_file

if importlib.util.find_spec("torchvision") is not None:
    sys.exit("fixtures_clip.py: uninstall torchvision (transformers would use its resize, not Pillow's)")

import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402

assert transformers.__version__ == "5.17.0", transformers.__version__
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
NAME = "clip-tiny"
SEED = 20250301
IMAGE_SIZE = 32
PATCH = 8
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

CORPUS = """\
a photo of a cat
a photo of a dog
a picture of a bird sitting on a branch
this is a photo of a red car
a black and white photo of a horse
two people walking on the beach at sunset
a bowl of fruit on a wooden table
an airplane flying over the mountains
a city street at night with lights
the cat is sleeping on the keyboard
a close-up photo of a flower
a painting of a boat on the sea
it's a sunny day, isn't it?
they're playing football in the park
""".splitlines()

# Texts whose ids must equal transformers' (CLIPProcessor(text=...), no padding).
TOKEN_TEXTS = [
    "a photo of a cat",
    "A PHOTO of a Dog!",
    "  leading, trailing   and\tinner\n\nwhitespace  ",
    "it's the cat's toy, isn't it? they'll've gone...",
    "café déjà vu naïve Ångström",
    "e\u0301 composed by NFC",
    "emoji 🐱🐶 and ❤️ hearts",
    "中文 日本語のテキスト 한국어",
    "numbers 12345 and 3.14",
    "symbols: #hashtag @user <b>html</b> &amp; a+b=c",
    "<|startoftext|> literal <|endoftext|> specials",
    "",
]
# Zero-shot labels: texts of different lengths, so the batch is padded.
LABELS = ["a photo of a cat", "a photo of a dog", "a black and white photo of a horse on the beach at sunset"]
NUM_MERGES = 160
IMAGES = ["odd_257x181.png", "tall_83x311.png", "rgba_150x120.png"]


def log(*a):
    print(*a, flush=True)


def bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte -> printable character map, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def build_vocab() -> tuple[dict[str, int], list[str]]:
    """A CLIP-shaped vocab: the 256 byte characters, the same with `</w>`, the merges' results,
    then <|startoftext|> and <|endoftext|> last (so EOS has the largest id, as in openai's vocab)."""
    # CLIP's own pre-tokenization (normalizer + split + byte-level), then a small deterministic
    # BPE training loop (the `tokenizers` trainer breaks count ties in hash order).
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                   r"""[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    words: dict[tuple[str, ...], int] = {}
    for line in CORPUS:
        for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(line)):
            key = tuple(w[:-1]) + (w[-1] + "</w>",)
            words[key] = words.get(key, 0) + 1
    merges: list[str] = []
    for _ in range(NUM_MERGES):
        pairs: dict[tuple[str, str], int] = {}
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, ties by the pair itself
        merges.append(" ".join(best))
        merged = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    chars = bytes_to_unicode()
    order = chars + [c + "</w>" for c in chars]
    for a_b in merges:
        a, b = a_b.split(" ")
        order.append(a + b)
    vocab: dict[str, int] = {}
    for t in order:
        vocab.setdefault(t, len(vocab))
    for t in (BOS, EOS):
        vocab[t] = len(vocab)
    for a_b in merges:
        a, b = a_b.split(" ")
        assert a in vocab and b in vocab and a + b in vocab, a_b
    return vocab, merges


def reinit_(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that embeddings differ clearly between inputs (HF's CLIP init is tiny)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name == "logit_scale":
                p.fill_(math.log(10.0))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif "embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            # fp16-representable, so the fp16 files hold exactly what the fp32 reference ran
            p.copy_(p.half().float())


def f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    torch.manual_seed(SEED)
    out_dirs = [FIX / NAME, FIX / f"{NAME}-text", FIX / f"{NAME}-vision"]
    for d in out_dirs:
        if d.exists():
            shutil.rmtree(d)
    gold = FIX / "goldens"
    gold.mkdir(parents=True, exist_ok=True)

    vocab, merges = build_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert (bos_id, eos_id, tokenizer.pad_token_id) == (len(vocab) - 2, len(vocab) - 1, len(vocab) - 1)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=Image.Resampling.BICUBIC, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
        do_center_crop=True, do_convert_rgb=True)
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)

    # Model vocab padded past the tokenizer (as BLIP-2's fixture does): ids above EOS exist, so the
    # legacy `eos_token_id == 2` pooling (argmax of ids) and the first-EOS rule can disagree.
    vocab_size = (len(vocab) + 7) // 8 * 8 + 8
    cfg = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5, projection_dim=24, bos_token_id=bos_id, eos_token_id=eos_id,
                         pad_token_id=eos_id),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                           image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                           projection_dim=24),
        projection_dim=24,
    )
    model = CLIPModel(cfg).eval()
    reinit_(model, SEED)
    model.to(torch.float16).save_pretrained(FIX / NAME)
    processor.save_pretrained(FIX / NAME)

    # The same weights as the two single-tower models with projection (hub key layout kept).
    sd = model.state_dict()
    text_m = CLIPTextModelWithProjection(cfg.text_config).eval()
    text_m.load_state_dict({k: v for k, v in sd.items() if k.startswith(("text_model.", "text_projection."))})
    text_m.to(torch.float16).save_pretrained(FIX / f"{NAME}-text")
    tokenizer.save_pretrained(FIX / f"{NAME}-text")
    vis_m = CLIPVisionModelWithProjection(cfg.vision_config).eval()
    vis_m.load_state_dict({k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))})
    vis_m.to(torch.float16).save_pretrained(FIX / f"{NAME}-vision")
    image_processor.save_pretrained(FIX / f"{NAME}-vision")

    # Reference: reload as glimpse does, fp32 math on the fp16 weights.
    proc = CLIPProcessor.from_pretrained(FIX / NAME)
    assert proc.image_processor.backend == "pil", proc.image_processor.backend
    ref = CLIPModel.from_pretrained(FIX / NAME, dtype=torch.float32, attn_implementation="eager").eval()
    tensors: dict[str, np.ndarray] = {}
    meta: dict = {"model": NAME, "bos_token_id": bos_id, "eos_token_id": eos_id, "vocab_size": vocab_size,
                  "tokenizer_len": len(proc.tokenizer), "model_max_length": proc.tokenizer.model_max_length,
                  "reference": "CLIPModel.from_pretrained(dir, dtype=float32, attn_implementation='eager'), CPU, "
                               "eval; CLIPProcessor(text=..., images=..., padding=True)"}

    # Token goldens: single texts (no padding), and a long text (no truncation: the model raises).
    meta["tokens"] = [{"text": t, "ids": proc.tokenizer(t)["input_ids"]} for t in TOKEN_TEXTS]
    long_text = " ".join(["cat"] * 80)
    meta["long_text"] = {"text": long_text, "ids_len": len(proc.tokenizer(long_text)["input_ids"])}
    try:
        ref.get_text_features(**proc(text=[long_text], return_tensors="pt"))
        raise AssertionError("a text longer than 77 positions must raise")
    except ValueError as e:
        meta["long_text"]["error"] = str(e)

    with torch.no_grad():
        images = [Image.open(FIX / "images" / n) for n in IMAGES]
        inputs = proc(text=LABELS, images=images, return_tensors="pt", padding=True)
        assert inputs["pixel_values"].dtype == torch.float32
        out = ref(**inputs)
        img_raw = ref.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        txt_raw = ref.get_text_features(input_ids=inputs["input_ids"],
                                        attention_mask=inputs["attention_mask"]).pooler_output
        tensors["pixels"] = f32(inputs["pixel_values"])
        tensors["image_features"] = f32(img_raw)
        tensors["text_features"] = f32(txt_raw)
        tensors["image_embeds"] = f32(out.image_embeds)
        tensors["text_embeds"] = f32(out.text_embeds)
        tensors["logits_per_image"] = f32(out.logits_per_image)
        probs = out.logits_per_image.softmax(dim=-1)
        tensors["probs"] = f32(probs)
        meta["images"] = IMAGES
        meta["labels"] = LABELS
        meta["label_ids"] = inputs["input_ids"].tolist()
        meta["label_attention_mask"] = inputs["attention_mask"].tolist()
        meta["probs"] = probs.tolist()
        meta["logit_scale"] = ref.logit_scale.item()
        # Each label alone (unpadded) gives the same embedding as in the padded batch.
        alone = torch.cat([ref.get_text_features(**proc.tokenizer([t], return_tensors="pt")).pooler_output
                           for t in LABELS])
        assert torch.allclose(alone, txt_raw, rtol=1e-5, atol=1e-6)

        # Raw ids with an id above EOS and no EOS at all: the two pooling rules differ.
        raw = [[bos_id, 40, vocab_size - 3, 41, eos_id, eos_id], [bos_id, 50, 51, 52, 53, 54]]
        ids = torch.tensor(raw)
        tensors["raw_ids_first_eos"] = f32(ref.get_text_features(input_ids=ids).pooler_output)
        ref.text_model.eos_token_id = 2  # what a config with eos_token_id == 2 builds
        tensors["raw_ids_legacy"] = f32(ref.get_text_features(input_ids=ids).pooler_output)
        ref.text_model.eos_token_id = eos_id
        meta["raw_ids"] = raw
        assert not torch.allclose(torch.tensor(tensors["raw_ids_first_eos"]), torch.tensor(tensors["raw_ids_legacy"]))

    np_save_file(tensors, str(gold / "clip_tiny.safetensors"))
    write_json(gold / "clip_tiny.json", meta)
    (FIX / NAME / "README.md").write_text(README, encoding="utf-8")
    total = sum(p.stat().st_size for d in out_dirs for p in d.rglob("*") if p.is_file())
    total += sum((gold / f).stat().st_size for f in ("clip_tiny.json", "clip_tiny.safetensors"))
    log(f"clip fixtures: {total / 1e3:.0f} KB; probs {np.round(tensors['probs'], 4).tolist()}")


README = """\
# clip-tiny fixtures (written by scripts/fixtures_clip.py)

- `clip-tiny/`: a tiny random `CLIPModel` in fp16 (vision: 32px, patch 8, hidden 48, 3 heads,
  2 layers; text: hidden 32, 4 heads, 2 layers, 77 positions; projection 24; logit_scale ln 10)
  with a `CLIPProcessor`: `CLIPTokenizer` over a tiny CLIP-style vocab (256 byte characters, the
  same with `</w>`, 160 merges trained on a small caption corpus, then `<|startoftext|>` and
  `<|endoftext|>` last) and a `CLIPImageProcessor` (shortest edge 32, center crop 32, PIL backend).
  The model's vocab is padded past the tokenizer, so ids above EOS exist (pooling-rule test).
- `clip-tiny-text/`, `clip-tiny-vision/`: the same weights as `CLIPTextModelWithProjection` and
  `CLIPVisionModelWithProjection` folders (hub key layout: `text_model.*` + `text_projection`,
  `vision_model.*` + `visual_projection`).
- `goldens/clip_tiny.json`: token ids of tricky texts (punctuation, accents, NFC, emoji, CJK,
  specials, empty), the padded label batch and its mask, zero-shot probabilities, the error for a
  text longer than 77 positions, raw id sequences for the two EOS pooling rules.
- `goldens/clip_tiny.safetensors`: pixel values, projected features (`image_features`,
  `text_features`: `get_*_features().pooler_output`), normalized `image_embeds` / `text_embeds`,
  `logits_per_image`, `probs`, and `raw_ids_first_eos` / `raw_ids_legacy` text features.

Reference: fp32 transformers 5.17 on the CPU (eager attention, one thread) over the fp16-rounded
weights stored here.
"""

if __name__ == "__main__":
    main()
