#!/usr/bin/env python3
"""Summary table of a device run: glimpse vs transformers per stage, with floors.

    python3 scripts/device_summary.py LOG_DIR > LOG_DIR/summary.md

Reads whichever of env.txt, glimpse-bench.json, hf-eager.json, hf-compiled.json and parity.json
the run left in LOG_DIR (scripts/device-e2e.sh writes all of them, scripts/device-perf.sh the
first three); a missing or broken file is named in the output instead of failing.
"""
import json, os, sys
d = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(d, name)) as f:
            return json.load(f)
    except Exception as e:  # missing or broken: say so in the table
        return {"_error": f"{name}: {e}"}
g, he = load("glimpse-bench.json"), load("hf-eager.json")
hc = load("hf-compiled.json") if os.path.exists(os.path.join(d, "hf-compiled.json")) else {}
env = open(os.path.join(d, "env.txt")).read().strip().splitlines()
print("# glimpse vs transformers, " + " | ".join(env[:3]))
print()
for x in (g, he, hc):
    if "_error" in x:
        print(f"- {x['_error']}")
runs = {r["label"]: r for r in he.get("runs", []) + hc.get("runs", [])}
if "rows" in g:
    # An embedding model (CLIP): images/s and texts/s per batch, glimpse's request rate vs
    # transformers' get_*_features rate.
    print(f"glimpse: {g.get('device_name')}, preset {g.get('preset')}, texts of {g.get('text_tokens')} tokens")
    print()
    print("| input | batch | floor ms | glimpse ms (per s) | " + " | ".join(f"{k} ms (per s)" for k in runs) + " |")
    print("|---|---|---|---|" + "---|" * len(runs))
    for r in g["rows"]:
        cell = f"{r['request_ms']:.2f} ({r['per_s']:.0f})" if r.get("request_ms") else f"skipped ({r.get('skipped')})"
        cells = []
        for run in runs.values():
            m = {(x["input"], x["batch"]): x for x in run.get("rows", [])}.get((r["input"], r["batch"]), {})
            cells.append(f"{m['median_ms']:.2f} ({m['per_s']:.0f})" if "median_ms" in m else m.get("skipped", "-"))
        print(f"| {r['input']} | {r['batch']} | {r['floor_ms']:.3f} | {cell} | " + " | ".join(cells) + " |")
    sys.exit(0)
cols = [("glimpse", None)] + [(k, v) for k, v in runs.items()]
if "rates" in g:
    r = g["rates"]
    print(f"glimpse: {g.get('device_name')}, preset {g.get('preset')}, batch {g.get('batch')}, {g.get('new_tokens')} tokens, "
          f"copy {r['copy_gbs']:.0f} GB/s, matrix {(r.get('matrix_gflops') or 0):.0f} GFLOP/s ({r['matrix_source']})")
    print()
print("| stage | floor ms | " + " | ".join(c for c, _ in cols) + " |")
print("|---|---|" + "---|" * len(cols))
gst = {s["stage"]: s for s in g.get("stages", [])}
for st in ["vision", "qformer", "image_features", "encoder", "prefill", "prefill_vqa", "decode", "first_token", "caption"]:
    floor = gst.get(st, {}).get("floor_ms")
    cells = []
    for name, run in cols:
        if run is None:
            s = gst.get(st)
            cells.append(f"{s['median_ms']:.2f} ({100 * s['fraction_of_floor']:.0f}%)" if s else "-")
        else:
            s = run.get("stages", {}).get(st) or (run.get("stages", {}).get("decode_from_generate") if st == "decode" else None)
            cells.append(f"{s['median_ms']:.2f}" if s and "median_ms" in s else ("error" if "error" in run else "-"))
    fl = f"{floor:.2f}" if floor is not None else "-"
    print(f"| {st} | {fl} | " + " | ".join(cells) + " |")
print()
print("images/s (batch: glimpse / " + " / ".join(runs) + ")")
for t in g.get("throughput", []):
    row = [f"{t['images_per_s']:.1f}" if t.get("images_per_s") else f"skipped ({t.get('skipped')})"]
    for run in runs.values():
        m = {x["batch"]: x for x in run.get("throughput", [])}.get(t["batch"], {})
        row.append(f"{m['images_per_s']:.1f}" if "images_per_s" in m else m.get("skipped", "-"))
    print(f"- batch {t['batch']}: " + " / ".join(row) + (f" (floor {t['floor_images_per_s']:.1f})" if t.get("floor_images_per_s") else ""))
n = he.get("numerics")
if n:
    print()
    print(f"transformers fp16 vs fp32 prefill logits: rel {n['fp16_vs_fp32']['rel_l2']:.3e}, max abs {n['fp16_vs_fp32']['max_abs']:.3e}; "
          f"greedy fp16 == fp32: {n['greedy_fp16_equals_fp32']}")
p = load("parity.json") if os.path.exists(os.path.join(d, "parity.json")) else {}
if p.get("glimpse_vs_fp32"):
    gp = p["glimpse_vs_fp32"]
    print(f"glimpse ({p['device']}) vs fp32 prefill logits: rel {gp['rel_l2']:.3e}, max abs {gp['max_abs']:.3e}, "
          f"argmax {gp['argmax_agree']}/{p['rows']}; ratio to transformers fp16 {p['ratio']:.2f} (bar <= 2): "
          f"{'pass' if p['pass'] else 'FAIL'}")
