"""BLIP-2 OPT fixtures (transformers 5.17.0, Pillow 13, no torchvision), and the shared pixel and
tokenizer goldens. Run through `python scripts/make_fixtures.py`, which calls the three steps in
order with other generators in between (build, fixtures_processors, goldens, fixtures_beam,
fixtures_clip, readme); the README it writes is tests/fixtures/README.md.

Writes:

  tests/fixtures/images/           synthetic test images (fixtures_images), and the decode fixtures
  tests/fixtures/blip2-opt-tiny/   tiny BLIP-2 OPT checkpoint, fp16, tied lm_head, single file
  tests/fixtures/blip2-opt-tiny-proj/  rare-path variant: project_in/out, untied lm_head,
                                   cross-attention every layer, fp32, sharded
  tests/fixtures/clip-preprocessor/  CLIPImageProcessor config (shortest edge 224, crop 224)
  tests/fixtures/goldens/          pixel values, tokenizer encode/decode, activations, logits,
                                   greedy tokens / log-probs / text
  tests/fixtures/README.md         description of all of the above (generated, keep in sync)
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_common as fc  # noqa: E402  (version checks, corpus, helpers, the BPE tokenizer and processor)
import fixtures_images  # noqa: E402  (the test images and decode fixtures)
from fixtures_common import FIX, MASTER_SEED, f32, log, write_json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.numpy import save_file as np_save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import (  # noqa: E402
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessorPil,
    CLIPImageProcessorPil,
    GenerationConfig,
    OPTConfig,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402

GENERATED = ["images", "goldens", "blip2-opt-tiny", "blip2-opt-tiny-proj", "clip-preprocessor", "README.md"]

VQA_PROMPT = "Question: what is in the picture? Answer:"
MAX_NEW_TOKENS = 20
MIN_MARGIN = 1e-2  # greedy top-1/top-2 logit gap we insist on, so fp32 reimplementations can't flip a token


# ----------------------------------------------------------------------------------------------
# 3. Models
# ----------------------------------------------------------------------------------------------
SPECS = {
    "blip2-opt-tiny": dict(
        vision=dict(hidden_size=176, num_attention_heads=2, intermediate_size=352, num_hidden_layers=2),
        qformer=dict(hidden_size=128, num_attention_heads=2, intermediate_size=256, num_hidden_layers=4,
                     cross_attention_frequency=2),
        text=dict(hidden_size=160, num_attention_heads=2, ffn_dim=320, num_hidden_layers=2,
                  word_embed_proj_dim=160, tie_word_embeddings=True),
        num_query_tokens=32,
        dtype=torch.float16,
        max_shard_size="50GB",
        seed=MASTER_SEED + 1000,
    ),
    "blip2-opt-tiny-proj": dict(
        vision=dict(hidden_size=88, num_attention_heads=1, intermediate_size=176, num_hidden_layers=1),
        qformer=dict(hidden_size=64, num_attention_heads=1, intermediate_size=128, num_hidden_layers=2,
                     cross_attention_frequency=1),
        text=dict(hidden_size=160, num_attention_heads=2, ffn_dim=320, num_hidden_layers=1,
                  word_embed_proj_dim=96, tie_word_embeddings=False),
        num_query_tokens=8,
        dtype=torch.float32,
        max_shard_size="1MB",
        seed=MASTER_SEED + 2000,
    ),
}


def build_config(spec: dict, vocab_size: int, image_token_id: int, newline_id: int) -> Blip2Config:
    vision = Blip2VisionConfig(
        image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu", **spec["vision"]
    )
    qformer = Blip2QFormerConfig(
        layer_norm_eps=1e-12, hidden_act="gelu", encoder_hidden_size=spec["vision"]["hidden_size"], **spec["qformer"]
    )
    text = OPTConfig(
        vocab_size=vocab_size,
        max_position_embeddings=128,
        do_layer_norm_before=True,
        activation_function="relu",
        bos_token_id=2,
        # Like Salesforce/blip2-opt-2.7b's text_config (eos 50118 = "\n"): Blip2ForConditionalGeneration
        # .generate calls language_model.generate, whose GenerationConfig is built from text_config,
        # NOT from generation_config.json. So the "\n" EOS must live here to take effect.
        eos_token_id=newline_id,
        pad_token_id=1,
        **spec["text"],
    )
    return Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=spec["num_query_tokens"],
        image_token_index=image_token_id,
    )


# init scales (see reinit_)
# OPT linears get a gain of 3: with 1/sqrt(fan_in) the tied embedding dominates the residual stream and a
# random model just repeats its input token; gain 3 gives varied greedy text (residual stream std ~10).
# "\n" rows x2 so that some captions end with EOS.
INIT = dict(emb=0.25, pos=1.0, vis_pos=0.5, cls=1.0, query=1.0, lin=1.0, text_lin=3.0, text_out=3.0,
            text_qk=3.0, eos_boost=2.0, pad_rows=0.2, head=1.0)


def reinit_(model: Blip2ForConditionalGeneration, seed: int, newline_id: int, tokenizer_len: int) -> None:
    """Deterministic O(1)-activation init, then round every value to fp16 (.half().float()).

    Each parameter gets its own generator seeded from (seed, name), so the values of one tensor do not
    depend on the others. Linear/conv: N(0, (gain/sqrt(fan_in))^2) (gain 1, or INIT["text_*"] in OPT);
    biases N(0, 0.1^2) (all of them, including the k third of the fused vision qkv bias, which is zero in
    real checkpoints); LayerNorm weight 1 + N(0, 0.1^2), bias N(0, 0.1^2); embeddings / positions /
    query tokens / class embedding N(0, s^2) with s from INIT.
    """
    special = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.LayerNorm):
            special[f"{mname}.weight"] = "ln_w"
            special[f"{mname}.bias"] = "bias"
        elif isinstance(mod, torch.nn.Embedding):
            special[f"{mname}.weight"] = "emb"
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        kind = special.get(name)
        with torch.no_grad():
            t = torch.empty(p.shape, dtype=torch.float32)
            if kind == "ln_w":
                t.normal_(0.0, 0.1, generator=g).add_(1.0)
            elif kind == "bias" or name.endswith(".bias"):
                t.normal_(0.0, 0.1, generator=g)
            elif name.endswith("embed_tokens.weight"):
                t.normal_(0.0, INIT["emb"], generator=g)
                # "\n" (the EOS) gets a larger row so greedy decoding sometimes stops early
                t[newline_id] *= INIT["eos_boost"]
                # rows past the tokenizer (vocab padded to a multiple of 8, like OPT's 50304 > 50266)
                # are kept small so they are never argmax; they still appear in the logits goldens
                t[tokenizer_len:] *= INIT["pad_rows"]
            elif name.endswith("embed_positions.weight"):
                t.normal_(0.0, INIT["pos"], generator=g)
            elif kind == "emb":
                raise RuntimeError(f"unexpected embedding {name}")
            elif name.endswith("position_embedding"):
                t.normal_(0.0, INIT["vis_pos"], generator=g)
            elif name.endswith("class_embedding"):
                t.normal_(0.0, INIT["cls"], generator=g)
            elif name == "query_tokens":
                t.normal_(0.0, INIT["query"], generator=g)
            elif name.endswith("lm_head.weight"):  # untied head
                t.normal_(0.0, INIT["head"] / math.sqrt(p.shape[1]), generator=g)
                t[newline_id] *= INIT["eos_boost"]
                t[tokenizer_len:] *= INIT["pad_rows"]
            elif p.dim() >= 2:  # Linear / Conv2d weights
                fan_in = int(np.prod(p.shape[1:]))
                gain = INIT["lin"]
                if name.startswith("language_model."):
                    gain = INIT["text_lin"]
                    if name.endswith(("out_proj.weight", "fc2.weight")):  # residual writers
                        gain = INIT["text_out"]
                    elif name.endswith(("q_proj.weight", "k_proj.weight")):
                        gain = INIT["text_qk"]
                t.normal_(0.0, gain / math.sqrt(fan_in), generator=g)
            else:
                raise RuntimeError(f"no init rule for {name} {tuple(p.shape)}")
            p.copy_(t.half().float())


def check_safetensors_dtypes(model_dir: Path, want: str) -> dict:
    """Read the raw safetensors headers: every tensor must have dtype `want`. Returns name -> shape."""
    shapes = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k == "__metadata__":
                continue
            assert v["dtype"] == want, f"{f.name}: {k} is {v['dtype']}, expected {want}"
            shapes[k] = v["shape"]
    return shapes


# ----------------------------------------------------------------------------------------------
# helpers for goldens
# ----------------------------------------------------------------------------------------------
def stats(name: str, t: torch.Tensor) -> dict:
    t = t.double()
    d = {"mean": round(t.mean().item(), 4), "std": round(t.std().item(), 4), "absmax": round(t.abs().max().item(), 4)}
    log(f"    {name:14s} shape {tuple(t.shape)} mean {d['mean']:+.4f} std {d['std']:.4f} absmax {d['absmax']:.4f}")
    return d


# ----------------------------------------------------------------------------------------------
# 4. Goldens
# ----------------------------------------------------------------------------------------------
def pixel_goldens(image_processor, pngs: list[str], img_dir: Path) -> dict[str, np.ndarray]:
    """For each PNG: uint8 [3,224,224] (image after convert("RGB") + resize [+ crop]), plus the exact
    float32 normalisation table `_lut` [3,256]: pixel_values[c,y,x] == _lut[c, u8[c,y,x]] bit for bit
    (checked here against the processor's real float32 output)."""
    assert image_processor.backend == "pil", image_processor.backend
    q = np.arange(256, dtype=np.uint8).reshape(1, 1, 256).repeat(3, axis=0)  # [3,1,256] "image"
    lut = image_processor(Image.fromarray(q.transpose(1, 2, 0)), do_resize=False, do_center_crop=False,
                          return_tensors="np").pixel_values[0]
    lut = np.ascontiguousarray(lut.reshape(3, 256).astype(np.float32))
    out = {"_lut": lut}
    for name in pngs:
        img = Image.open(img_dir / name)
        full = image_processor(img, return_tensors="np").pixel_values[0]
        raw = image_processor(Image.open(img_dir / name), do_rescale=False, do_normalize=False,
                              return_tensors="np").pixel_values[0]
        assert full.dtype == np.float32 and full.shape == (3, 224, 224), (full.dtype, full.shape)
        assert raw.dtype == np.uint8 and raw.shape == (3, 224, 224), (raw.dtype, raw.shape)
        recon = np.take_along_axis(lut[:, None, :].repeat(224, 1), raw.astype(np.int64), axis=2)
        assert np.array_equal(recon.view(np.uint32), full.view(np.uint32)), f"LUT mismatch for {name}"
        out[Path(name).stem] = np.ascontiguousarray(raw)
    return out


def token_goldens(tokenizer, tok_json: Path, image_token_id: int, newline_id: int, vocab_size: int) -> dict:
    raw_tok = Tokenizer.from_file(str(tok_json))  # what a Rust `tokenizers` user would load
    encode_texts = [
        "",
        "a woman sitting on the beach with a dog",
        "Question: what is this? Answer:",
        VQA_PROMPT,
        "  two leading spaces",
        "trailing spaces  ",
        "double  space and   triple",
        " single leading space",
        "line one\nline two\n",
        "\n",
        "digits 1234567890 and 3.14159, 2023-04-15",
        "café naïve Zürich 日本 東京",
        "emoji 🙂🍕 and ☀️ done",
        "<image> what is this?",
        "a<image><image>b",
        "text with </s> and <pad> inside",
        "unseen words: quixotic zephyr xylophone ß Ω ж",
        "tab\tseparated\tvalues",
    ]
    enc = []
    for s in encode_texts:
        ids = tokenizer(s)["input_ids"]
        assert ids == raw_tok.encode(s).ids, (s, ids, raw_tok.encode(s).ids)
        enc.append({"text": s, "ids": ids, "tokens": tokenizer.convert_ids_to_tokens(ids)})

    def ids_of(s):
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    # GPT-2 byte -> unicode map (the ByteLevel alphabet), to name the single-byte tokens
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_tok = {b: raw_tok.token_to_id(chr(c)) for b, c in zip(bs, cs)}
    assert all(v is not None for v in byte_tok.values())

    caption = ids_of("a woman sitting on the beach with a dog")
    decode_cases = [
        ("caption_then_eos", caption + [newline_id]),
        ("leading_space_caption", ids_of(" a dog on the beach") + [newline_id]),
        ("with_specials", [2] + ids_of("two cats") + [1, 0, image_token_id, 3, 2] + ids_of(" on a couch")),
        ("image_tokens_bos_prompt", [image_token_id] * 3 + [2] + ids_of(VQA_PROMPT) + ids_of(" a cat") + [newline_id]),
        ("only_newline", [newline_id]),
        ("only_specials", [0, 1, 2, 3, image_token_id]),
        ("empty", []),
        ("newline_inside", ids_of("first") + [newline_id] + ids_of("second") + [newline_id]),
        ("non_ascii", ids_of("café naïve 日本 🙂")),
        # invalid UTF-8: first byte of "é" (0xC3) alone -> U+FFFD
        ("invalid_utf8_lead_byte", ids_of("caf") + [byte_tok[0xC3]] + ids_of(" ok")),
        # lone continuation byte 0xA9
        ("invalid_utf8_lone_continuation", [byte_tok[0xA9]] + ids_of("abc")),
        # first two bytes of a 4-byte emoji (F0 9F ...) then text
        ("invalid_utf8_truncated_emoji", ids_of("hi ") + [byte_tok[0xF0], byte_tok[0x9F]] + ids_of(" there")),
        # str.strip() quirk: Python treats U+001C..U+001F as whitespace, Rust's trim() does not
        ("strip_unit_separator", [byte_tok[0x1F]] + ids_of("x") + [byte_tok[0x1F], newline_id]),
        ("strip_nbsp_and_tab", [byte_tok[0xC2], byte_tok[0xA0]] + ids_of("y\t") + [newline_id]),
        # special tokens are dropped BEFORE the bytes are joined: 0xC3 <pad> 0xA9 decodes to "é" when
        # skipping specials, but to "\ufffd<pad>\ufffd" when not
        ("bytes_split_by_special", [byte_tok[0xC3], 1, byte_tok[0xA9]]),
        # ids >= len(tokenizer) (rows that only exist because vocab_size is padded to a multiple of 8)
        # are silently dropped by the decoder
        ("out_of_tokenizer_id", ids_of("a") + [vocab_size - 3] + ids_of(" a")),
    ]
    dec = []
    for name, ids in decode_cases:
        decoded = tokenizer.batch_decode([ids], skip_special_tokens=True)[0]
        raw = tokenizer.batch_decode([ids], skip_special_tokens=False)[0]
        assert decoded == raw_tok.decode(ids, skip_special_tokens=True), name
        assert raw == raw_tok.decode(ids, skip_special_tokens=False), name
        dec.append({"name": name, "ids": ids, "text": decoded.strip(), "decoded": decoded, "raw": raw})
    for d in dec:
        if d["name"].startswith("invalid_utf8"):
            assert "\ufffd" in d["decoded"], d
    return {
        "tokenizer": "blip2-opt-tiny/tokenizer.json (identical in blip2-opt-tiny-proj)",
        "special_ids": {
            "<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<image>": image_token_id, "newline_eos": newline_id,
            "bos_token": tokenizer.bos_token, "eos_token(tokenizer)": tokenizer.eos_token,
        },
        "len_tokenizer": len(tokenizer),
        "model_vocab_size": vocab_size,
        "encode": enc,
        "decode": dec,
    }


@torch.no_grad()
def model_goldens(model_dir: Path, img_dir: Path, question_images: list[str],
                  caption_images: list[str]) -> tuple[dict, dict, dict]:
    model = Blip2ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    processor = Blip2Processor.from_pretrained(model_dir)
    assert processor.image_processor.backend == "pil"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    cfg = model.config
    nq = cfg.num_query_tokens
    eos = model.language_model.generation_config.eos_token_id
    tensors: dict[str, np.ndarray] = {}
    cases = []
    all_stats = {}
    margins = []
    for stem_png in caption_images + [f"q:{x}" for x in question_images]:
        is_q = stem_png.startswith("q:")
        png = stem_png[2:] if is_q else stem_png
        stem = Path(png).stem
        case = f"{'vqa' if is_q else 'caption'}_{stem}"
        prompt = VQA_PROMPT if is_q else None
        image = Image.open(img_dir / png)
        if prompt is None:
            inputs = processor(images=image, return_tensors="pt")
            assert set(inputs.keys()) == {"pixel_values"}, inputs.keys()  # no text: model builds the ids
            input_ids = torch.tensor([[cfg.image_token_index] * nq + [cfg.text_config.bos_token_id]])
        else:
            inputs = processor(images=image, text=prompt, return_tensors="pt")
            input_ids = inputs["input_ids"]
            assert torch.all(inputs["attention_mask"] == 1)
        pixel_values = inputs["pixel_values"]
        assert pixel_values.dtype == torch.float32

        gen = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, num_beams=1,
                             output_logits=True, return_dict_in_generate=True)
        seq = gen.sequences[0]
        # transformers 5 returns prompt ids (image tokens + BOS + prompt) followed by the new tokens
        assert seq[: input_ids.shape[1]].tolist() == input_ids[0].tolist(), (seq, input_ids)
        new = seq[input_ids.shape[1]:].tolist()
        step_logits = torch.stack([lg[0] for lg in gen.logits])  # [steps, vocab], raw (unprocessed)
        assert step_logits.shape[0] == len(new)

        # prefill forward over the whole input, with the intermediate stages (+ per-layer output ranges)
        ranges: dict[str, float] = {}

        def hook(mod_name):
            def fn(_m, _i, o):
                o = o[0] if isinstance(o, tuple) else o
                ranges[mod_name] = max(ranges.get(mod_name, 0.0), o.abs().max().item())
            return fn

        handles = [m.register_forward_hook(hook(type(m).__name__)) for m in model.modules()
                   if type(m).__name__ in ("Blip2EncoderLayer", "Blip2QFormerLayer", "OPTDecoderLayer")]
        dec_in = {}

        def grab_inputs_embeds(_m, _a, kw):
            dec_in["e"] = kw["inputs_embeds"][0]

        handles.append(model.language_model.model.decoder.register_forward_pre_hook(grab_inputs_embeds,
                                                                                     with_kwargs=True))
        out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        for h in handles:
            h.remove()
        vision = out.vision_outputs.last_hidden_state[0]
        qformer = out.qformer_outputs.last_hidden_state[0]
        embeds = model.get_image_features(pixel_values).pooler_output[0]
        logits = out.logits[0]
        assert torch.allclose(logits[-1], step_logits[0], rtol=0, atol=1e-5)
        # How transformers places the image embeddings: inputs_embeds.masked_scatter(mask, embeds) fills the
        # image-token rows (width = word_embed_proj_dim) from the FLATTENED [nq, text hidden] projection.
        # Same thing as row-by-row when word_embed_proj_dim == hidden_size; when they differ (the -proj
        # variant: 96 vs 160) each image row gets the next 96 values of the flat buffer.
        e_dim = dec_in["e"].shape[-1]
        img_rows = dec_in["e"][input_ids[0] == cfg.image_token_index]
        assert torch.equal(img_rows, embeds.flatten()[: nq * e_dim].view(nq, e_dim)), case

        # sanity: manual greedy loop, full recompute each step (no KV cache), must pick the same tokens
        ids = input_ids
        manual = []
        for step in range(MAX_NEW_TOKENS):
            lg = model(pixel_values=pixel_values, input_ids=ids).logits[0, -1]
            assert torch.allclose(lg, step_logits[step], rtol=0, atol=1e-4), (case, step)
            nxt = int(lg.argmax())
            manual.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            if nxt == eos:
                break
        assert manual == new, (case, manual, new)

        lp = torch.log_softmax(step_logits.double(), dim=-1)
        logprobs = [lp[i, t].item() for i, t in enumerate(new)]
        top2 = step_logits.double().topk(2, dim=-1).values
        margin = (top2[:, 0] - top2[:, 1]).tolist()
        margins.extend((m, case, i) for i, m in enumerate(margin))
        text = processor.batch_decode([new], skip_special_tokens=True)[0].strip()

        log(f"  {case}: {len(new)} new tokens, eos={'yes' if new and new[-1] == eos else 'no'}, "
            f"min margin {min(margin):.4f}, text {text!r}")
        if not is_q:
            tensors[f"{case}.vision"] = f32(vision)
            tensors[f"{case}.qformer"] = f32(qformer)
            tensors[f"{case}.image_embeds"] = f32(embeds)
            all_stats[case] = {"vision": stats("vision", vision), "qformer": stats("qformer", qformer),
                               "image_embeds": stats("image_embeds", embeds), "logits": stats("logits", logits),
                               "layer_output_absmax": {k: round(v, 2) for k, v in sorted(ranges.items())}}
            log(f"    layer output absmax {all_stats[case]['layer_output_absmax']}")
        else:
            all_stats[case] = {"logits": stats("logits", logits)}
        tensors[f"{case}.logits"] = f32(logits)
        cases.append({
            "name": case,
            "image": png,
            "prompt": prompt,
            "activations": f"caption_{stem}" if is_q else case,
            "input_ids": input_ids[0].tolist(),
            "generated_ids": new,
            "ended_with_eos": bool(new) and new[-1] == eos,
            "logprobs": logprobs,
            "top2_margin": margin,
            "text": text,
            "argmax_per_prefill_position": logits.argmax(-1).tolist(),
        })
        # greedy outputs must not be degenerate
        assert len(set(new)) > 1, (case, new)
    worst = min(margins)
    log(f"  min top2 margin {worst[0]:.5f} at {worst[1]} step {worst[2]}")
    assert worst[0] >= MIN_MARGIN, f"top-2 margin {worst} < {MIN_MARGIN}: change the seed"
    return tensors, {"cases": cases, "min_top2_margin": worst[0]}, all_stats


