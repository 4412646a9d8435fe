"""A legacy-layout Flan-T5 tokenizer folder and transformers 5.17's encodings of it.

    python scripts/fixtures_t5_tokenizer.py      (also needs sentencepiece==0.2.3; no protobuf)

Writes only tests/fixtures/t5-tokenizer-legacy/ and tests/fixtures/goldens/t5-tokenizer-legacy_*:

  t5-tokenizer-legacy/  tokenizer.json in the layout of the converters that wrote the hub Flan-T5 /
                    BLIP-2 / InstructBLIP Flan-T5 files (transformers 4.2x, tokenizers 0.13):
                    normalizer Sequence[Precompiled(charsmap), Replace(" {2,}" -> " ")], pre-tokenizer
                    and decoder a lone Metaspace with `add_prefix_space: true`, `$A </s>` template,
                    Unigram without `byte_fallback`; added tokens <pad> </s> <unk>, 100 extra ids and
                    `<image>` (as the BLIP-2 processor adds it). The vocabulary and the charsmap come
                    from a tiny SentencePiece Unigram model trained here. Its normalization rules are
                    the real `nmt_nfkc` map restricted to a few hundred code points (the full map is
                    240 KB): controls, Latin-1, general punctuation / spaces, full-width and half-width
                    forms, ligatures, circled numbers, Roman numerals and letter + combining accent pairs.
                    tokenizer_config.json / special_tokens_map.json as the hub Flan-T5 files write them
                    (`tokenizer_class` "T5Tokenizer", `extra_ids` 100, no `added_tokens_decoder`).
  goldens/t5-tokenizer-legacy_tokens.json: per tricky text (newlines, tabs, space runs, leading and
                    trailing spaces, accents, full-width, sentinels, `<image>`, unknown characters) the
                    ids of AutoTokenizer (5.17's T5Tokenizer, which rebuilds the pipeline) with and
                    without special tokens, `decode` with and without skip_special_tokens, and the ids
                    the file's own pipeline gives (`legacy_ids`, what glimpse used to produce);
                    `added_tokens_decoder_variant`: a tokenizer_config.json that lists the added tokens
                    (`<image>` normalized and not special) and two texts encoded with it.

Deterministic: the SentencePiece trainer runs on a fixed corpus with one thread.
"""

from __future__ import annotations

import base64
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_common as fc  # noqa: E402  (version checks, paths, helpers)

import sentencepiece as spm  # noqa: E402
from tokenizers import Tokenizer, normalizers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

FIX = fc.FIX
GOLD = FIX / "goldens"
NAME = "t5-tokenizer-legacy"
EXTRA_IDS = 100
SPACE = "\u2581"

CORPUS = [
    "a photo of a cat sitting on the table next to a cup of coffee",
    "the dog is running in the park with a red ball",
    "Question: what is in the picture? Answer: a bird on a branch",
    "two people are walking down the street in the rain",
    "a man riding a bicycle past an old building, at night.",
    "the café serves crème brûlée and a naïve résumé of the menu",
    "señor Müller ate façade pâté in São Paulo",
    "Describe the image in detail, please!",
    "numbers 1 2 3 10 42 100 and (brackets) or [lists]",
    "fine fish fly off the flat roof: it's 5 o'clock",
]

TEXTS = [
    "a photo of a cat",
    "Question: what is in the picture? Answer:",
    "line one\nline two",
    "tab\tseparated\tvalues",
    "many    spaces   in  between",
    "  leading and trailing  ",
    " one leading space",
    "one trailing space ",
    "\n\nnewlines around\n",
    "mixed\r\nline endings\r",
    "café naïve résumé",
    "cafe\u0301 decomposed acute",
    "ＦＵＬＬ　ｗｉｄｔｈ　ｔｅｘｔ１２３！",
    "non\u00a0breaking\u2009thin\u3000ideographic",
    "\ufb01ne \u2460 \u216b ligatures",
    "zero\u200bwidth and bell\u0007char",
    "<extra_id_0> fills <extra_id_1>",
    "x<extra_id_0>y  <extra_id_99>",
    "<image><image> what is this?",
    " <image> trailing image ",
    "unknown: {} ~ \U0001f600 \u4e2d\u6587",
    "   ",
    "",
]


