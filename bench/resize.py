"""Resizer benchmark: an SDXL LoRA at rank 64 on every UNet and text-encoder target, with a full-size SDXL
checkpoint (shapes from the real layout). Seconds per LoRA with a cold and a warm norm cache and peak RSS,
against kohya's method (form ΔW, full SVD per layer) run in the same script on a stated sample of layers;
and three recipes on five LoRAs against one on one. Each run in its own process.

    python bench/resize.py [--dir /tmp/lc_rbench] [--sample 60] [--keep]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import layout, mib, proc_status  # noqa: E402

import torch  # noqa: E402

RANK = 64


def build(root):
    from lora_colab import save_file
    from lora_colab.notebook.synthetic import write_checkpoint
    root.mkdir(parents=True, exist_ok=True)
    ckpt = root / "sdxl.safetensors"
    entries = [(k, tuple(s)) for k, s, _ in layout("sdxl-single-file")]
    if not ckpt.exists():
        gen = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        write_checkpoint(ckpt, entries, lambda k, s: torch.randn(s, generator=gen) * 0.02, torch.float16)
        print(f"checkpoint {ckpt.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)
    from lora_colab.arch.canonical import open_canonical
    with open_canonical(ckpt) as view:  # canonical names: CLIP-L keys gain `text_model.` as real files have
        sdxl, targets = view.arch, view.arch.targets(view.shapes())
    for i in range(5):
        path = root / f"lora{i}.safetensors"
        if path.exists():
            continue
        gen = torch.Generator().manual_seed(100 + i)
        tensors = {}
        for t in targets:
            for m in sdxl.lora_modules(t, "kohya"):
                rows = (m.rows[1] - m.rows[0]) if m.rows else t.shape[0]
                decay = torch.arange(1, RANK + 1, dtype=torch.float32) ** -1.0
                tensors[m.name + ".lora_down.weight"] = (torch.randn(RANK, t.shape[1], generator=gen)
                                                         * decay[:, None] * 0.01).half()
                tensors[m.name + ".lora_up.weight"] = (torch.randn(rows, RANK, generator=gen) * 0.01).half()
                tensors[m.name + ".alpha"] = torch.tensor(float(RANK / 2))
        save_file(tensors, path, metadata={"ss_network_dim": str(RANK), "ss_network_alpha": str(RANK // 2)})
    print(f"5 LoRAs of {len(targets)} targets at rank {RANK}, {(root / 'lora0.safetensors').stat().st_size / 1e6:.0f} MB "
          f"each", flush=True)
    return ckpt, [root / f"lora{i}.safetensors" for i in range(5)]


def w_ours(ckpt, loras, recipes, cache, out):
    os.environ["LORA_COLAB_CACHE"] = cache
    from lora_colab.resizing.resizer import resize
    reports = resize(ckpt, loras, out, recipes, device="cpu")
    return {"outputs": len(reports), "ranks": [r.total_rank for r in reports]}


def w_kohya(lora, sample):
    """kohya resize_lora.py's core per layer: ΔW = up @ down in fp32, torch.linalg.svd (full_matrices)."""
    from safetensors.torch import load_file
    tensors = load_file(lora)
    names = sorted(k[: -len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight"))
    picked = names[:: max(1, len(names) // sample)][:sample]
    start = time.perf_counter()
    for name in picked:
        up = tensors[name + ".lora_up.weight"].float()
        down = tensors[name + ".lora_down.weight"].float()
        u, s, vh = torch.linalg.svd(up @ down)
        k = int((torch.cumsum(s ** 2, 0) / (s ** 2).sum() < 0.81).sum()) + 1
        _ = (u[:, :k] * s[:k]).half(), vh[:k].half()
    per_layer = (time.perf_counter() - start) / len(picked)
    return {"per_layer": per_layer, "layers": len(names), "sampled": len(picked)}


def worker(name, args):
    start = time.perf_counter()
    result = {"ours": w_ours, "kohya": w_kohya}[name](**args)
    result.update(wall=time.perf_counter() - start, peak=proc_status("VmHWM"))
    print(json.dumps(result))


def run(name, **args):
    out = subprocess.run([sys.executable, __file__, "--worker", name, json.dumps(args)], capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/lc_rbench")
    parser.add_argument("--sample", type=int, default=60, help="layers timed with kohya's method")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], json.loads(args.worker[1]))
    root = Path(args.dir)
    ckpt, loras = build(root)
    cache = str(root / "cache")
    import shutil
    shutil.rmtree(cache, ignore_errors=True)
    one = "spn_ckpt=1,thr=-1.2"
    three = "spn_ckpt=1,thr=-1.2:fro_ckpt=1,size=50:sv_fro=0.9,rank=32"
    cold = run("ours", ckpt=str(ckpt), loras=[str(loras[0])], recipes=one, cache=cache, out=str(root / "o"))
    warm = run("ours", ckpt=str(ckpt), loras=[str(loras[0])], recipes=one, cache=cache, out=str(root / "o"))
    many = run("ours", ckpt=str(ckpt), loras=[str(p) for p in loras], recipes=three, cache=cache, out=str(root / "o"))
    kohya = run("kohya", lora=str(loras[0]), sample=args.sample)
    kohya_total = kohya["per_layer"] * kohya["layers"]
    print(f"ours, 1 LoRA, 1 recipe: cold norm cache {cold['wall']:.1f} s (peak RSS {mib(cold['peak'])}), "
          f"warm {warm['wall']:.1f} s (peak RSS {mib(warm['peak'])})")
    print(f"ours, 5 LoRAs x 3 recipes (warm): {many['wall']:.1f} s -> RATIO {many['wall'] / warm['wall']:.2f}x "
          f"the time of 1 x 1 for 15x the outputs")
    print(f"kohya method: {kohya['per_layer'] * 1000:.0f} ms/layer on {kohya['sampled']} of {kohya['layers']} layers "
          f"-> {kohya_total:.0f} s per LoRA (extrapolated)")
    print(f"RATIO kohya/ours: cold {kohya_total / cold['wall']:.1f}x, warm {kohya_total / warm['wall']:.1f}x "
          f"(goal >= 10)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
