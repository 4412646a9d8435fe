"""The Python API gives the tokens and text of the transformers goldens, and the CLI's records."""

import pytest

import glimpse
from conftest import FIXTURES, cli_json, comparable, golden, image

BLIP2 = golden("blip2-opt-tiny.json")
LLAVA = golden("llava_llava-tiny.json")
CLIP = golden("clip_tiny.json")


def blip2_cases(prefix):
    return [c for c in BLIP2["cases"] if c["name"].startswith(prefix)]


def test_blip2_captions_match_transformers(blip2):
    cases = blip2_cases("caption_")
    records = blip2.caption([image(c["image"]) for c in cases])
    assert len(records) == len(cases)
    for rec, case in zip(records, cases):
        assert rec["tokens"] == case["generated_ids"], case["name"]
        assert rec["text"] == case["text"], case["name"]
        assert rec["image"] == image(case["image"])
        assert len(rec["logprobs"]) == len(rec["tokens"])
        assert rec["device"] == "cpu"


def test_blip2_answers_match_transformers(blip2):
    for case in blip2_cases("vqa_"):
        question = case["prompt"].removeprefix("Question: ").removesuffix(" Answer:")
        rec = blip2.ask(image(case["image"]), question)
        assert rec["tokens"] == case["generated_ids"], case["name"]
        assert rec["text"] == case["text"], case["name"]


def test_llava_matches_transformers(llava):
    for case in LLAVA["cases"]:
        imgs = [image(i) for i in case["images"]]
        if case["name"] == "caption":
            rec = llava.caption(imgs[0], max_new_tokens=8)
        elif len(imgs) == 1:
            rec = llava.ask(imgs[0], case["text"], max_new_tokens=8)
        else:
            rec = llava.ask_images(imgs, case["text"], max_new_tokens=8)
            assert rec["image"] == imgs
        assert rec["tokens"] == case["generated_ids"], case["name"]
        assert rec["text"] == case["decoded"], case["name"]


def test_clip_classify_matches_transformers(clip):
    imgs = [image(i) for i in CLIP["images"]]
    records = clip.classify(imgs, CLIP["labels"])
    assert len(records) == len(CLIP["probs"])
    for rec, want in zip(records, CLIP["probs"]):
        assert len(rec["probs"]) == len(want)
        assert all(abs(g - w) <= 1e-5 for g, w in zip(rec["probs"], want)), (rec["probs"], want)
    assert all(rec["labels"] == CLIP["labels"] for rec in records)


