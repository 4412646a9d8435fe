"""What the fixture generators share (transformers 5.17.0, Pillow 13, no torchvision).

Importing this module checks the environment once for every generator (Pillow, no torchvision,
transformers 5.17.0), quiets transformers and makes torch deterministic (one CPU thread,
deterministic algorithms). It holds the paths, the corpus and small helpers, and the builders that
more than one family uses:

  opt_bpe_tokenizer, blip2_processor   the byte-level BPE (OPT ids) and BLIP-2 processor
                                       (fixtures_blip2: blip2-opt-tiny*; fixtures_t5: its image processor)
  llama_bpe_tokenizer, reinit_randn_   the LLaMA-style tokenizer and the plain random init
                                       (fixtures_llava; fixtures_instructblip)

Import order, one way only: fixtures_images (torch-free base) <- fixtures_common <- the family
modules (fixtures_blip2, fixtures_llava, ...) <- make_fixtures.py, the driver that runs them all.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

# The generators take no arguments (make_fixtures.py alone takes --images-only, and then does not
# load this module).
if sys.argv[1:]:
    sys.exit("usage: make_fixtures.py [--images-only]")

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Pillow's version check, the paths, the master seed and the log live in the torch-free base.
from fixtures_images import FIX, MASTER_SEED, ROOT, log  # noqa: E402,F401

# Before importing transformers: it picks the image backend at import time.
REQUIRED_TRANSFORMERS = "5.17.0"
if importlib.util.find_spec("torchvision") is not None:
    sys.exit(
        "make_fixtures.py: torchvision is installed. transformers would then use its torchvision image "
        "backend, whose resize differs from Pillow's by ~1 LSB. Uninstall torchvision (pip uninstall "
        "torchvision) and rerun."
    )

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

if transformers.__version__ != REQUIRED_TRANSFORMERS:
    sys.exit(
        f"make_fixtures.py: transformers=={REQUIRED_TRANSFORMERS} is required (found "
        f"{transformers.__version__}). pip install -r scripts/requirements-fixtures.txt"
    )

from transformers import (  # noqa: E402
    BlipImageProcessorPil,
    Blip2Processor,
    GPT2Tokenizer,
    LlamaTokenizer,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402,F401

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

GOLD = FIX / "goldens"


def f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Corpus (the tokenizers of every family are built from it)
# ----------------------------------------------------------------------------------------------
CORPUS = """\
a woman sitting on the beach with a dog
a man riding a bike down a city street
two cats laying on a couch next to a remote control
a plate of food with broccoli, rice and chicken
a red double decker bus driving past a tall building
a group of people standing around a kitchen table
a small boat floating on a calm lake at sunset
a close up of a pizza on a wooden cutting board
a black and white photo of an old train station
a little girl holding an umbrella in the rain
an airplane flying over a snowy mountain range
a bowl of fruit with apples, bananas and oranges
a herd of elephants walking across a dry field
a young boy throwing a frisbee in the park
a laptop computer sitting on top of a desk
a bathroom with a white sink and a large mirror
a giraffe standing next to a tree in a zoo
a stop sign on the corner of a quiet road
a cup of coffee and a croissant on a table
a person skiing down a steep snowy hill
three dogs playing with a ball in the grass
the sky is blue and the sun is shining
there is a horse in the field behind the fence
Question: what is this? Answer: a cat
Question: how many people are in the picture? Answer: two
Question: what color is the car? Answer: red
Question: where is the dog sitting? Answer: on the beach
Question: is it raining? Answer: yes
Question: what is the man holding? Answer: a tennis racket
Question: what time of day is it? Answer: evening
Question: what is on the plate? Answer: a sandwich
Question: why is the street wet? Answer: it rained
What is in the picture? A dog, a cat, and a bird!
Is this a photo or a painting? It's a photo.
"Look at that," she said. 'It's beautiful.'
The price was $12.50 (about 11 euros) in 2019.
Call 555-0123 between 9:00 and 17:30, Monday to Friday.
There are 3 apples, 14 pears and 256 grapes; that's 273 fruits.
The room number is 101, the floor is 7th, and the year is 1999.
Version 2.0.1 was released on 2023-04-15 at 08:45.
Wow!!! Really??? Yes... maybe; no: definitely - absolutely.
email me at someone@example.com or visit https://example.org/page?id=42
use snake_case, camelCase and kebab-case names
tabs\tand  double  spaces   and trailing spaces
a café in Paris serves a crème brûlée
the naïve approach works for the façade
Zürich, München and Köln are cities in Europe
日本 is Japan, 東京 is Tokyo, and 猫 is cat
Москва is Moscow and Ελλάδα is Greece
I love pizza 🍕 and dogs 🐶 and the sun ☀️ 🙂
the quick brown fox jumps over the lazy dog
THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG
a man in a suit and tie standing in front of a building
a woman in a red dress walking down the sidewalk
a baby sleeping in a crib with a teddy bear
a bird perched on a branch of a tree
a vase of flowers on a window sill
a train traveling down the tracks near a forest
a sandwich cut in half on a white plate
people walking on a busy street at night
a motorcycle parked on the side of the road
a kitchen with wooden cabinets and a stove
a living room with a couch, a chair and a television
a surfer riding a wave in the ocean
a baseball player swinging a bat at a ball
a clock tower in the middle of a town square
a teddy bear sitting on a bed
a bunch of bananas hanging from a hook
a sheep grazing in a green pasture
the cat is sleeping on the keyboard
""".splitlines()

MULTILINE_CORPUS = [
    "a dog on the beach\nit is sunny\n",
    "first line\nsecond line\n\nfourth line",
    "Question: what is it?\nAnswer: a cat\n",
]


# ----------------------------------------------------------------------------------------------
# BLIP-2: byte-level BPE with OPT's special ids, and the processor around it
# ----------------------------------------------------------------------------------------------
def opt_bpe_tokenizer(target_vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=target_vocab,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],  # OPT's ids 0, 1, 2, 3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token
        show_progress=False,
    )
    # repeat the corpus a few times with variations so frequent words merge fully
    lines = [s for s in CORPUS if s] + MULTILINE_CORPUS
    tok.train_from_iterator(lines * 3 + [s.lower() for s in lines], trainer)
    for i, s in enumerate(["<s>", "<pad>", "</s>", "<unk>"]):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def blip2_processor(tok: Tokenizer, num_query_tokens: int) -> Blip2Processor:
    # GPT2Tokenizer is the class Salesforce/blip2-opt-* checkpoints name; add_bos_token=True makes
    # transformers install TemplateProcessing "</s> $A" (pair "</s> $A </s> $B"), i.e. OPT's behaviour.
    tokenizer = GPT2Tokenizer(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
        add_prefix_space=False,
    )
    image_processor = BlipImageProcessorPil(
        size={"height": 224, "width": 224},
        resample=Image.Resampling.BICUBIC,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )
    # Blip2Processor adds "<image>" (AddedToken, special, normalized=False) with the next free id
    return Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens)


# ----------------------------------------------------------------------------------------------
# LLaMA: a SentencePiece-BPE-like tokenizer (LLaVA, and InstructBLIP's Vicuna variant of it), and
# the plain random init those two families use
# ----------------------------------------------------------------------------------------------
def llama_bpe_tokenizer(workdir: Path) -> LlamaTokenizer:
    """A SentencePiece-BPE-like tokenizer: ▁ word prefix, byte fallback for characters outside a
    small alphabet (accents, CJK, emoji), <unk>/<s>/</s> = 0/1/2, then <0x00>..<0xFF>."""
    # Trained here by a few lines of deterministic BPE (the tokenizers trainer breaks ties by hash
    # order, so its merges change from run to run).
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    lines = [s for s in CORPUS if s] + MULTILINE_CORPUS + ["USER: ASSISTANT: Describe the image"] * 3
    words = Counter("▁" + w for line in lines for w in line.split())
    chars = Counter(c for w, n in words.items() for c in w for _ in range(n))
    alphabet = sorted(sorted(chars, key=lambda c: (-chars[c], c))[:60])
    seqs = {w: list(w) for w in words if all(c in alphabet for c in w)}
    merges = []
    while len(merges) < 40:
        pairs = Counter()
        for w, sym in seqs.items():
            for a, b in zip(sym, sym[1:]):
                pairs[(a, b)] += words[w]
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append((a, b))
        for w, sym in seqs.items():
            i, out = 0, []
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            seqs[w] = out
    pieces = specials + alphabet + [a + b for a, b in merges]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    spec = json.loads(tok.to_str())
    spec["model"].update(byte_fallback=True, fuse_unk=True, unk_token="<unk>")
    # The classic hub file: legacy normalizer, no pre-tokenizer (5.17 discards both and rebuilds).
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    spec["pre_tokenizer"] = None
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    n = len(vocab)
    spec["added_tokens"] = [
        {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True} for i, c in [(0, "<unk>"), (1, "<s>"), (2, "</s>"), (n, "<image>"), (n + 1, "<pad>")]]
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                       {"Sequence": {"id": "A", "type_id": 0}},
                                       {"SpecialToken": {"id": "<s>", "type_id": 1}},
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    added = {str(i): {k: v for k, v in t.items() if k != "id"} for t in spec["added_tokens"] for i in [t["id"]]}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (workdir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "padding_side": "left", "clean_up_tokenization_spaces": False, "added_tokens_decoder": added,
        "model_max_length": 4096}, indent=1, ensure_ascii=False), encoding="utf-8")
    t = LlamaTokenizer.from_pretrained(workdir)
    assert [t.convert_tokens_to_ids(s) for s in ("<unk>", "<s>", "</s>", "<image>", "<pad>")] == [0, 1, 2, n, n + 1]
    assert t.encode("é", add_special_tokens=False) != [0], "byte fallback expected"
    assert t.encode("x")[0] == 1, "BOS expected"
    return t


def reinit_randn_(model, seed: int) -> None:
    """Larger-than-default random weights so every path moves the logits (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias") or "norm" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in ** 0.5))
