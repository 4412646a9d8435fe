"""Shared fixtures: the repository's tiny test models, images, goldens and the glimpse CLI.

The CLI binary is `target/release/glimpse` (built by `cargo test --release` or `cargo build
--release`), or the path in GLIMPSE_BIN.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

import glimpse

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
IMAGES = FIXTURES / "images"
GOLDENS = FIXTURES / "goldens"


def golden(name):
    return json.loads((GOLDENS / name).read_text())


def image(name):
    return str(IMAGES / name)


def cli_bin():
    path = Path(os.environ.get("GLIMPSE_BIN", ROOT / "target" / "release" / "glimpse"))
    if not path.is_file():
        pytest.fail(f"the glimpse CLI is not built at {path}: run `cargo build --release` or set GLIMPSE_BIN")
    return str(path)


def cli_json(*args):
    """The CLI's --json records of `glimpse ARGS --json` (exit status ignored: failed inputs
    have records too)."""
    out = subprocess.run([cli_bin(), *args, "--json"], capture_output=True, text=True, check=False)
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert records, f"glimpse {' '.join(args)} wrote no records: {out.stderr}"
    return records


def comparable(record):
    """A record without the fields that vary from run to run (wall-clock timings)."""
    return {k: v for k, v in record.items() if k not in ("timings", "load_seconds")}


@pytest.fixture(scope="session")
def blip2():
    return glimpse.Model(FIXTURES / "blip2-opt-tiny", device="cpu")


@pytest.fixture(scope="session")
def llava():
    return glimpse.Model(FIXTURES / "llava-tiny", device="cpu")


@pytest.fixture(scope="session")
def clip():
    return glimpse.Model(FIXTURES / "clip-tiny", device="cpu")
