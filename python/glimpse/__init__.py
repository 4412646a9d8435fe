"""glimpse: vision-language models (BLIP-2, LLaVA, CLIP) from Hugging Face checkpoints, from Python.

    >>> import glimpse
    >>> model = glimpse.Model("Salesforce/blip2-opt-2.7b")          # a folder or a hub id
    >>> model.caption("photo.jpg")["text"]
    >>> model.ask(["a.jpg", "b.png"], "what is shown?", max_new_tokens=10)
    >>> for piece in model.caption("photo.jpg", stream=True):
    ...     print(piece, end="", flush=True)

Images are paths, encoded bytes (PNG, JPEG, WebP, GIF, BMP), PIL images or height x width x 3
uint8 numpy arrays; a single image gives a single record (a dict), a list gives a list. Records
have the fields of the CLI's ``--json`` records (``glimpse caption --json``). The model runs
with the GIL released, so Python threads can share one model.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

from . import _glimpse
from ._errors import (
    GlimpseError,
    ImageError,
    InvalidInputError,
    MissingFileError,
    UnsupportedError,
)

__all__ = [
    "Model",
    "Stream",
    "GlimpseError",
    "InvalidInputError",
    "ImageError",
    "MissingFileError",
    "UnsupportedError",
    "__version__",
]

__version__: str = _glimpse.version()

#: A path (str or os.PathLike), encoded image bytes, a PIL image or a HxWx3 uint8 numpy array.
Image = Any
Record = dict


def _image_arg(image: Image, label: Optional[str], index: int) -> tuple:
    """The tagged tuple the native module takes for one image. ``label`` names the image in its
    record (default: the path as given, or ``<kind #index>`` for an image in memory)."""
    if isinstance(image, (str, os.PathLike)):
        return ("path", os.fsdecode(image), label)
    name = label if label is not None else _default_name(image, index)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return ("bytes", name, bytes(image))
    pil = sys.modules.get("PIL.Image")
    if pil is not None and isinstance(image, pil.Image):
        # As transformers' processors take a PIL image: converted to RGB, orientation as is.
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return ("rgb", name, rgb.width, rgb.height, rgb.tobytes())
    np = sys.modules.get("numpy")
    if np is not None and isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageError(
                f"image {name}: a numpy array of shape {tuple(image.shape)} and dtype {image.dtype}; "
                "glimpse takes height x width x 3 uint8 RGB (HWC): convert it, e.g. "
                "np.asarray(PIL.Image.fromarray(a).convert('RGB'))"
            )
        height, width = image.shape[:2]
        return ("rgb", name, width, height, np.ascontiguousarray(image).tobytes())
    raise InvalidInputError(
        f"image {name}: a {type(image).__name__} is not an image: pass a path, encoded bytes, "
        "a PIL image or a height x width x 3 uint8 numpy array"
    )


def _default_name(image: Image, index: int) -> str:
    kind = "bytes" if isinstance(image, (bytes, bytearray, memoryview)) else type(image).__name__
    return f"<{kind} #{index}>"


def _images(images: Union[Image, Sequence[Image]], names: Union[None, str, Sequence[str]]) -> Tuple[List[tuple], bool]:
    """The tagged tuples of one image or a list of them, and whether a single image was given."""
    single = not isinstance(images, (list, tuple))
    items = [images] if single else list(images)
    if names is None:
        labels: List[Optional[str]] = [None] * len(items)
    else:
        labels = [names] if isinstance(names, str) else list(names)
        if len(labels) != len(items):
            raise InvalidInputError(f"{len(labels)} names for {len(items)} images: pass one name per image")
    args = [_image_arg(x, label, i) for i, (x, label) in enumerate(zip(items, labels))]
    return args, single


def _raise_errors(errors: str) -> bool:
    if errors not in ("raise", "record"):
        raise InvalidInputError(
            f"errors={errors!r}: use 'raise' (the first failure raises) or 'record' "
            "(a failed input gets an {'image', 'error'} record, as the CLI writes)"
        )
    return errors == "raise"


def _records(raw: List[str], single: bool) -> Union[Record, List[Record]]:
    records = [json.loads(r) for r in raw]
    return records[0] if single else records


class Stream:
    """Text pieces of one caption or answer as they are generated (transformers' TextStreamer
    rules: the pieces join to the record's text). ``result`` is the record once it ended."""

    def __init__(self, native: Any) -> None:
        self._native = native

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._native)

    @property
    def result(self) -> Optional[Record]:
        raw = self._native.result
        return None if raw is None else json.loads(raw)

    def close(self) -> None:
        """Stops generating at the next step and waits for it: ``result`` is then the record
        of what was generated so far. Dropping the stream (or ``break`` out of a ``for`` over
        it and letting it go) also stops the generation."""
        self._native.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Model:
    """A model folder (or hub id such as ``Salesforce/blip2-opt-2.7b``) loaded once.

    Generating models (BLIP-2, LLaVA) caption and answer; embedding models (CLIP) embed and
    classify. ``device`` is "auto" (CUDA when usable, else CPU), "cpu" or "cuda".
    Generation options are keyword arguments named as transformers' ``generate()``
    (max_new_tokens, num_beams, do_sample, temperature, top_k, top_p, min_p, seed,
    repetition_penalty, no_repeat_ngram_size, length_penalty, early_stopping,
    num_return_sequences, min_new_tokens, max_length, eos_token_id, stop_strings); each one given
    replaces the checkpoint's default (its generation_config.json, as transformers resolves it).
    """

    def __init__(
        self,
        path: Union[str, "os.PathLike[str]"],
        device: str = "auto",
        *,
        revision: Optional[str] = None,
        offline: Optional[bool] = None,
        quantize: Optional[str] = None,
    ) -> None:
        # quantize: "int8" or "int4" quantizes a generating model's language decoder at load
        # (weight-only, CPU only for now; README "Quantization"); None keeps fp16 weights.
        self._native = _glimpse.load(os.fsdecode(path), device, revision, offline, quantize)

    @property
    def kind(self) -> str:
        """"generate" (caption, ask, stream) or "embed" (embed, classify)."""
        return self._native.kind

    @property
    def architecture(self) -> str:
        return self._native.architecture

    @property
    def path(self) -> str:
        return os.fspath(self._native.path)

    @property
    def device(self) -> str:
        """"cpu" or "cuda:<name>": where the model runs."""
        return self._native.device

    @property
    def load_seconds(self) -> float:
        return self._native.load_seconds

    def __repr__(self) -> str:
        return f"glimpse.Model({self.path!r}, architecture={self.architecture!r}, device={self.device!r})"

    def options(self, **options: Any) -> dict:
        """The generation options a call with these keyword arguments runs with."""
        return json.loads(self._native.options(**options))

    def caption(
        self,
        images: Union[Image, Sequence[Image]],
        *,
        stream: bool = False,
        names: Union[None, str, Sequence[str]] = None,
        errors: str = "raise",
        **options: Any,
    ) -> Any:
        """Captions each image alone: a record for one image, a list of records for a list.
        ``stream=True`` (one image) returns a :class:`Stream` of text pieces instead."""
        if stream:
            return self.stream(images, name=names if isinstance(names, str) else None, **options)
        args, single = _images(images, names)
        return _records(self._native.generate(args, None, _raise_errors(errors), **options), single)

    def ask(
        self,
        images: Union[Image, Sequence[Image]],
        question: Union[None, str, Sequence[str]] = None,
        *,
        prompt: Optional[str] = None,
        stream: bool = False,
        names: Union[None, str, Sequence[str]] = None,
        errors: str = "raise",
        **options: Any,
    ) -> Any:
        """Answers a question about each image alone (one question for all, or one per image),
        with the family's question template (BLIP-2) or chat template (LLaVA).

        ``prompt=TEXT`` instead of a question: the text exactly as the model's processor takes
        it, with one ``<image>`` placeholder per image in order (``"User:<image>Describe.\nAssistant:"``
        for IDEFICS); every image goes into that one prompt, and one record comes back, as
        ``glimpse ask --image A --image B --prompt TEXT --json``."""
        if prompt is not None:
            if question is not None or stream:
                raise InvalidInputError("ask takes a question or prompt=, not both (and prompt= does not stream)")
            args, _ = _images(images if isinstance(images, (list, tuple)) else [images], names)
            return json.loads(self._native.ask_prompt(args, prompt, **options))
        if question is None:
            raise InvalidInputError("ask needs a question (or prompt=TEXT with <image> placeholders)")
        if stream:
            if not isinstance(question, str):
                raise InvalidInputError("stream=True answers one question about one image: pass the question as a str")
            return self.stream(images, question, name=names if isinstance(names, str) else None, **options)
        args, single = _images(images, names)
        questions = [question] * len(args) if isinstance(question, str) else list(question)
        return _records(self._native.generate(args, questions, _raise_errors(errors), **options), single)

    def ask_images(
        self,
        images: Sequence[Image],
        question: str,
        *,
        names: Optional[Sequence[str]] = None,
        **options: Any,
    ) -> Record:
        """One question about several images together (chat models such as LLaVA): one record
        whose ``image`` lists them, as ``glimpse ask --image A --image B QUESTION --json``."""
        args, _ = _images(list(images), names)
        return json.loads(self._native.ask_images(args, question, **options))

    def stream(self, image: Image, question: Optional[str] = None, *, name: Optional[str] = None, **options: Any) -> Stream:
        """Generates one image's caption (or answer to ``question``) on a worker thread and
        yields its text as it grows. Greedy decoding or sampling (one beam)."""
        if isinstance(image, (list, tuple)):
            raise InvalidInputError(f"stream=True takes one image, got a list of {len(image)}: stream them one by one")
        args, _ = _images(image, name)
        return Stream(self._native.stream(args[0], question, **options))

    def embed(
        self,
        images: Union[None, Image, Sequence[Image]] = None,
        *,
        texts: Union[None, str, Sequence[str]] = None,
        names: Union[None, str, Sequence[str]] = None,
        batch_size: int = 16,
        errors: str = "raise",
    ) -> Any:
        """Unit-length embeddings (CLIP's image_embeds / text_embeds) of images or of texts:
        records ``{"image" or "text", "embedding"}``, ``batch_size`` inputs per forward pass."""
        _check_batch(batch_size)
        if (images is None) == (texts is None):
            raise InvalidInputError("embed() takes images or texts=[...]: pass exactly one of them")
        if texts is not None:
            single = isinstance(texts, str)
            items = [texts] if single else list(texts)
            return _records(self._native.embed_texts(items, batch_size, _raise_errors(errors)), single)
        args, single = _images(images, names)
        return _records(self._native.embed_images(args, batch_size, _raise_errors(errors)), single)

    def classify(
        self,
        images: Union[Image, Sequence[Image]],
        labels: Sequence[str],
        *,
        names: Union[None, str, Sequence[str]] = None,
        batch_size: int = 16,
        errors: str = "raise",
    ) -> Any:
        """Zero-shot classification: per image the softmax over ``labels`` (used verbatim as
        texts) of exp(logit_scale) * cosine similarity: records ``{"image", "labels", "probs"}``."""
        _check_batch(batch_size)
        if isinstance(labels, str):
            labels = [labels]
        args, single = _images(images, names)
        return _records(self._native.classify(args, list(labels), batch_size, _raise_errors(errors)), single)


def _check_batch(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidInputError(f"batch_size={batch_size!r}: it must be an integer of at least 1")
