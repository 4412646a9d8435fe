#!/usr/bin/env python3
"""Generate glimpse's test fixtures (tests/fixtures/) with Hugging Face transformers 5.17.0.

    pip install -r scripts/requirements-fixtures.txt   # no torchvision!
    python scripts/make_fixtures.py
    python scripts/make_fixtures.py --images-only      # decode fixtures only: Pillow, numpy, safetensors

The driver: it runs every generator below, in this order (later ones read what earlier ones wrote:
the images, the blip2-opt-tiny checkpoint, goldens/pixels_blip.safetensors), each wiping and
rewriting only its own files. Every generator but fixtures_blip2 also runs alone
(`python scripts/fixtures_<name>.py`), on the files the earlier ones left.

  fixtures_blip2.build      images/ (fixtures_images), blip2-opt-tiny/, blip2-opt-tiny-proj/,
                            clip-preprocessor/, pixel, decode and tokenizer goldens
  fixtures_processors       goldens/processors.json
  fixtures_blip2.goldens    goldens/blip2-opt-tiny*.{json,safetensors}
  fixtures_beam             goldens/beam_cases.json
  fixtures_clip             clip-tiny*/, goldens/clip_tiny.*
  fixtures_blip2.readme     tests/fixtures/README.md (lists the files written so far)
  fixtures_llava            llava-tiny*/, goldens/llava_*
  fixtures_padbatch         goldens/padbatch_blip2-opt-tiny.json
  fixtures_instructblip     instructblip-tiny/, goldens/instructblip_*
  fixtures_genrest          goldens/genrest_cases.json
  fixtures_t5               blip2-flan-t5-tiny/, goldens/t5_*
  fixtures_instructblip_t5  instructblip-flan-t5-tiny/, goldens/instructblip-flan-t5_*
  fixtures_t5_tokenizer     t5-tokenizer-legacy/, goldens/t5-tokenizer-legacy_*
  fixtures_idefics3         idefics3-processor/, goldens/idefics3_* (SmolVLM's processor)
  fixtures_smolvlm          smolvlm-tiny/, goldens/smolvlm_* (the model; fixtures_idefics3's processor)
  fixtures_idefics          idefics-tiny*/, goldens/idefics_tiny* (IDEFICS: resampler on and off)

Imports run one way: fixtures_images (torch-free) <- fixtures_common (environment checks, corpus,
helpers, builders shared by families) <- the family modules <- this driver. A family module imports
fixtures_common, and another family module only where its fixture is built from that one's parts
(fixtures_instructblip_t5: InstructBLIP's image side, the T5 of fixtures_t5; fixtures_smolvlm:
fixtures_idefics3's processor and special tokens).

Everything is deterministic (fixed seeds, one CPU thread, deterministic torch algorithms):
running the script twice gives byte-identical files.
"""

from __future__ import annotations

import sys
from pathlib import Path

USAGE = "usage: make_fixtures.py [--images-only]"


def images_only() -> None:
    """images/decode/ and goldens/decode_rgb.safetensors: Pillow, numpy and safetensors are enough,
    torch and transformers are not imported."""
    import fixtures_images

    fixtures_images.images_only_main()


def main() -> None:
    import fixtures_common as fc  # environment checks first: Pillow, no torchvision, transformers 5.17.0
    import fixtures_beam
    import fixtures_blip2
    import fixtures_clip
    import fixtures_genrest
    import fixtures_idefics3
    import fixtures_instructblip
    import fixtures_instructblip_t5
    import fixtures_llava
    import fixtures_padbatch
    import fixtures_processors
    import fixtures_idefics
    import fixtures_smolvlm
    import fixtures_t5
    import fixtures_t5_tokenizer

    run = fixtures_blip2.build()
    fixtures_processors.main()
    fixtures_blip2.goldens(run)
    fixtures_beam.main()
    fixtures_clip.main()
    fixtures_blip2.readme(run)
    fixtures_llava.main()
    fixtures_padbatch.main()
    fixtures_instructblip.main()
    fixtures_genrest.main()
    fixtures_t5.main()
    fixtures_instructblip_t5.main()
    fixtures_t5_tokenizer.main()
    fixtures_idefics3.main()
    fixtures_smolvlm.main()
    fixtures_idefics.main()
    total = sum(p.stat().st_size for p in fc.FIX.rglob("*") if p.is_file())
    fc.log(f"done: tests/fixtures is {total / 1e6:.2f} MB")


if __name__ == "__main__":
    if sys.argv[1:] not in ([], ["--images-only"]):
        sys.exit(USAGE)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if sys.argv[1:] == ["--images-only"]:
        images_only()
    else:
        main()
