"""Paths, bytes, PIL images and numpy arrays are the same image; bad inputs raise GlimpseError
subclasses with the CLI's messages."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import glimpse
from conftest import FIXTURES, cli_json, comparable, image

# RGB, RGBA, palette, grey, grey+alpha PNGs and a JPEG: every conversion path to RGB.
NAMES = ["odd_257x181.png", "rgba_150x120.png", "palette_100x80.png", "grey_67x45.png", "greyalpha_40x50.png", "photo_q90.jpg"]


def forms(name):
    path = image(name)
    pil = Image.open(path)
    return {
        "path": path,
        "pathlib": Path(path),
        "bytes": Path(path).read_bytes(),
        "pil": pil,
        "numpy": np.asarray(pil.convert("RGB")),
    }


@pytest.mark.parametrize("name", NAMES)
def test_every_form_of_an_image_captions_the_same(blip2, name):
    results = {kind: blip2.caption(x, max_new_tokens=6) for kind, x in forms(name).items()}
    want = results["path"]
    for kind, rec in results.items():
        assert (rec["tokens"], rec["logprobs"], rec["text"]) == (want["tokens"], want["logprobs"], want["text"]), kind


def test_every_form_embeds_the_same(clip):
    for name in NAMES[:3]:
        embeds = [rec["embedding"] for rec in clip.embed(list(forms(name).values()))]
        assert all(e == embeds[0] for e in embeds), name


def test_a_list_mixes_forms_and_names_label_records(blip2):
    f = forms("tall_83x311.png")
    recs = blip2.caption([f["bytes"], f["numpy"], f["path"]], names=["a", "b", "c"], max_new_tokens=3)
    assert [r["image"] for r in recs] == ["a", "b", "c"]
    assert recs[0]["tokens"] == recs[1]["tokens"] == recs[2]["tokens"]
    assert blip2.caption(f["bytes"], max_new_tokens=3)["image"] == "<bytes #0>"
    assert blip2.caption(f["numpy"], max_new_tokens=3)["image"] == "<ndarray #0>"


def cli_error(*args):
    rec = cli_json("caption", "--model", str(FIXTURES / "blip2-opt-tiny"), "--device", "cpu", *args)[0]
    return rec["error"]


def test_a_missing_file_raises_with_the_cli_message(blip2, tmp_path):
    missing = str(tmp_path / "nope.png")
    with pytest.raises(glimpse.MissingFileError) as e:
        blip2.caption(missing)
    assert isinstance(e.value, glimpse.GlimpseError) and isinstance(e.value, FileNotFoundError)
    assert str(e.value) == cli_error(missing)


def test_corrupt_bytes_raise_with_the_cli_message(blip2, tmp_path):
    junk = b"this is not an image"
    (tmp_path / "junk.png").write_bytes(junk)
    with pytest.raises(glimpse.ImageError) as e:
        blip2.caption(junk, names="junk")
    assert isinstance(e.value, ValueError)
    want = cli_error(str(tmp_path / "junk.png")).replace(str(tmp_path / "junk.png"), "junk")
    assert str(e.value) == want
    truncated = Path(image("photo_q90.jpg")).read_bytes()[:200]
    with pytest.raises(glimpse.ImageError, match=r"image <bytes #0>: "):
        blip2.caption(truncated)


@pytest.mark.parametrize(
    "array,what",
    [
        (np.zeros((20, 30), np.uint8), r"shape \(20, 30\) and dtype uint8"),
        (np.zeros((20, 30, 4), np.uint8), r"shape \(20, 30, 4\)"),
        (np.zeros((20, 30, 3), np.float32), r"dtype float32"),
    ],
)
def test_wrong_arrays_raise_image_errors(blip2, array, what):
    with pytest.raises(glimpse.ImageError, match=what):
        blip2.caption(array)


def test_empty_arrays_and_wrong_types_raise(blip2):
    with pytest.raises(glimpse.ImageError, match=r"the pixels are 0x5"):
        blip2.caption(np.zeros((5, 0, 3), np.uint8))
    with pytest.raises(glimpse.InvalidInputError, match=r"a int is not an image"):
        blip2.caption(42)


def test_errors_record_keeps_going_as_the_cli(blip2, tmp_path):
    missing = str(tmp_path / "nope.png")
    imgs = [image("tiny_13x9.png"), missing, image("wide_301x97.png")]
    got = blip2.caption(imgs, errors="record", max_new_tokens=4)
    want = cli_json("caption", "--model", str(FIXTURES / "blip2-opt-tiny"), "--device", "cpu", "--max-new-tokens", "4", *imgs)
    assert [comparable(r) for r in got] == [comparable(r) for r in want]
    assert got[1] == {"image": missing, "error": want[1]["error"]}


def test_bad_options_raise_with_the_cli_message(blip2):
    with pytest.raises(glimpse.InvalidInputError, match=r"max_new_tokens is 0: it must be at least 1"):
        blip2.caption(image("tiny_13x9.png"), max_new_tokens=0)
    with pytest.raises(glimpse.InvalidInputError, match=r"unknown generation option `beams`"):
        blip2.caption(image("tiny_13x9.png"), beams=2)
    with pytest.raises(glimpse.InvalidInputError, match=r"generation option top_k='many': expected an integer"):
        blip2.caption(image("tiny_13x9.png"), top_k="many")
    with pytest.raises(glimpse.InvalidInputError, match=r"beam search only knows its best hypothesis"):
        blip2.caption(image("tiny_13x9.png"), stream=True, num_beams=2)
    with pytest.raises(glimpse.InvalidInputError, match=r"generation option stop_strings=3"):
        blip2.caption(image("tiny_13x9.png"), stop_strings=3)


def test_wrong_method_names_the_family_and_the_methods_to_use(blip2, clip):
    with pytest.raises(glimpse.UnsupportedError, match=r"CLIPModel embeds images and texts.*caption\(\).*use embed\(\) or classify\(\)"):
        clip.caption(image("tiny_13x9.png"))
    with pytest.raises(glimpse.UnsupportedError, match=r"Blip2ForConditionalGeneration generates text.*use caption\(\) or ask\(\)"):
        blip2.embed(image("tiny_13x9.png"))
    with pytest.raises(glimpse.InvalidInputError, match=r"one image at a time; got 2 images"):
        blip2.ask_images([image("tiny_13x9.png")] * 2, "what?")


def test_a_missing_model_folder_raises_with_the_cli_message(tmp_path):
    missing = tmp_path / "no-model"
    with pytest.raises(glimpse.GlimpseError) as e:
        glimpse.Model(missing, device="cpu")
    assert "no such folder, and not a hub id" in str(e.value)
    with pytest.raises(glimpse.InvalidInputError, match=r"device"):
        glimpse.Model(FIXTURES / "blip2-opt-tiny", device="tpu")