# ----------------------------------------------------------------------------------------------
# steps (make_fixtures.py runs them)
# ----------------------------------------------------------------------------------------------
def build() -> dict:
    """Step 1: images, the two checkpoints, pixel / decode / token goldens. Returns what the later
    steps need."""
    torch.manual_seed(MASTER_SEED)
    FIX.mkdir(parents=True, exist_ok=True)
    for g in GENERATED:
        p = FIX / g
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    log("images")
    img_dir = FIX / "images"
    pngs = fixtures_images.make_images(img_dir)

    log("tokenizer")
    tok = fc.opt_bpe_tokenizer(target_vocab=800)
    newline_id = tok.token_to_id("Ċ")
    assert tok.encode("\n").ids == [newline_id]
    base_vocab = tok.get_vocab_size()

    summary = {"models": {}}
    model_dirs = {}
    image_token_id = None
    vocab_size = None
    for mname, spec in SPECS.items():
        log(f"model {mname}")
        processor = fc.blip2_processor(tok, spec["num_query_tokens"])
        tokenizer = processor.tokenizer
        image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        assert image_token_id == base_vocab, (image_token_id, base_vocab)
        tokenizer_len = len(tokenizer)
        vocab_size = (tokenizer_len + 7) // 8 * 8
        assert vocab_size > image_token_id
        cfg = build_config(spec, vocab_size, image_token_id, newline_id)
        torch.manual_seed(spec["seed"])
        model = Blip2ForConditionalGeneration(cfg).eval()
        reinit_(model, spec["seed"], newline_id, tokenizer_len)
        model.generation_config = GenerationConfig(
            bos_token_id=2, eos_token_id=newline_id, pad_token_id=1,
            max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
        )
        out = FIX / mname
        model.to(spec["dtype"])
        model.save_pretrained(out, max_shard_size=spec["max_shard_size"])
        processor.save_pretrained(out)
        want = {torch.float16: "F16", torch.float32: "F32"}[spec["dtype"]]
        shapes = check_safetensors_dtypes(out, want)
        shards = sorted(p.name for p in out.glob("*.safetensors"))
        if spec["text"]["tie_word_embeddings"]:
            assert "language_model.lm_head.weight" not in shapes and len(shards) == 1
        else:
            assert "language_model.lm_head.weight" in shapes and len(shards) >= 2
            assert (out / "model.safetensors.index.json").exists()
            assert "language_model.model.decoder.project_in.weight" in shapes
        log(f"  {len(shapes)} tensors ({want}) in {shards}")
        model_dirs[mname] = out
        summary["models"][mname] = {"vocab_size": vocab_size, "tokenizer_len": tokenizer_len, "shards": shards,
                                    "n_params": sum(int(np.prod(s)) for s in shapes.values()), "dtype": want}

    # reload the processor from disk: ids must survive the round trip
    proc = Blip2Processor.from_pretrained(model_dirs["blip2-opt-tiny"])
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == image_token_id
    assert proc.image_processor.backend == "pil", proc.image_processor.backend
    assert type(proc.image_processor) is BlipImageProcessorPil

    gold = FIX / "goldens"
    gold.mkdir()
    log("pixel goldens")
    np_save_file(pixel_goldens(proc.image_processor, pngs, img_dir), str(gold / "pixels_blip.safetensors"))
    clip_dir = FIX / "clip-preprocessor"
    CLIPImageProcessorPil(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=Image.Resampling.BICUBIC,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_center_crop=True, do_convert_rgb=True,
    ).save_pretrained(clip_dir)
    clip_proc = CLIPImageProcessorPil.from_pretrained(clip_dir)
    np_save_file(pixel_goldens(clip_proc, pngs, img_dir), str(gold / "pixels_clip.safetensors"))

    log("decode fixtures")
    fixtures_images.make_decode_fixtures()

    log("token goldens")
    tokens = token_goldens(proc.tokenizer, model_dirs["blip2-opt-tiny"] / "tokenizer.json", image_token_id,
                           newline_id, vocab_size)
    write_json(gold / "tokens.json", tokens)
    return dict(pngs=pngs, img_dir=img_dir, model_dirs=model_dirs, summary=summary, model_stats={},
                image_token_id=image_token_id, newline_id=newline_id, proc=proc)


