"""examples/ray_caption.py on a local Ray cluster with two CPU actors gives the CLI's records."""

import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from conftest import FIXTURES, ROOT, cli_json, comparable, image

EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
import ray_caption  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    # The actors import ray_caption by name, so the examples folder is on their path too.
    # Two CPUs for the two captioning actors, one for the read and write tasks.
    ray.init(num_cpus=3, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(EXAMPLES)}})
    yield
    ray.shutdown()


def test_ray_captions_equal_the_cli(cluster, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    imgs = [image(n) for n in ["wide_301x97.png", "tall_83x311.png", "odd_257x181.png", "rgba_150x120.png",
                               "palette_100x80.png", "photo_q90.jpg"]] + [str(corrupt)]
    model = str(FIXTURES / "blip2-opt-tiny")
    ds = ray.data.read_binary_files(imgs, include_paths=True)
    out = tmp_path / "captions"
    ray_caption.caption_dataset(ds, model, device="cpu", actors=2, batch_size=2,
                                options={"max_new_tokens": 8}).write_parquet(str(out))
    rows = pq.read_table(str(out)).to_pylist()

    want = cli_json("caption", "--model", model, "--device", "cpu", "--max-new-tokens", "8", *imgs)
    by_image = {Path(r["image"]).resolve(): r for r in rows}
    assert len(by_image) == len(want) == len(rows)
    for rec in want:
        row = by_image[Path(rec["image"]).resolve()]
        got = {k: v for k, v in row.items() if v is not None and k != "image"}
        assert got == {k: v for k, v in comparable(rec).items() if k != "image"}, rec["image"]
    assert "error" in want[-1], "the corrupt file fails in the CLI too"
