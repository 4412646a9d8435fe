#!/usr/bin/env python3
"""Goldens for SmolVLM's / Idefics3's processor (transformers 5.17's `Idefics3ImageProcessorPil` and
`Idefics3Processor`): image tiling, pixel values and the prompt each `<image>` expands to.

Writes
  tests/fixtures/idefics3-processor/   preprocessor_config.json, processor_config.json and a small
                                       byte-level BPE tokenizer with Idefics3's special tokens
  goldens/idefics3_pixels.safetensors  per config and PNG: the uint8 frames [n, 3, M, M] (tiles in
                                       row-major order, then the global image) for the small configs,
                                       and `_lut` [3, 256] (pixel_values == _lut[c, u8], checked here)
  goldens/idefics3_processor.json      per config and PNG: rows, cols, frame count, the sha256 of the
                                       float32 pixel_values (little-endian, [n, 3, M, M]) and of the
                                       uint8 frames; per prompt case: the text, the expanded text and
                                       the input ids

Configs: `tiny` and `tiny-nosplit` (longest edge 128, tiles 32: every frame stored), `tiny-bicubic`
(resample 3), and the shapes of real checkpoints, stored as hashes only: SmolVLM-256M/500M
(longest edge 2048, tiles 512) and SmolVLM-Instruct 2.2B (1536, 384). The image processor is the
PIL one transformers uses without torchvision (whose backend differs by ~1 LSB).

Run standalone (`python3 scripts/fixtures_idefics3.py`) or from make_fixtures.py's main().
"""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
from PIL import Image
from safetensors.numpy import save_file as np_save_file

import fixtures_common as fc
from transformers import GPT2TokenizerFast, Idefics3Processor
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

PNGS = [
    "wide_301x97.png", "tall_83x311.png", "odd_257x181.png", "exact_224x224.png", "tiny_13x9.png",
    "rgba_150x120.png", "grey_67x45.png", "greyalpha_40x50.png", "palette_100x80.png",
]
# name -> (size.longest_edge, max_image_size.longest_edge, do_image_splitting, resample, store frames)
CONFIGS = {
    "tiny": (128, 32, True, 1, True),
    "tiny-nosplit": (128, 32, False, 1, True),
    "tiny-bicubic": (96, 32, True, 3, True),
    "smolvlm-256m": (2048, 512, True, 1, False),
    "smolvlm-2.2b": (1536, 384, True, 1, False),
}
IMAGE_SEQ_LEN = 4
EXTRA_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)
]
PROMPTS = [
    ("one image", "<image>What is in the picture?", ["wide_301x97.png"]),
    ("two images", "User:<image>and<image>\nwhich is brighter?<end_of_utterance>\nAssistant:",
     ["tall_83x311.png", "tiny_13x9.png"]),
    ("image last", "Describe this:\n<image>", ["odd_257x181.png"]),
]


def processor(longest: int, tile: int, split: bool, resample: int) -> Idefics3ImageProcessorPil:
    return Idefics3ImageProcessorPil(
        size={"longest_edge": longest}, max_image_size={"longest_edge": tile}, do_image_splitting=split,
        resample=resample, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def image_goldens() -> tuple[dict, dict]:
    tensors, meta = {}, {}
    img_dir = fc.FIX / "images"
    # The float each byte becomes: rescale in float64 then cast, normalize in float32 (numpy's
    # order in the PIL backend); checked against the processor's own output for every image below.
    lut = np.empty((3, 256), np.float32)
    for v in range(256):
        lut[:, v] = (np.float32(v * (1 / 255)) - np.float32(0.5)) / np.float32(0.5)
    for name, (longest, tile, split, resample, store) in CONFIGS.items():
        proc = processor(longest, tile, split, resample)
        cases = {}
        for png in PNGS:
            img = Image.open(img_dir / png)
            full = proc(img, return_tensors="np", return_row_col_info=True)
            raw = proc(Image.open(img_dir / png), do_rescale=False, do_normalize=False, return_tensors="np",
                       return_row_col_info=True)
            px, mask = full.pixel_values[0], full.pixel_attention_mask[0]
            frames = raw.pixel_values[0]
            assert px.dtype == np.float32 and px.shape[1:] == (3, tile, tile), (px.dtype, px.shape)
            assert mask.all(), f"{name}/{png}: a padded frame in a single-image call"
            assert np.array_equal(frames, np.rint(frames)) and frames.min() >= 0 and frames.max() <= 255
            frames = frames.astype(np.uint8)
            recon = lut[np.arange(3)[None, :, None, None], frames]
            assert np.array_equal(recon.view(np.uint32), px.view(np.uint32)), f"LUT mismatch {name}/{png}"
            rows, cols = full["rows"][0][0], full["cols"][0][0]
            n = frames.shape[0]
            assert n == (rows * cols + 1 if rows or cols else 1), (name, png, n, rows, cols)
            cases[png] = {"rows": rows, "cols": cols, "frames": n, "pixel_values_sha256": sha256(px),
                          "frames_sha256": sha256(frames)}
            if store:
                tensors[f"{name}/{png}"] = np.ascontiguousarray(frames)
        meta[name] = {"size_longest_edge": longest, "max_image_size_longest_edge": tile,
                      "do_image_splitting": split, "resample": resample, "images": cases}
    tensors["_lut"] = np.ascontiguousarray(lut)
    return tensors, meta


def tokenizer_and_processor(out_dir):
    tok = fc.opt_bpe_tokenizer(400)
    fast = GPT2TokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                             unk_token="<unk>", add_prefix_space=False)
    fast.add_special_tokens({"additional_special_tokens": EXTRA_TOKENS})
    proc = Idefics3Processor(image_processor=processor(128, 32, True, 1), tokenizer=fast,
                             image_seq_len=IMAGE_SEQ_LEN)
    proc.save_pretrained(out_dir)
    return proc


def prompt_goldens(proc) -> list[dict]:
    img_dir = fc.FIX / "images"
    cases = []
    for name, text, pngs in PROMPTS:
        images = [Image.open(img_dir / p) for p in pngs]
        _, replacements = proc._process_images([images], return_row_col_info=True)
        expanded, _ = proc.get_text_with_replacements([text], images_replacements=replacements)
        ids = proc(text=[text], images=[images])["input_ids"][0]
        assert proc.tokenizer(expanded[0])["input_ids"] == list(ids)
        cases.append({"name": name, "text": text, "images": pngs, "expanded": expanded[0],
                      "input_ids": [int(i) for i in ids]})
    return cases


def main() -> None:
    out_dir = fc.FIX / "idefics3-processor"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    fc.log("idefics3 processor goldens")
    tensors, meta = image_goldens()
    proc = tokenizer_and_processor(out_dir)
    np_save_file(tensors, str(fc.GOLD / "idefics3_pixels.safetensors"))
    fc.write_json(fc.GOLD / "idefics3_processor.json", {
        "reference": "Idefics3ImageProcessorPil and Idefics3Processor, transformers 5.17.0, Pillow 13",
        "image_seq_len": IMAGE_SEQ_LEN,
        "configs": meta,
        "prompts": prompt_goldens(proc),
    })


if __name__ == "__main__":
    main()