@pytest.mark.parametrize(
    "options,flags",
    [
        ({}, []),
        ({"max_new_tokens": 5}, ["--max-new-tokens", "5"]),
        ({"num_beams": 3, "num_return_sequences": 2, "length_penalty": 0.5}, ["--num-beams", "3", "--num-return-sequences", "2", "--length-penalty", "0.5"]),
        ({"do_sample": True, "seed": 7, "top_k": 20, "temperature": 0.8}, ["--do-sample", "--seed", "7", "--top-k", "20", "--temperature", "0.8"]),
        ({"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}, ["--repetition-penalty", "1.3", "--no-repeat-ngram-size", "2"]),
        ({"stop_strings": ["e", "th"]}, ["--stop", "e", "--stop", "th"]),
    ],
)
def test_caption_records_equal_the_cli(blip2, options, flags):
    imgs = [image("wide_301x97.png"), image("odd_257x181.png")]
    want = cli_json("caption", "--model", str(FIXTURES / "blip2-opt-tiny"), "--device", "cpu", *flags, *imgs)
    got = blip2.caption(imgs, **options)
    assert [comparable(r) for r in got] == [comparable(r) for r in want]
    assert set(got[0]) == set(want[0]), "the same fields as the CLI"


def test_ask_and_multi_image_records_equal_the_cli(blip2, llava):
    want = cli_json("ask", "--model", str(FIXTURES / "blip2-opt-tiny"), "--device", "cpu", image("rgba_150x120.png"), "what is it?")
    assert comparable(blip2.ask(image("rgba_150x120.png"), "what is it?")) == comparable(want[0])
    imgs = [image("tall_83x311.png"), image("rgba_150x120.png")]
    args = ["ask", "--model", str(FIXTURES / "llava-tiny"), "--device", "cpu", "--max-new-tokens", "6"]
    want = cli_json(*args, "--image", imgs[0], "--image", imgs[1], "compare them")
    assert comparable(llava.ask_images(imgs, "compare them", max_new_tokens=6)) == comparable(want[0])


def test_embed_records_equal_the_cli(clip):
    imgs = [image(i) for i in CLIP["images"]]
    dir_ = str(FIXTURES / "clip-tiny")
    assert clip.embed(imgs) == cli_json("embed", "--model", dir_, "--device", "cpu", *imgs)
    texts = ["a photo of a cat", "A PHOTO of a Dog!"]
    want = cli_json("embed", "--model", dir_, "--device", "cpu", *[a for t in texts for a in ("--text", t)])
    assert clip.embed(texts=texts) == want
    labels = CLIP["labels"]
    want = cli_json("classify", "--model", dir_, "--device", "cpu", *imgs, *[a for l in labels for a in ("--label", l)])
    assert clip.classify(imgs, labels) == want


def test_single_item_gives_a_record_and_a_list_gives_a_list(blip2, clip):
    one = blip2.caption(image("tiny_13x9.png"), max_new_tokens=3)
    assert isinstance(one, dict)
    assert blip2.caption([image("tiny_13x9.png")], max_new_tokens=3)[0]["tokens"] == one["tokens"]
    assert isinstance(clip.embed(texts="a cat"), dict)
    assert len(clip.embed(texts=["a cat"])) == 1


def test_stream_pieces_join_to_the_caption(blip2, llava):
    for model, opts in ((blip2, {}), (llava, {"max_new_tokens": 8})):
        want = model.caption(image("odd_257x181.png"), **opts)
        stream = model.caption(image("odd_257x181.png"), stream=True, **opts)
        assert stream.result is None
        pieces = list(stream)
        assert "".join(pieces) == want["text"]
        assert stream.result["tokens"] == want["tokens"]
    stream = blip2.stream(image("rgba_150x120.png"), "what is it?")
    assert "".join(stream) == blip2.ask(image("rgba_150x120.png"), "what is it?")["text"]


def test_closing_a_stream_stops_generation(blip2):
    # 60 tokens forced (no EOS before): the worker runs only a few pieces ahead of the reader,
    # so closing after the first piece stops it long before the end; result holds the tokens
    # generated so far, a prefix of the full caption.
    opts = {"max_new_tokens": 60, "min_new_tokens": 60}
    full = blip2.caption(image("odd_257x181.png"), **opts)
    assert len(full["tokens"]) == 60
    with blip2.caption(image("odd_257x181.png"), stream=True, **opts) as stream:
        first = next(stream)
    assert first and full["text"].startswith(first)
    part = stream.result["tokens"]
    assert 0 < len(part) < 60 and part == full["tokens"][: len(part)], part
    assert list(stream) == []


def test_options_follow_the_cli_defaults_rule(blip2, llava):
    assert blip2.options()["max_new_tokens"] is None
    assert blip2.options(max_new_tokens=4, num_beams=2)["num_beams"] == 2
    assert llava.options()["eos_token_id"] == [2], "generation_config.json of a chat family"
    assert blip2.options(early_stopping="never")["early_stopping"] == "never"


SMOLVLM = golden("smolvlm_tiny.json")


def test_smolvlm_matches_transformers():
    """SmolVLM splits each image into its tile grid behind the same calls as LLaVA's."""
    model = glimpse.Model(FIXTURES / "smolvlm-tiny", device="cpu")
    for case in SMOLVLM["cases"]:
        imgs = [image(i) for i in case["images"]]
        if len(imgs) == 1:
            rec = model.ask(imgs[0], case["text"], max_new_tokens=8, min_new_tokens=8)
        else:
            rec = model.ask_images(imgs, case["text"], max_new_tokens=8, min_new_tokens=8)
        assert rec["tokens"] == case["generated_ids"], case["name"]
        assert rec["text"] == case["decoded"], case["name"]
        assert all(abs(g - w) <= 1e-4 for g, w in zip(rec["logprobs"], case["logprobs"])), case["name"]


def test_idefics_matches_transformers():
    """IDEFICS takes the processor's own text (prompt=, one <image> per image) over several images."""
    for name in ("idefics-tiny", "idefics-tiny-plain"):
        model = glimpse.Model(FIXTURES / name, device="cpu")
        golden_cases = golden(f"{name.replace('-', '_')}.json")
        for case in golden_cases["cases"]:
            texts = [i if isinstance(i, str) else "<image>" for i in case["items"]]
            imgs = [image(i[1]) for i in case["items"] if not isinstance(i, str)]
            rec = model.ask(imgs, prompt="".join(texts), max_new_tokens=8, min_new_tokens=8)
            assert rec["tokens"] == case["generated_ids"], (name, case["name"])
            assert rec["text"] == case["decoded"], (name, case["name"])
            assert all(abs(g - w) <= 1e-4 for g, w in zip(rec["logprobs"], case["logprobs"])), (name, case["name"])
