#!/usr/bin/env python3
"""Caption many images on many machines: Ray Data reads the images, one glimpse model per Ray
actor captions them, and the records are written as Parquet.

    # one machine (Ray starts a local cluster):
    python examples/ray_caption.py --model Salesforce/blip2-opt-2.7b --out captions/ photos/*.jpg

    # a cluster: `ray start --head` on one node, `ray start --address HEAD:6379` on the others,
    # then run this script on any node with RAY_ADDRESS=HEAD:6379 (or --address HEAD:6379).
    # Image paths must be readable from every node (shared storage, s3://, gs://...), or pass a
    # Parquet file holding the image bytes (--parquet, column `bytes`, and `path` for names).

Each actor loads the model once and keeps it: with GPUs in the cluster it takes one GPU
(num_gpus=1, one actor per GPU), else CPUs (--cpus-per-actor each). The output has one row per
image with the fields of `glimpse caption --json`: image, text, tokens, logprobs, device, and
error (null unless that image failed; a failed image does not stop the job).

The images are decoded by glimpse itself from their bytes (`read_binary_files`), so a caption
equals the CLI's for the same file. `--reader images` decodes with Ray's `read_images` (Pillow,
mode RGB) instead and passes arrays.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional

import numpy as np



def schema():
    """The output columns, in the order of the CLI's --json records. Typed, so that every
    Parquet file has the same schema (a batch without failures has an all-null `error`)."""
    import pyarrow as pa

    return pa.schema([
        ("image", pa.string()),
        ("text", pa.string()),
        ("tokens", pa.list_(pa.int64())),
        ("logprobs", pa.list_(pa.float64())),
        ("device", pa.string()),
        ("error", pa.string()),
    ])


class Captioner:
    """A Ray Data callable class: one glimpse model per actor, kept across batches."""

    def __init__(self, model: str, device: str = "auto", options: Optional[Dict[str, Any]] = None) -> None:
        import glimpse

        self.model = glimpse.Model(model, device=device)
        self.options = dict(options or {})

    def __call__(self, batch: Dict[str, np.ndarray]):
        names = [str(p) for p in batch["path"]]
        if "bytes" in batch:
            images = [bytes(b) for b in batch["bytes"]]
        elif "image" in batch:
            images = list(batch["image"])
        else:  # paths only (a Parquet of paths): read by glimpse on the actor's node
            images = names
        records = self.model.caption(images, names=names, errors="record", **self.options)
        import pyarrow as pa

        out = schema()
        return pa.table({f.name: [r.get(f.name) for r in records] for f in out}, schema=out)


def read(args: argparse.Namespace):
    import ray

    if args.parquet:
        return ray.data.read_parquet(args.parquet)
    if args.reader == "images":
        return ray.data.read_images(args.images, include_paths=True, mode="RGB")
    return ray.data.read_binary_files(args.images, include_paths=True)


def caption_dataset(ds, model: str, *, device: str = "auto", actors: Optional[int] = None,
                    cpus_per_actor: float = 1, batch_size: int = 8, options: Optional[Dict[str, Any]] = None):
    """`ds` (columns `path` and `bytes` or `image`) mapped to caption records."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 and device != "cpu"
    if use_gpu:
        resources = {"num_gpus": 1}
        size = actors or gpus
    else:
        resources = {"num_cpus": cpus_per_actor}
        # One CPU stays free for the read and write tasks, else they wait for the actors forever.
        cpus = ray.cluster_resources().get("CPU", 1) - 1
        size = actors or max(1, int(cpus // cpus_per_actor))
    return ds.map_batches(
        Captioner,
        fn_constructor_kwargs={"model": model, "device": "cuda" if use_gpu else device, "options": options},
        compute=ray.data.ActorPoolStrategy(size=size),
        batch_size=batch_size,
        batch_format="numpy",
        **resources,
    )


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder (on every node) or hub id")
    p.add_argument("--out", required=True, help="output folder of Parquet files")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--actors", type=int, default=None, help="actors (default: one per GPU, else per --cpus-per-actor CPUs)")
    p.add_argument("--cpus-per-actor", type=float, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--reader", choices=["bytes", "images"], default="bytes",
                   help="bytes: glimpse decodes the files (CLI-equal); images: Ray's read_images decodes")
    p.add_argument("--parquet", default=None, help="read a Parquet of `path` (and `bytes`) columns instead of files")
    p.add_argument("--options", default="{}", help='generation options as JSON, e.g. \'{"max_new_tokens": 30}\'')
    p.add_argument("images", nargs="*", help="image files or folders")
    args = p.parse_args(argv)
    if not args.images and not args.parquet:
        p.error("give image paths or --parquet")

    import ray

    ray.init(address=args.address or os.environ.get("RAY_ADDRESS"))
    ds = caption_dataset(read(args), args.model, device=args.device, actors=args.actors,
                         cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size,
                         options=json.loads(args.options))
    ds.write_parquet(args.out)


if __name__ == "__main__":
    main()