def goldens(run: dict) -> None:
    """Step 2: the model goldens (goldens/<model>.json + .safetensors)."""
    pngs, img_dir, model_dirs, summary = run["pngs"], run["img_dir"], run["model_dirs"], run["summary"]
    gold = FIX / "goldens"
    model_stats = run["model_stats"]
    for mname, d in model_dirs.items():
        log(f"model goldens {mname}")
        if mname == "blip2-opt-tiny":
            caption_images, question_images = pngs, ["odd_257x181.png", "rgba_150x120.png"]
        else:
            caption_images, question_images = ["odd_257x181.png"], ["odd_257x181.png"]
        tensors, meta, st = model_goldens(d, img_dir, question_images, caption_images)
        np_save_file(tensors, str(gold / f"{mname}.safetensors"))
        cfg = json.loads((d / "config.json").read_text())
        write_json(gold / f"{mname}.json", {
            "model": mname,
            "note": "vision/qformer/image_embeds are stored once per image under the caption case's name "
                    "('activations' field); every case has its own '<name>.logits' [seq, vocab].",
            "reference": "Blip2ForConditionalGeneration.from_pretrained(dir, dtype=float32, attn_implementation="
                         "'eager'), CPU, eval, deterministic; generate(do_sample=False, num_beams=1, "
                         f"max_new_tokens={MAX_NEW_TOKENS}, output_logits=True)",
            "num_query_tokens": cfg["num_query_tokens"],
            "image_token_index": cfg["image_token_index"],
            "eos_token_id": cfg["text_config"]["eos_token_id"],
            "vocab_size": cfg["text_config"]["vocab_size"],
            "min_top2_margin": meta["min_top2_margin"],
            "cases": meta["cases"],
        })
        model_stats[mname] = st
        summary["models"][mname]["min_top2_margin"] = meta["min_top2_margin"]


