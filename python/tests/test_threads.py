"""One model shared by Python threads: the same results as one thread, with the GIL released
while the model runs."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import image

IMGS = [image(n) for n in ["wide_301x97.png", "tall_83x311.png", "odd_257x181.png", "rgba_150x120.png"]]


def test_threads_share_one_model(blip2, clip):
    want = [blip2.caption(p)["tokens"] for p in IMGS]
    want_embed = [r["embedding"] for r in clip.embed(IMGS)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda p: blip2.caption(p)["tokens"], IMGS * 3))
        embeds = list(pool.map(lambda p: clip.embed(p)["embedding"], IMGS * 2))
    assert got == want * 3
    assert embeds == want_embed * 2


def test_the_gil_is_released_while_the_model_runs(blip2):
    # A Python loop on the main thread keeps counting while another thread captions: with the
    # GIL held for the whole call, the counter could not move until the call returned.
    done = threading.Event()

    def work():
        blip2.caption(IMGS * 4)
        done.set()

    t = threading.Thread(target=work)
    count = 0
    t.start()
    time.sleep(0.05)  # the worker is inside the native call
    while not done.is_set():
        count += 1
    t.join()
    assert count > 10_000, f"the main thread counted only {count} while the model ran"

