"""Tiny InstructBLIP Flan-T5 fixtures for glimpse (transformers 5.17.0, Pillow 13).

    python scripts/fixtures_instructblip_t5.py

Writes only tests/fixtures/instructblip-flan-t5-tiny/ and tests/fixtures/goldens/instructblip-flan-t5_*:

  instructblip-flan-t5-tiny/  InstructBlipForConditionalGeneration with a T5 text config, as 5.17
                      save_pretrained writes it (fp16), plus an untied `language_model.lm_head.weight`
                      written afterwards (hub Flan checkpoints store it apart from `shared`). The image
                      side is the Vicuna fixture's (BLIP vision 2 layers, patch 6, 24 px; instruction-aware
                      Q-Former 3 layers, 4 queries); the T5 is the BLIP-2 Flan-T5 fixture's shape
                      (gated FFN with dense_act_fn "gelu" and bos_token_id 1 as the InstructBLIP
                      conversion script sets them, 3 heads x 16, 8 buckets / max distance 20, untied
                      head). Tokenizers: the BLIP-2 Flan-T5 fixture's Unigram T5 tokenizer (`<image>`
                      added by the processor) and the Vicuna fixture's BERT WordPiece Q-Former tokenizer.
  goldens/instructblip-flan-t5_tiny.json + .safetensors: per case the prompt, T5 encoder input ids
                      (the image placeholders, the prompt, `</s>`; no BOS), Q-Former ids, pixels, vision
                      output, Q-Former query rows, projector output, T5 encoder output, the first decoder
                      step's logits, greedy tokens / log-probs / text (8 new tokens after the decoder start
                      token); `batch`: two images with one question (no padding) as one batch;
                      `padded_batch`: two questions of different lengths (padding=True: T5 ids and
                      Q-Former ids right-padded), with the Q-Former query rows of the batch.

Goldens run in fp32 eager on the fp16-rounded weights. Deterministic: fixed seeds, one CPU thread.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_common as fc  # noqa: E402  (version checks, paths, helpers)
import fixtures_instructblip as fib  # noqa: E402  (image side, Q-Former tokenizer, processor)
import fixtures_t5 as ft5  # noqa: E402  (T5 tokenizer, init, untied head)

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.numpy import save_file as np_save_file  # noqa: E402
from safetensors.torch import load_file as pt_load_file  # noqa: E402
from safetensors.torch import save_file as pt_save_file  # noqa: E402
from transformers import (  # noqa: E402
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    T5Config,
)

FIX = fc.FIX
GOLD = FIX / "goldens"
NAME = "instructblip-flan-t5-tiny"
GOLDEN = "instructblip-flan-t5_tiny"
MAX_NEW_TOKENS = 8
EOS = 1
# The head row scaled up (fixtures_t5.lm_head_weight): a plain word, so that answers run on.
BOOSTED_ROW = 77

CASES = [
    ("caption", "rgba_150x120.png", ""),
    ("question", "wide_301x97.png", "What is unusual about this image?"),
    ("detail", "tall_83x311.png", "Describe the picture in detail, please."),
]
BATCH = (["rgba_150x120.png", "odd_257x181.png"], "What is shown here?")
# Questions of different lengths: the T5 tokenizer pads on the right (no padding_side written),
# and so does the Q-Former tokenizer (the processor passes the LLM tokenizer's padding_side only
# when its config writes one).
PADDED = (["wide_301x97.png", "tall_83x311.png"], ["What is shown here?", "Is the picture bright or dark at the top?"])


def build_config(vocab: int, qvocab: int, image_id: int) -> InstructBlipConfig:
    base = fib.build_config(vocab=64, qvocab=qvocab, image_id=0, pad_id=0)
    text = T5Config(vocab_size=vocab, tie_word_embeddings=False, decoder_start_token_id=0, bos_token_id=1,
                    eos_token_id=EOS, pad_token_id=0, **ft5.TEXT)
    return InstructBlipConfig(vision_config=base.vision_config.to_dict(), qformer_config=base.qformer_config.to_dict(),
                              text_config=text.to_dict(), num_query_tokens=fib.NUM_QUERY, image_token_index=image_id)


def generate(model, inputs) -> list:
    """Per row: new tokens (after the decoder start, cut after `</s>`), log-probs, min top-2 margin."""
    with torch.no_grad():
        gen = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS,
                             output_logits=True, return_dict_in_generate=True)
    assert (gen.sequences[:, 0] == 0).all(), "T5 output starts with the decoder start token"
    steps = torch.stack(gen.logits, 1)
    rows = []
    for b in range(gen.sequences.shape[0]):
        toks = gen.sequences[b, 1:].tolist()
        if EOS in toks:
            toks = toks[: toks.index(EOS) + 1]
        lps = [torch.log_softmax(steps[b, i].double(), -1)[t].item() for i, t in enumerate(toks)]
        top2 = steps[b, : len(toks)].topk(2, -1).values
        rows.append((toks, lps, (top2[:, 0] - top2[:, 1]).min().item()))
    return rows


def main() -> None:
    torch.manual_seed(fib.SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out = FIX / NAME
    shutil.rmtree(out, ignore_errors=True)
    for p in GOLD.glob(f"{GOLDEN}.*"):
        p.unlink()
    work = FIX / f"{NAME}-work"
    qtok = fib.bert_tokenizer(work / "qformer")
    ip = fib.make_processor(fib.llama_tokenizer(work / "llm"), qtok).image_processor
    proc = InstructBlipProcessor(image_processor=ip, tokenizer=ft5.build_tokenizer(), qformer_tokenizer=qtok,
                                 num_query_tokens=fib.NUM_QUERY)
    tok = proc.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    vocab = (len(tok) + 7) // 8 * 8
    model = InstructBlipForConditionalGeneration(build_config(vocab, len(qtok), image_id)).eval()
    ft5.reinit_(model)
    model.to(torch.float16).save_pretrained(out)
    proc.save_pretrained(out)
    st = out / "model.safetensors"
    tensors = pt_load_file(str(st))
    shape = tuple(tensors["language_model.shared.weight"].shape)
    tensors["language_model.lm_head.weight"] = ft5.lm_head_weight(shape, BOOSTED_ROW)
    pt_save_file(tensors, str(st), metadata={"format": "pt"})

    proc = InstructBlipProcessor.from_pretrained(out)
    assert (out / "qformer_tokenizer" / "tokenizer.json").exists()
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == image_id
    model = InstructBlipForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
    lm = model.language_model
    assert not torch.equal(lm.lm_head.weight, lm.shared.weight), "the head must stay untied"
    assert model.config.text_config.dense_act_fn == "gelu"

    img_dir = FIX / "images"
    arrays, cases = {}, []
    for cname, image, text in CASES:
        inputs = proc(images=Image.open(img_dir / image), text=text, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        assert ids[: fib.NUM_QUERY] == [image_id] * fib.NUM_QUERY and ids[-1] == EOS, ids
        s = fib.stages(model, inputs)
        with torch.no_grad():
            first = model(**inputs, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long))
            embeds = model.get_input_embeddings()(inputs["input_ids"])
            embeds[:, : fib.NUM_QUERY] = s["image_features"]
            encoder = lm.encoder(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).last_hidden_state
        assert torch.allclose(encoder, first.language_model_outputs.encoder_last_hidden_state), "encoder replica"
        (new, lps, margin), = generate(model, inputs)
        arrays[f"{cname}.pixels"] = fc.f32(inputs["pixel_values"])
        for k, v in s.items():
            arrays[f"{cname}.{k}"] = fc.f32(v[0])
        arrays[f"{cname}.encoder"] = fc.f32(encoder[0])
        arrays[f"{cname}.first_logits"] = fc.f32(first.logits[0])
        cases.append({"name": cname, "image": image, "text": text, "input_ids": ids,
                      "qformer_input_ids": inputs["qformer_input_ids"][0].tolist(),
                      "generated_ids": new, "logprobs": lps,
                      "decoded": proc.decode(new, skip_special_tokens=True).strip(), "min_top2_margin": margin})
        fc.log(f"  {cname}: {len(ids)} ids, generated {new}, margin {margin:.4f}")

    images, question = BATCH
    inputs = proc(images=[Image.open(img_dir / i) for i in images], text=[question] * len(images),
                  return_tensors="pt")
    rows = generate(model, inputs)
    for b, image in enumerate(images):
        alone = proc(images=Image.open(img_dir / image), text=question, return_tensors="pt")
        assert generate(model, alone)[0][0] == rows[b][0], f"batch row {b} differs from its single run"
    batch = {"images": images, "text": question, "generated_ids": [r[0] for r in rows],
             "logprobs": [r[1] for r in rows], "min_top2_margin": min(r[2] for r in rows)}
    fc.log(f"  batch: generated {batch['generated_ids']}")

    images, texts = PADDED
    inputs = proc(images=[Image.open(img_dir / i) for i in images], text=texts, padding=True, return_tensors="pt")
    assert (inputs["attention_mask"][:, -1] == torch.tensor([0, 1])).all(), "T5 pads on the right"
    assert (inputs["qformer_attention_mask"][:, -1] == torch.tensor([0, 1])).all(), "so does the Q-Former"
    rows = generate(model, inputs)
    for b, (image, text) in enumerate(zip(images, texts)):
        alone = proc(images=Image.open(img_dir / image), text=text, return_tensors="pt")
        assert generate(model, alone)[0][0] == rows[b][0], f"padded batch row {b} differs from its single run"
    padded = {"images": images, "texts": texts, "input_ids": inputs["input_ids"].tolist(),
              "attention_mask": inputs["attention_mask"].tolist(),
              "qformer_input_ids": inputs["qformer_input_ids"].tolist(),
              "qformer_attention_mask": inputs["qformer_attention_mask"].tolist(),
              "generated_ids": [r[0] for r in rows], "logprobs": [r[1] for r in rows],
              "min_top2_margin": min(r[2] for r in rows)}
    arrays["padded.qformer"] = fc.f32(fib.stages(model, inputs)["qformer"])
    fc.log(f"  padded batch: generated {padded['generated_ids']}")

    np_save_file(arrays, str(GOLD / f"{GOLDEN}.safetensors"))
    fc.write_json(GOLD / f"{GOLDEN}.json", {
        "model": NAME,
        "reference": "InstructBlipForConditionalGeneration.from_pretrained(dir, dtype=float32, attn_implementation="
                     "'eager'), CPU; InstructBlipProcessor(images=..., text=...); generate(do_sample=False, "
                     f"num_beams=1, max_new_tokens={MAX_NEW_TOKENS})",
        "num_query_tokens": fib.NUM_QUERY, "image_token_index": image_id, "cases": cases, "batch": batch, "padded_batch": padded,
    })
    shutil.rmtree(work)
    (out / "README.md").write_text(__doc__, encoding="utf-8")
    total = sum(p.stat().st_size for p in list(out.rglob("*")) + list(GOLD.glob(f"{GOLDEN}.*")) if p.is_file())
    fc.log(f"instructblip flan-t5 fixtures: {total / 1e3:.0f} KB")


if __name__ == "__main__":
    main()