def readme(run: dict) -> None:
    """Step 3: tests/fixtures/README.md; its file table lists what exists at this point (so
    make_fixtures.py calls it after the beam and CLIP goldens, before the other families)."""
    summary, proc = run["summary"], run["proc"]
    image_token_id, newline_id = run["image_token_id"], run["newline_id"]
    summary.update(image_token_id=image_token_id, newline_id=newline_id, tokenizer_len=len(proc.tokenizer))
    write_readme(summary, run["model_stats"], run["pngs"])


def write_readme(summary: dict, model_stats: dict, pngs: list[str]) -> None:
    def dims(mname):
        c = json.loads((FIX / mname / "config.json").read_text())
        v, q, t = c["vision_config"], c["qformer_config"], c["text_config"]
        return c, v, q, t

    model_rows = []
    for mname in SPECS:
        c, v, q, t = dims(mname)
        m = summary["models"][mname]
        model_rows.append(
            f"| `{mname}` | {v['hidden_size']} = {v['num_attention_heads']}x{v['hidden_size'] // v['num_attention_heads']}, "
            f"ffn {v['intermediate_size']}, {v['num_hidden_layers']} layer(s) | "
            f"{q['hidden_size']} = {q['num_attention_heads']}x{q['hidden_size'] // q['num_attention_heads']}, "
            f"ffn {q['intermediate_size']}, {q['num_hidden_layers']} layer(s), cross every {q['cross_attention_frequency']} | "
            f"{c['num_query_tokens']} | "
            f"{t['hidden_size']} = {t['num_attention_heads']}x{t['hidden_size'] // t['num_attention_heads']}, "
            f"ffn {t['ffn_dim']}, {t['num_hidden_layers']} layer(s), word_embed_proj_dim {t['word_embed_proj_dim']}, "
            f"tied {str(t['tie_word_embeddings']).lower()} | {m['dtype']}, {len(m['shards'])} file(s), "
            f"{m['n_params']:,} values | {m['min_top2_margin']:.4f} |"
        )
    stat_rows = []
    for mname, st in model_stats.items():
        for case, d in st.items():
            if "vision" not in d:
                continue
            la = d["layer_output_absmax"]
            stat_rows.append(
                f"| {mname} | {case} | {d['vision']['std']:.3f} / {d['vision']['absmax']:.2f} | "
                f"{d['qformer']['std']:.3f} / {d['qformer']['absmax']:.2f} | "
                f"{d['image_embeds']['std']:.3f} / {d['image_embeds']['absmax']:.2f} | "
                f"{d['logits']['std']:.3f} / {d['logits']['absmax']:.2f} | "
                f"{la.get('Blip2EncoderLayer', 0):.1f} / {la.get('Blip2QFormerLayer', 0):.1f} / {la.get('OPTDecoderLayer', 0):.1f} |"
            )
    files = []
    for f in sorted(FIX.rglob("*")):
        # The decode fixtures have their own README (images/decode/README.md).
        decode = f.is_relative_to(FIX / fixtures_images.DECODE_DIR) or f == FIX / fixtures_images.DECODE_GOLDEN
        if f.is_file() and not decode and f.name != "README.md" and any(f.relative_to(FIX).parts[0] == g for g in GENERATED):
            files.append(f"| `{f.relative_to(FIX)}` | {f.stat().st_size:,} |")
    c0, v0, q0, t0 = dims("blip2-opt-tiny")
    img_id, nl_id = summary["image_token_id"], summary["newline_id"]
    text = README_TEMPLATE.format(
        transformers=transformers.__version__, torch=torch.__version__.split("+")[0],
        files="\n".join(files), model_rows="\n".join(model_rows), stat_rows="\n".join(stat_rows),
        img_id=img_id, nl_id=nl_id, base_vocab=img_id, base_vocab_m1=img_id - 1, tok_len=summary["tokenizer_len"],
        vocab=t0["vocab_size"], nq=c0["num_query_tokens"], vqa=VQA_PROMPT, max_new=MAX_NEW_TOKENS,
        min_margin=MIN_MARGIN, pngs=", ".join(f"`{p}`" for p in pngs), **INIT,
    )
    (FIX / "README.md").write_text(text, encoding="utf-8")