def nmt_rules() -> str:
    """`nmt_nfkc` restricted to the code points the texts exercise (and their neighbours), as a
    SentencePiece normalization rule TSV: each source that the real map changes, with its result."""
    real = normalizers.Precompiled(train(rule_name="nmt_nfkc")[1])
    singles = [chr(c) for r in [(0x0, 0x20), (0x7F, 0x100), (0x2000, 0x2070), (0x2150, 0x2190),
                                (0x2460, 0x24A0), (0x3000, 0x3001), (0xFB00, 0xFB07), (0xFF01, 0xFFA0)]
               for c in range(*r)]
    pairs = [b + chr(m) for b in "aeiouncAEIOUNC" for m in range(0x300, 0x309)] + ["c\u0327", "C\u0327"]
    lines = []
    for src in singles + pairs:
        out = real.normalize_str(src)
        if out != src:
            hexes = lambda s: " ".join(f"{ord(c):X}" for c in s)  # noqa: E731
            lines.append(f"{hexes(src)}\t{hexes(out)}")
    return "\n".join(lines) + "\n"


def train(rule_name: str | None = None, rule_tsv: str | None = None) -> tuple[spm.SentencePieceProcessor, bytes]:
    """A SentencePiece Unigram model laid out as T5's (pad 0, eos 1, unk 2, no BOS) and its charsmap."""
    model = __import__("io").BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        kw = {"normalization_rule_name": rule_name} if rule_name else {}
        if rule_tsv is not None:
            path = Path(tmp) / "rules.tsv"
            path.write_text(rule_tsv, encoding="utf-8")
            kw = {"normalization_rule_tsv": str(path)}
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(CORPUS * 4), model_writer=model, model_type="unigram", vocab_size=160,
            character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1,
            hard_vocab_limit=False, minloglevel=2, **kw)
    proto = model.getvalue()
    return spm.SentencePieceProcessor(model_proto=proto), charsmap(proto)


def charsmap(proto: bytes) -> bytes:
    """ModelProto.normalizer_spec (field 3).precompiled_charsmap (field 2), read without protobuf."""
    def fields(buf: bytes):
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            num, kind = key >> 3, key & 7
            if kind == 0:
                _, i = varint(buf, i)
            elif kind == 1:
                i += 8
            elif kind == 5:
                i += 4
            elif kind == 2:
                n, i = varint(buf, i)
                yield num, buf[i:i + n]
                i += n
            else:
                raise ValueError(f"wire type {kind} in the SentencePiece model")

    def varint(buf: bytes, i: int) -> tuple[int, int]:
        shift = value = 0
        while True:
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value, i

    spec = next(v for n, v in fields(proto) if n == 3)
    return next(v for n, v in fields(spec) if n == 2)


def legacy_tokenizer_json(sp: spm.SentencePieceProcessor, cmap: bytes) -> dict:
    """tokenizer.json as transformers 4.2x's T5 converter wrote it with tokenizers 0.13."""
    vocab = [[sp.id_to_piece(i), 0.0 if sp.is_control(i) or sp.is_unknown(i) else sp.get_score(i)]
             for i in range(sp.get_piece_size())]
    vocab += [[f"<extra_id_{i}>", 0.0] for i in range(EXTRA_IDS - 1, -1, -1)]
    ids = {p: i for i, (p, _) in enumerate(vocab)}
    added = [(t, ids[t]) for t in ["<pad>", "</s>", "<unk>"]]
    added += [(f"<extra_id_{i}>", ids[f"<extra_id_{i}>"]) for i in range(EXTRA_IDS - 1, -1, -1)]
    added.append(("<image>", len(vocab)))
    metaspace = {"type": "Metaspace", "replacement": SPACE, "add_prefix_space": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in added],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(cmap).decode()},
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]},
        "pre_tokenizer": metaspace,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}},
        "decoder": metaspace,
        "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab},
    }


