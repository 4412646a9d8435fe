"""The official `openai` Python client against `glimpse serve` on the tiny fixtures (loopback,
port 0): chat with an image as a data: URI, streaming, n > 1 sampled choices, logprobs,
embeddings (CLIP) and errors as the client's exception types. Answers are checked against the
glimpse CLI on the same inputs (`glimpse ask --json`, `glimpse embed --json`): greedy text and
log-probabilities exactly, sampled choices for the same seed, embeddings to the bit.

Skipped, with the reason printed (`pytest -rs`), where `openai` is not installed; CI installs
it (python/requirements-ci.txt). The binary is target/release/glimpse or GLIMPSE_BIN.
"""

import base64
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

openai = pytest.importorskip(
    "openai", reason="the `openai` package is not installed (pip install -r python/requirements-ci.txt)"
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
IMAGES = FIXTURES / "images"
NAME = "tiny"
QUESTION = "what is in the picture?"


def glimpse_bin():
    path = Path(os.environ.get("GLIMPSE_BIN", ROOT / "target" / "release" / "glimpse"))
    if not path.is_file():
        pytest.fail(f"the glimpse CLI is not built at {path}: run `cargo build --release` or set GLIMPSE_BIN")
    return str(path)


def cli_records(*args):
    out = subprocess.run([glimpse_bin(), *args, "--device", "cpu", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def data_uri(name):
    mime = "image/jpeg" if name.endswith(".jpg") else "image/png"
    return f"data:{mime};base64," + base64.b64encode((IMAGES / name).read_bytes()).decode()


class Server:
    """`glimpse serve` on port 0; the address is the first line it prints."""

    def __init__(self, model):
        self.proc = subprocess.Popen(
            [glimpse_bin(), "serve", "--model", str(FIXTURES / model), "--served-model-name", NAME]
            + ["--device", "cpu", "--port", "0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(60)
        if not line or not line[0].startswith("listening on http://"):
            self.stop()
            pytest.fail(f"glimpse serve did not print its address: {line}")
        self.base = line[0].strip().removeprefix("listening on ")
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def blip2_server():
    server = Server("blip2-opt-tiny")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def clip_server():
    server = Server("clip-tiny")
    yield server
    server.stop()


def messages(image, text):
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}}, {"type": "text", "text": text}],
        }
    ]


def test_models_lists_the_served_name(blip2_server):
    assert [m.id for m in blip2_server.client.models.list()] == [NAME]


def test_chat_with_an_image_and_logprobs_equals_the_cli(blip2_server):
    want = cli_records("ask", "-m", str(FIXTURES / "blip2-opt-tiny"), str(IMAGES / "photo_q90.jpg"), QUESTION)[0]
    r = blip2_server.client.chat.completions.create(
        model=NAME, messages=messages("photo_q90.jpg", QUESTION), temperature=0, logprobs=True
    )
    assert r.object == "chat.completion" and r.model == NAME
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == want["text"]
    assert [t.logprob for t in choice.logprobs.content] == want["logprobs"]
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == len(want["tokens"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_a_stream_adds_up_to_the_answer(blip2_server):
    client = blip2_server.client
    whole = client.chat.completions.create(model=NAME, messages=messages("wide_301x97.png", QUESTION), temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=messages("wide_301x97.png", QUESTION),
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_sampled_choices_equal_the_cli_for_the_seed(blip2_server):
    want = cli_records(
        "ask",
        "-m",
        str(FIXTURES / "blip2-opt-tiny"),
        str(IMAGES / "photo_q90.jpg"),
        QUESTION,
        "--do-sample",
        "--temperature",
        "0.8",
        "--seed",
        "5",
        "--num-return-sequences",
        "3",
        "--max-new-tokens",
        "6",
    )[0]
    r = blip2_server.client.chat.completions.create(
        model=NAME, messages=messages("photo_q90.jpg", QUESTION), n=3, temperature=0.8, seed=5, max_tokens=6
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == [s["text"] for s in want["sequences"]]
    assert r.usage.completion_tokens == sum(len(s["tokens"]) for s in want["sequences"])


def test_embeddings_of_texts_and_images_equal_the_cli(clip_server):
    texts = ["a photo of a cat", "a dog on a sofa"]
    want_texts = [r["embedding"] for r in cli_records("embed", "-m", str(FIXTURES / "clip-tiny"), "--text", texts[0], "--text", texts[1])]
    want_image = cli_records("embed", "-m", str(FIXTURES / "clip-tiny"), str(IMAGES / "photo_q90.jpg"))[0]["embedding"]
    client = clip_server.client
    # Left to itself the client asks for base64 and decodes the float32 bytes; floats too.
    for encoding in ({}, {"encoding_format": "float"}):
        r = client.embeddings.create(model=NAME, input=texts, **encoding)
        assert [d.index for d in r.data] == [0, 1]
        assert [list(d.embedding) for d in r.data] == want_texts
        assert r.usage.prompt_tokens > 0
    r = client.embeddings.create(model=NAME, input=[data_uri("photo_q90.jpg")], encoding_format="float")
    assert list(r.data[0].embedding) == want_image


def test_errors_are_the_clients_exception_types(blip2_server):
    client = blip2_server.client
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=messages("photo_q90.jpg", QUESTION))
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=messages("photo_q90.jpg", QUESTION), max_tokens=0)
    assert e.value.status_code == 400 and e.value.param == "max_tokens"
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=bad)
    assert e.value.param == "messages[0].content[0].image_url"