README_TEMPLATE = """\
# tests/fixtures (generated: do not edit by hand)

Everything listed below is written by `scripts/make_fixtures.py` with transformers {transformers} / torch {torch} on CPU (PIL image backend, no torchvision):

    pip install -r scripts/requirements-fixtures.txt
    python scripts/make_fixtures.py

The script wipes `images/ goldens/ blip2-opt-tiny/ blip2-opt-tiny-proj/ clip-preprocessor/ README.md`
and regenerates them. Fixed seeds, one CPU thread, deterministic torch: a rerun is byte-identical.
The model folders are exactly what `save_pretrained` writes; the reference numbers come from
reloading them (`from_pretrained(dir, dtype=torch.float32, attn_implementation="eager")`), so fp32
math on exactly the values on disk.

## Files

| file | bytes |
|---|---:|
{files}

## Images (`images/`)

PNG pixel goldens exist for {pngs}. Synthetic content: sine gradients, hard-edged ellipses and
rectangles, a pure white + pure black stripe (bicubic overshoot, so the clip to 0..255 matters) and
Gaussian noise. `tiny_13x9` exercises upscaling. `rgba_150x120` has alpha 0, 255 and partial values,
with non-trivial colour under alpha 0. `grey_67x45` is mode L, `greyalpha_40x50` mode LA,
`palette_100x80` mode P with a tRNS entry (palette index 5 transparent). `photo_q90.jpg` (200x150,
quality 90) is only a decodable input: JPEG decoders differ by a few LSB, so no golden uses it.

## Tokenizer (same files in both model folders)

Byte-level BPE trained with `tokenizers` on an English corpus embedded in the script (ByteLevel
pre-tokenizer, add_prefix_space=false, GPT-2 regex; ByteLevel decoder; all 256 byte tokens present).
Wrapped in transformers' `GPT2Tokenizer` (the class blip2-opt checkpoints name) with bos = eos =
`</s>`, pad `<pad>`, unk `<unk>`, `add_bos_token=True`.

| token | id |
|---|---:|
| `<s>` | 0 |
| `<pad>` (model pad) | 1 |
| `</s>` (BOS, prepended to every encoded text) | 2 |
| `<unk>` | 3 |
| `"\\n"` = `Ċ` (generation EOS, like OPT's 50118) | {nl_id} |
| `<image>` (`image_token_index`, added special token) | {img_id} |

BPE vocab {base_vocab} (ids 0..{base_vocab_m1}), `len(tokenizer)` = {tok_len}, model `vocab_size` = {vocab}
(rounded up to a multiple of 8 like OPT's 50304 > 50266: logits have {vocab} columns, the last
ones have no token; their embedding rows are scaled down so they never win).

`tokenizer.json` is complete and is what transformers itself uses: its `post_processor` is
`TemplateProcessing` single `</s>:0 $A:0`, pair `</s>:0 $A:0 </s>:1 $B:1`; `<s> <pad> </s> <unk> <image>`
are `added_tokens` with `special: true`, `normalized: false`. `tokenizer_config.json` holds no
`add_bos_token` and no `added_tokens_decoder` in transformers 5 (all of it lives in tokenizer.json).

## Models

| folder | vision | Q-Former | queries | OPT | on disk | min top-2 margin |
|---|---|---|---:|---|---|---:|
{model_rows}

Common: image 224, patch 14 (257 tokens incl. CLS), vision LN eps 1e-6, qkv_bias true, exact-erf GELU;
Q-Former LN eps 1e-12, GELU; OPT LN eps 1e-5 (nn.LayerNorm default; not in config), ReLU,
do_layer_norm_before true, max_position_embeddings 128 (embed_positions has 130 rows, offset 2),
bos 2, pad 1, **text_config.eos_token_id = {nl_id}**, every Linear has a bias (except project_in/out
and lm_head). `config.json` names the image token `image_token_index` (= {img_id}; `image_token_id` is
only an attribute alias). `generation_config.json`: bos 2, eos {nl_id}, pad 1, max_new_tokens {max_new}, greedy.

- `blip2-opt-tiny`: single `model.safetensors`, every tensor F16 (query_tokens and the Q-Former
  too), no `language_model.lm_head.weight` (tied to `language_model.model.decoder.embed_tokens.weight`).
- `blip2-opt-tiny-proj`: F32, 3 shards + `model.safetensors.index.json`, separate
  `language_model.lm_head.weight` [vocab, 96], `project_in` [160, 96] / `project_out` [96, 160] (no bias),
  cross-attention in every Q-Former layer, one vision head of 88 and one Q-Former head of 64.
- No Q-Former text-branch weights (`intermediate`/`output`; `use_qformer_text_input` false):
  transformers 5 does not create them. Real hub checkpoints may still carry them.

Initialisation (not transformers' default, which is degenerate), N(mean, std): every parameter
from its own `torch.Generator` seeded from (model seed, tensor name); Linear/Conv N(0, g/sqrt(fan_in))
with g = {lin} in vision/Q-Former and g = {text_lin} in OPT (with g = 1 a random tied-embedding OPT
just repeats its input token); all biases N(0, 0.1) (including the k third of the fused `qkv.bias`,
zero in real checkpoints: it has no effect, softmax is shift-invariant), LayerNorm weight 1 + N(0, 0.1),
bias N(0, 0.1); token embeddings N(0, {emb}) with the `\\n` row x{eos_boost} (so some captions stop at
EOS) and the rows >= len(tokenizer) x{pad_rows}; OPT positions N(0, {pos}); vision position embedding
N(0, {vis_pos}); class embedding N(0, {cls}); query tokens N(0, {query}); untied lm_head
N(0, {head}/sqrt(96)) (same EOS / padding-row scaling).
Then everything is rounded to fp16 (`.half().float()`), so the fp32 reference uses the on-disk values.

## Goldens (`goldens/`)

### `pixels_blip.safetensors`, `pixels_clip.safetensors`

To stay small the pixel goldens are stored losslessly as uint8 + a lookup table instead of float32:

- `<png stem>`: uint8 [3, 224, 224] = the image after `convert("RGB")` and resize (BLIP: 224x224,
  bicubic; CLIP: shortest edge 224 bicubic, then center crop 224), channels first.
- `_lut`: float32 [3, 256]; transformers' `pixel_values[c, y, x] == _lut[c, u8[c, y, x]]` bit for bit
  (the script checks this against the processor's real float32 output for every image).
  `_lut[c, q] = float32((float32(q * (1/255 as f64)) - float32(mean[c])) / float32(std[c]))`, the numpy
  order of operations of the PIL backend: rescale in float64 then cast, normalise in float32.

BLIP config: `blip2-opt-tiny/processor_config.json` (key `image_processor`); CLIP config:
`clip-preprocessor/preprocessor_config.json` (`CLIPImageProcessorPil.save_pretrained`).

### `tokens.json`

- `encode`: `{{text, ids, tokens}}`, ids from `tokenizer(text)` (add_special_tokens, so `</s>`=2 first).
  The same ids come from `tokenizers.Tokenizer.from_file("tokenizer.json").encode(text)` (checked).
- `decode`: `{{name, ids, decoded, text, raw}}`: `decoded` = `batch_decode([ids], skip_special_tokens=True)[0]`,
  `text` = `decoded.strip()` (what BLIP-2 usage returns), `raw` = decode without skipping specials.

### `processors.json`

Written by `scripts/fixtures_processors.py` (called from `main()`, also runs standalone): transformers'
logits processors as `GenerationMixin._get_logits_processor` builds them for `generate()`, on random
fp32 rows (vocab 64..300, tied values, -inf entries, magnitudes up to ~1e5). `rows`: the input rows;
`cases`: `{{name, row, history, prompt_len, entry, settings, processors, expected}}` where `settings`
are resolved GenerationConfig fields, `history` the sequence's `input_ids`, `entry` `logits` (greedy and
sampling) or `log_probs` (beam search: `log_softmax` first), `processors` the class names in order and
`expected` the processed row. Floats are shortest fp32 decimals; `"inf"`, `"-inf"`, `"nan"` as strings.
Top-p / min-p cuts are kept 1e-5 (relative) away from every probability and no tie group straddles a
top-p cut (torch.sort is unstable on ties), so the goldens do not depend on softmax rounding.

### `<model>.safetensors` + `<model>.json`

JSON: `{{model, num_query_tokens, image_token_index, eos_token_id, vocab_size, min_top2_margin, cases}}`,
each case `{{name, image, prompt, activations, input_ids, generated_ids, ended_with_eos, logprobs,
top2_margin, text, argmax_per_prefill_position}}`:

- `input_ids`: the full decoder input. Caption (prompt null): `[{img_id}] * {nq} + [2]`, built by
  `Blip2ForConditionalGeneration.generate` itself (the processor returns only `pixel_values` when
  there is no text). VQA (prompt `"{vqa}"`): built by `Blip2Processor`:
  `tokenizer("<image>" * {nq}, add_special_tokens=False)` + `tokenizer(prompt)` (which starts with 2).
- `generated_ids`: new tokens only (greedy, `max_new_tokens={max_new}`), EOS `{nl_id}` included when produced.
  `generate` returns input_ids + new tokens in transformers 5.
- `logprobs`: float64 `log_softmax` of the raw (unprocessed) step logits (`output_logits=True`) at the
  chosen token; `top2_margin`: best minus second-best raw logit per step.
- `text`: `batch_decode([generated_ids], skip_special_tokens=True)[0].strip()`. Random weights, so the
  text is gibberish, often with U+FFFD from split multi-byte characters, and control characters.
- `activations`: the case whose tensors hold this image's vision / Q-Former / projection outputs
  (stored once per image, under the caption case).

safetensors (all float32):

- `<case>.vision` [257, Dv]: `vision_model(...).last_hidden_state` (post_layernorm applied, CLS first).
- `<case>.qformer` [num_query, Dq]: Q-Former `last_hidden_state`.
- `<case>.image_embeds` [num_query, Dtext]: `language_projection` output.
- `<case>.logits` [seq, vocab] for every case: logits of the prefill forward over the whole `input_ids`.

### `padbatch_blip2-opt-tiny.json` (scripts/fixtures_padbatch.py)

Batched `generate()` on `blip2-opt-tiny` with a different question per image (three images, three
question lengths), `Blip2Processor(..., padding=True)` with `tokenizer.padding_side="left"`,
greedy: per sequence the new ids (cut after EOS) and their log-probs. tests/padded_batch.rs checks
`Model::ask_batch` against it.

### `genrest_cases.json` (scripts/fixtures_genrest.py)

The rest of `generate()` on `blip2-opt-tiny`: `generate(do_sample=False, output_scores=True,
return_dict_in_generate=True, tokenizer=..., **options)` with `stop_strings` (ending inside a
token, spanning two and three tokens, a non-ASCII string on byte-level tokens, never matching,
a batch of 2 where one stops first, with an EOS, and in beam search) and beam search with logits
processors (repetition_penalty 1.3 / 0.8 / 1.2, no_repeat_ngram_size 2 / 3, min_new_tokens, 2
returned hypotheses, a VQA prompt, a batch of 2). Each case `{{name, images, prompt, options,
sequences, texts, scores}}`: `sequences` are the new ids of every returned sequence (batch-major,
cut after the first EOS, trailing pad fill dropped), `scores` are `sequences_scores` (null for
greedy). tests/genrest.rs checks them.

### `beam_cases.json` (scripts/fixtures_beam.py)

Beam search on `blip2-opt-tiny`: `generate(do_sample=False, output_scores=True,
return_dict_in_generate=True, **options)` per case, num_beams 1/2/3/4/5/8, EOS the checkpoint's
or a frequent mid-caption token (773, 532) so hypotheses finish early, one or two EOS ids,
length_penalty 0/1/1.5/2/-1, early_stopping true/false/"never", batches of 2 images,
num_return_sequences 2-3, min_new_tokens and a VQA prompt. Each case `{{name, images, prompt,
options, sequences, scores}}`: `sequences` are the new ids of every returned hypothesis
(batch-major, cut after the first EOS: transformers pads shorter ones), `scores` are
`sequences_scores` (null for num_beams 1, which is greedy).

Cases: `blip2-opt-tiny`: a caption for every PNG + VQA for `odd_257x181` and `rgba_150x120`;
`blip2-opt-tiny-proj`: caption + VQA for `odd_257x181`. Checked while generating: generate's tokens ==
argmax of a step-by-step forward without KV cache, prefill last row == first step logits, every
top-2 margin >= {min_margin}, no case is one repeated token.

Activation statistics (std / absmax; last column: absmax of vision / Q-Former / OPT layer outputs,
i.e. the residual stream):

| model | case | vision | qformer | image_embeds | logits | layer outputs |
|---|---|---|---|---|---|---|
{stat_rows}

## transformers {transformers} behaviour worth knowing (and where docs/design models.md is off)

1. **No alpha compositing.** `image_transforms.convert_to_rgb` is `image.convert("RGB")` if the
   mode is not RGB: RGBA and LA simply drop alpha (LA/L replicate the grey value), P maps through
   the palette and ignores tRNS transparency. models.md says "an alpha channel is composited onto
   white": not in 5.17. `rgba_150x120`/`greyalpha_40x50`/`palette_100x80` pin this down.
2. **Pixel math.** PIL backend: `np.array(img)` uint8 -> PIL resize (uint8, Pillow BICUBIC) ->
   `rescale`: `u8.astype(float64) * (1/255)` then `.astype(float32)` -> `normalize` in float32:
   `(x - mean) / std` (two float32 ops, mean/std cast to float32). CLIP's shortest-edge size is
   `int(224 * long / short)`; crop top = (H-224)//2, left = (W-224)//2.
3. **Processor config file.** `Blip2Processor.save_pretrained` writes `processor_config.json` with
   the image-processor settings nested under `"image_processor"`, and no `preprocessor_config.json`
   (hub checkpoints made with older versions have `preprocessor_config.json`; a loader needs both).
   `image_processor_type` is saved as `BlipImageProcessor` (the `Pil` suffix is stripped);
   `resample: 3` = bicubic.
4. **Config names.** `Blip2Config.image_token_index` is the stored field; `image_token_id` is an
   `attribute_map` alias. `qformer_config.encoder_hidden_size` is overwritten with the vision hidden size.
5. **EOS lives in text_config.** `Blip2ForConditionalGeneration.generate` ends with
   `self.language_model.generate(...)`; the language model's GenerationConfig is derived from
   `text_config`, so `generation_config.json` (top level) is not consulted there. Real
   blip2-opt-2.7b has `text_config.eos_token_id = 50118`; the fixtures do the same with `{nl_id}`.
   Default length is 20 new tokens either way: a default max_length (20) is turned into
   input length + 20, capped at text `max_position_embeddings` (128 here, 2048 for OPT-2.7b).
6. **Input ids.** With no text, `generate` builds `[image_token_index] * num_query_tokens + [bos]`;
   with text the processor prepends `num_query_tokens` `<image>` ids before the tokenizer's
   `</s>`. The model embeds all ids, then `inputs_embeds.masked_scatter(input_ids == image_token_index,
   image_embeds)`: image rows are filled in order from the FLATTENED projection output. If
   `word_embed_proj_dim != text hidden_size` (the -proj fixture: 96 vs 160) this silently puts the
   first `nq*96` values of the row-major [nq, 160] buffer into nq rows of 96 (no error). The
   -proj goldens contain exactly that; a reimplementation must mimic it or reject such configs.
   An `<image>` typed inside the prompt would add one more image position (and break the scatter).
7. **Decode.** `clean_up_tokenization_spaces` is never applied to BPE tokenizers in 5.x (and
   is not saved). Decoding = tokenizers' ByteLevel decoder over the concatenated bytes of all kept
   tokens, lossy UTF-8 (one U+FFFD per maximal invalid subpart, e.g. `F0 9F` -> one U+FFFD).
   `skip_special_tokens` drops the special added tokens (0, 1, 2, 3, {img_id}) before joining bytes,
   so bytes on either side of a special token merge (`bytes_split_by_special`). Ids >= len(tokenizer)
   are silently dropped (`out_of_tokenizer_id`). BLIP-2 usage then calls Python `str.strip()`, which
   also strips U+001C..U+001F (Rust `str::trim` does not: `strip_unit_separator`).
8. **Encode.** Added tokens (`<image>`, `</s>`, `<pad>`...) are matched in raw text before BPE, with no
   lstrip/rstrip: `" <image> x"` keeps its spaces as `Ġ` tokens. The GPT-2 regex splits
   runs of spaces so that the last space joins the next word (`"  two"` -> `Ġ`, `Ġtwo`).
9. **Vision attention** (`Blip2Attention`): one fused `qkv` Linear, reshaped `(B, T, 3, H, hd)`;
   scores `(q @ k^T) * hd^-0.5`, softmax in the working dtype (BLIP does not upcast to fp32), no mask.
   `pooler_output` = `post_layernorm` applied twice to CLS (unused for generation).
10. **Q-Former**: `qformer.layernorm` is applied to the query tokens at the INPUT (then dropout), there
    is no final norm; layers are post-norm BERT (`LN(dense(attn) + x)`); cross-attention in layers
    with `idx % cross_attention_frequency == 0`; scaling `(q @ k^T) * 64^-0.5` after the matmul, no
    mask (the all-ones image mask is a no-op). `_keep_in_fp32_modules = ["query_tokens",
    "qformer"]`: in fp16 loading the Q-Former runs in fp32, the vision output is cast up to fp32, the
    Q-Former output is cast back to the vision dtype before `language_projection`.
11. **OPT**: q is multiplied by hd^-0.5 right after `q_proj` (bias included), before `q @ k^T`;
    softmax in fp32 then cast to the working dtype; causal + padding mask; positions
    `cumsum(attention_mask) * attention_mask - 1`, looked up at `+2`; `project_in` is applied after the
    image scatter, `project_out` after `final_layer_norm`; LN eps 1e-5.
"""