def encodings(tok, texts: list[str], legacy: Tokenizer | None) -> list[dict]:
    """Per text: ids with and without special tokens, both decodes, and the file pipeline's ids."""
    cases = []
    for text in texts:
        ids = tok(text).input_ids
        case = {
            "text": text,
            "ids": ids,
            "plain_ids": tok(text, add_special_tokens=False).input_ids,
            "decoded": tok.decode(ids, skip_special_tokens=True),
            "raw": tok.decode(ids, skip_special_tokens=False),
        }
        if legacy is not None:
            case["legacy_ids"] = legacy.encode(text).ids
        cases.append(case)
    return cases


def main() -> None:
    sp, cmap = train(rule_tsv=nmt_rules())
    again = train(rule_tsv=nmt_rules())
    pieces = lambda m: [(m.id_to_piece(i), m.get_score(i)) for i in range(m.get_piece_size())]  # noqa: E731
    assert again[1] == cmap and pieces(again[0]) == pieces(sp), "the SentencePiece trainer is not deterministic"

    out = FIX / NAME
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tok_json = legacy_tokenizer_json(sp, cmap)
    (out / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False), encoding="utf-8")
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    fc.write_json(out / "tokenizer_config.json", {
        "additional_special_tokens": extra, "eos_token": "</s>", "extra_ids": EXTRA_IDS, "model_max_length": 512,
        "pad_token": "<pad>", "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>"})
    fc.write_json(out / "special_tokens_map.json", {
        "additional_special_tokens": extra, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
    (out / "README.md").write_text(__doc__, encoding="utf-8")

    tok = AutoTokenizer.from_pretrained(out)
    assert type(tok).__name__ == "T5Tokenizer", type(tok)
    backend = json.loads(tok.backend_tokenizer.to_str())
    assert backend["normalizer"]["type"] == "Precompiled", backend["normalizer"]
    legacy = Tokenizer.from_file(str(out / "tokenizer.json"))
    cases = encodings(tok, TEXTS, legacy)
    differ = sum(c["ids"] != c["legacy_ids"] for c in cases)
    assert differ >= 3, f"only {differ} texts tell the rebuilt pipeline from the file's"

    # A later config (save_pretrained since 4.34) lists the added tokens itself; the class then
    # takes them, flags included, from there rather than from tokenizer.json: here `<image>` as
    # `add_tokens("<image>")` stores it (normalized, not special), so decoding keeps it.
    variant = dict(json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8")))
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    variant["added_tokens_decoder"] = {str(t["id"]): {"content": t["content"], **flags} for t in tok_json["added_tokens"]}
    variant["added_tokens_decoder"][str(tok.convert_tokens_to_ids("<image>"))].update(normalized=True, special=False)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(out / "tokenizer.json", tmp)
        fc.write_json(Path(tmp) / "tokenizer_config.json", variant)
        vtok = AutoTokenizer.from_pretrained(tmp)
        vcases = encodings(vtok, ["<image> a photo of <image> two", " <image> x <extra_id_0> "], None)
    assert "<image>" in vcases[0]["decoded"], vcases[0]

    fc.write_json(GOLD / f"{NAME}_tokens.json", {
        "transformers": __import__("transformers").__version__,
        "vocab_size": len(tok),
        "texts_differing_from_file_pipeline": differ,
        "cases": cases,
        "added_tokens_decoder_variant": {"tokenizer_config": variant, "cases": vcases},
    })
    size = sum(p.stat().st_size for p in out.iterdir())
    fc.log(f"{NAME}: {len(tok)} tokens, {len(cmap)} B charsmap, folder {size / 1e3:.1f} KB, "
           f"{differ}/{len(TEXTS)} texts differ from the file's own pipeline")


if __name__ == "__main__":
    main()
