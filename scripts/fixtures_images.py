"""Test images and decode fixtures (torch-free): the base every fixture generator builds on.

Holds the paths, the master seed, the log and Pillow's version check that all generators share
(`fixtures_common` re-exports them), and writes:

  tests/fixtures/images/           synthetic PNG test images of odd sizes and modes, plus one JPEG
  tests/fixtures/images/decode/ + goldens/decode_rgb.safetensors: decoder inputs and Pillow 13
                                   results (alone: `python scripts/make_fixtures.py --images-only`)

Needs only Pillow, numpy and safetensors: `make_fixtures.py --images-only` imports this module and
nothing that loads torch or transformers.
"""

from __future__ import annotations

import math
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageOps
from safetensors.numpy import save_file as np_save_file

REQUIRED_PILLOW = "13.0.0"
if PIL.__version__ != REQUIRED_PILLOW:
    sys.exit(f"make_fixtures.py: pillow=={REQUIRED_PILLOW} is required (found {PIL.__version__}). "
             "pip install -r scripts/requirements-fixtures.txt")

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
MASTER_SEED = 20240607


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------------------------
# 1. Test images
# ----------------------------------------------------------------------------------------------
def synth_rgb(w: int, h: int, seed: int) -> np.ndarray:
    """Natural-ish uint8 HxWx3 image: smooth gradients + hard-edged shapes + a saturated stripe + noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u = x / max(w - 1, 1)
    v = y / max(h - 1, 1)
    img = np.empty((h, w, 3), np.float64)
    for c in range(3):
        fu, fv, ph = rng.uniform(0.3, 2.0), rng.uniform(0.3, 2.0), rng.uniform(0, 2 * math.pi)
        img[..., c] = 128 + 70 * np.sin(2 * math.pi * (fu * u + fv * v) + ph) + 40 * (u - v) * (c - 1)
    for _ in range(4):  # ellipses
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.08, 0.35) * w + 1, rng.uniform(0.08, 0.35) * h + 1
        m = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
        img[m] = 0.25 * img[m] + 0.75 * rng.uniform(0, 255, 3)
    for _ in range(3):  # rectangles
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(1, max(2, w // 3)), y0 + rng.integers(1, max(2, h // 3))
        img[y0:y1, x0:x1] = rng.uniform(0, 255, 3)
    # saturated black/white stripe: bicubic overshoots here, exercising the clip to 0..255
    sx = rng.integers(0, max(1, w - 4))
    img[:, sx : sx + max(1, w // 16)] = 255.0
    img[:, sx + max(1, w // 16) : sx + 2 * max(1, w // 16)] = 0.0
    img += rng.normal(0, 6, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def alpha_pattern(w: int, h: int, seed: int) -> np.ndarray:
    """uint8 HxW alpha: exact 0 band (left), exact 255 band (right), ramp between, a transparent disc."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    a = np.clip((x / max(w - 1, 1) - 0.25) / 0.5, 0, 1) * 255
    a = a + rng.normal(0, 10, a.shape) * ((a > 0) & (a < 255))
    cx, cy, r = 0.6 * w, 0.5 * h, 0.18 * min(w, h) + 1
    a[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = 0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def make_images(out: Path) -> list[str]:
    out.mkdir(parents=True)
    pngs = []

    def save_png(img: Image.Image, name: str, **kw):
        img.save(out / name, format="PNG", **kw)
        pngs.append(name)

    for i, (name, w, h) in enumerate(
        [("wide_301x97", 301, 97), ("tall_83x311", 83, 311), ("odd_257x181", 257, 181),
         ("exact_224x224", 224, 224), ("tiny_13x9", 13, 9)]
    ):
        save_png(Image.fromarray(synth_rgb(w, h, MASTER_SEED + 10 + i), "RGB"), f"{name}.png")

    # RGBA: RGB under alpha==0 is deliberately non-trivial, so alpha compositing (which transformers
    # does NOT do) would be caught.
    rgb = synth_rgb(150, 120, MASTER_SEED + 20)
    rgba = np.dstack([rgb, alpha_pattern(150, 120, MASTER_SEED + 21)])
    save_png(Image.fromarray(rgba, "RGBA"), "rgba_150x120.png")

    grey = synth_rgb(67, 45, MASTER_SEED + 30).mean(axis=2).round().astype(np.uint8)
    save_png(Image.fromarray(grey, "L"), "grey_67x45.png")

    grey2 = synth_rgb(40, 50, MASTER_SEED + 40)[..., 1]
    la = np.dstack([grey2, alpha_pattern(40, 50, MASTER_SEED + 41)])
    save_png(Image.fromarray(la, "LA"), "greyalpha_40x50.png")

    # P: 64-entry palette (4 levels per channel, jittered), palette index 5 transparent (tRNS chunk)
    src = synth_rgb(100, 80, MASTER_SEED + 50)
    idx = ((src[..., 0] // 64) * 16 + (src[..., 1] // 64) * 4 + (src[..., 2] // 64)).astype(np.uint8)
    rng = np.random.default_rng(MASTER_SEED + 51)
    pal = []
    for k in range(64):
        base = np.array([(k // 16) % 4, (k // 4) % 4, k % 4]) * 64 + 32
        pal.extend(int(c) for c in np.clip(base + rng.integers(-20, 21, 3), 0, 255))
    p = Image.fromarray(idx, "P")
    p.putpalette(pal)
    save_png(p, "palette_100x80.png", transparency=5)

    # JPEG: a decodable input only (JPEG decoders differ by a few LSB: never a pixel golden)
    Image.fromarray(synth_rgb(200, 150, MASTER_SEED + 60), "RGB").save(out / "photo_q90.jpg", quality=90)

    for name in pngs:  # sanity: modes as intended after a round trip through the file
        im = Image.open(out / name)
        log(f"  image {name}: mode {im.mode} size {im.size} info {sorted(im.info)}")
    return pngs


# ----------------------------------------------------------------------------------------------
# 1b. Decode fixtures: JPEG variants, 16-bit PNGs, EXIF orientation (goldens/decode_rgb.safetensors)
# ----------------------------------------------------------------------------------------------
DECODE_DIR = "images/decode"
DECODE_GOLDEN = "goldens/decode_rgb.safetensors"
# Images whose goldens also hold the BLIP 224x224 bicubic resize (key "<stem>.blip224").
DECODE_BLIP = ["jpeg_progressive_420", "png16_rgb"]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(a: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow can only write 16-bit grey). zlib level 0 (stored
    blocks) so the bytes do not depend on the zlib version."""
    h, w = a.shape[:2]
    raw = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw, 0))
            + png_chunk(b"IEND", b""))


def synth_u16(w: int, h: int, channels: int, seed: int) -> np.ndarray:
    """uint16 HxWxC: the 8-bit synthetic image scaled up, plus noise in the low byte, with the
    extremes 0, 255, 256, 65535 planted (high byte vs clamp conversions differ on them)."""
    rng = np.random.default_rng(seed)
    base = np.concatenate([synth_rgb(w, h, seed)] * 2, axis=2)[..., :channels].astype(np.uint16)
    a = base * 256 + rng.integers(0, 256, base.shape, dtype=np.uint16)
    a.reshape(-1)[:8] = [0, 255, 256, 65535, 1, 254, 257, 300]
    return a


def make_decode_fixtures() -> None:
    """Inputs for the decoder and what transformers' load_image makes of them in Pillow 13:
    `np.asarray(ImageOps.exif_transpose(Image.open(f)).convert("RGB"))`, uint8 [H, W, 3]."""
    out = FIX / DECODE_DIR
    out.mkdir(parents=True)
    files = []

    def jpeg(img: Image.Image, name: str, **kw):
        img.save(out / name, format="JPEG", **kw)
        files.append(name)

    rgb = Image.fromarray(synth_rgb(45, 31, MASTER_SEED + 100), "RGB")  # not a multiple of any MCU
    for prog in (False, True):
        kind = "progressive" if prog else "baseline"
        for sub, tag in ((2, "420"), (1, "422"), (0, "444")):
            jpeg(rgb, f"jpeg_{kind}_{tag}.jpg", quality=85, subsampling=sub, progressive=prog)
        jpeg(rgb.convert("L"), f"jpeg_{kind}_grey.jpg", quality=85, progressive=prog)
        cmyk = np.dstack([synth_rgb(45, 31, MASTER_SEED + 101), synth_rgb(45, 31, MASTER_SEED + 102)[..., 0]])
        jpeg(Image.fromarray(cmyk, "CMYK"), f"jpeg_{kind}_cmyk.jpg", quality=85, progressive=prog)

    small = Image.fromarray(synth_rgb(24, 16, MASTER_SEED + 110), "RGB")  # not square: rotations show
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        jpeg(small, f"exif_jpeg_{o}.jpg", quality=90, exif=exif.tobytes())
        small.save(out / f"exif_png_{o}.png", format="PNG", exif=exif.tobytes())
        files.append(f"exif_png_{o}.png")
    # No EXIF orientation: Pillow's getexif falls back to the XMP packet's tiff:Orientation.
    jpeg(small, "xmp_orientation_6.jpg", quality=90,
         xmp=b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description tiff:Orientation="6"/>'
             b"</rdf:RDF></x:xmpmeta>")

    grey16 = synth_u16(19, 13, 1, MASTER_SEED + 120)[..., 0]
    grey16[1::2] //= 128  # half the rows below 512, so the clamp to 255 and pass-through both occur
    g16 = Image.fromarray(grey16)  # uint16 2-D: mode I;16
    assert g16.mode == "I;16", g16.mode
    g16.save(out / "png16_grey.png", format="PNG")
    files.append("png16_grey.png")
    for name, ctype, ch in (("png16_greyalpha", 4, 2), ("png16_rgb", 2, 3), ("png16_rgba", 6, 4)):
        (out / f"{name}.png").write_bytes(png16(synth_u16(19, 13, ch, MASTER_SEED + 121 + ctype), ctype))
        files.append(f"{name}.png")

    gold = {}
    for name in sorted(files):
        im = Image.open(out / name)
        im.load()
        rgb = ImageOps.exif_transpose(im).convert("RGB")
        stem = Path(name).stem
        assert stem not in gold, f"two fixtures named {stem}"
        gold[stem] = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
        if stem in DECODE_BLIP:
            r = rgb.resize((224, 224), Image.Resampling.BICUBIC)
            gold[f"{stem}.blip224"] = np.ascontiguousarray(np.asarray(r, dtype=np.uint8).transpose(2, 0, 1))
        log(f"  decode {name}: mode {im.mode} size {im.size} -> {rgb.size}")
    g = gold["png16_grey"]
    assert (g == 255).mean() > 0.3 and len(np.unique(g[g < 255])) > 20, "clamp and pass-through both occur"
    assert gold["exif_jpeg_6"].shape == (24, 16, 3) and gold["xmp_orientation_6"].shape == (24, 16, 3)
    np_save_file(gold, str(FIX / DECODE_GOLDEN))
    write_decode_readme(sorted(files))


def write_decode_readme(files: list[str]) -> None:
    rows = "\n".join(f"| `{f}` | {(FIX / DECODE_DIR / f).stat().st_size:,} |" for f in files)
    (FIX / DECODE_DIR / "README.md").write_text(f"""\
# tests/fixtures/images/decode (generated: do not edit by hand)

Written by `python scripts/make_fixtures.py --images-only` (or the full run) with Pillow {PIL.__version__};
the golden is `{DECODE_GOLDEN}` ({(FIX / DECODE_GOLDEN).stat().st_size:,} bytes).

For every file below, key `<stem>` holds uint8 [H, W, 3] =
`np.asarray(ImageOps.exif_transpose(Image.open(f)).convert("RGB"))`: what transformers' `load_image`
hands to the image processor. For {", ".join(f"`{s}`" for s in DECODE_BLIP)} the key `<stem>.blip224` holds
uint8 [3, 224, 224] = that image after `resize((224, 224), BICUBIC)` (BLIP's resize; map it through
`_lut` of `pixels_blip.safetensors` to get pixel_values).

- `jpeg_{{baseline,progressive}}_{{420,422,444,grey,cmyk}}.jpg`: 45x31 (no whole number of MCUs),
  quality 85; CMYK files carry Pillow's Adobe marker and inverted samples.
- `exif_jpeg_{{1..8}}.jpg`, `exif_png_{{1..8}}.png`: 24x16 with EXIF Orientation N (JPEG APP1, PNG `eXIf`).
- `xmp_orientation_6.jpg`: no EXIF, XMP `tiff:Orientation="6"` (Pillow's fallback).
- `png16_grey.png` (Pillow `I;16`: values clamped to 255), `png16_{{greyalpha,rgb,rgba}}.png`
  (written by hand, zlib stored blocks: Pillow keeps the high byte).

| file | bytes |
|---|---:|
{rows}
""", encoding="utf-8")


def images_only_main() -> None:
    for p in (FIX / DECODE_DIR, FIX / DECODE_GOLDEN):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    (FIX / "goldens").mkdir(parents=True, exist_ok=True)
    log("decode fixtures")
    make_decode_fixtures()
