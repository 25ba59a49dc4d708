"""A real-size SDXL LoRA as diffusers' training scripts save it (PEFT keys under `unet.`, rank 128, lora_alpha
64 in its `lora_adapter_metadata`: scale 0.5), resized to rank 32 by us and by kohya's own
`networks/resize_lora.py` (a snapshot of sd-scripts given on the command line, never committed), each in its
own process: wall time and peak RSS against the time to read the file's bytes, and each output's change
against the trainer's (0.5 · B @ A) at its optimum for the kept rank, read the way a client reads the file.

    python bench/resize_peft.py --sd-scripts /path/to/sd-scripts [--dir /tmp/lc_peft] [--rank 32]

kohya's script imports its training library (torchvision, OpenCV) for three hashing helpers and a file-name
test; the runner gives it a `library` package holding exactly those functions, taken from the snapshot's own
source, so the resize itself is kohya's code as it stands.
"""

import argparse
import ast
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import evict, layout, mib  # noqa: E402

import torch  # noqa: E402

RANK, ALPHA = 128, 64


def targets():
    """[(diffusers module name `unet.…`, (out, in))] of SDXL's UNet attention projections, full width."""
    from lora_colab import arch
    sdxl = arch.get("sdxl")
    shapes = {k: tuple(s) for k, s, _ in layout("sdxl-single-file")}
    out = []
    for t in sdxl.targets(shapes):
        if t.component != "model" or not any(p in t.module for p in (".attn1.", ".attn2.")):
            continue
        for module in sdxl.lora_modules(t, "diffusers"):
            out.append((module.name, (t.shape[0], t.shape[1])))
    return out


def build(path):
    from lora_colab import save_file
    if path.exists():
        return
    gen = torch.Generator().manual_seed(0)
    tensors, names = {}, []
    decay = torch.arange(1, RANK + 1, dtype=torch.float32) ** -0.7
    for name, (rows, cols) in targets():
        tensors[name + ".lora_A.weight"] = (torch.randn(RANK, cols, generator=gen) * decay[:, None] * 0.01).half()
        tensors[name + ".lora_B.weight"] = (torch.randn(rows, RANK, generator=gen) * 0.01).half()
        names.append(name[len("unet."):])
    config = {"r": RANK, "lora_alpha": ALPHA, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
              "use_rslora": False, "use_dora": False, "peft_type": "LORA", "rank_pattern": {}, "alpha_pattern": {}}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()})}
    save_file(tensors, path, metadata=meta)


def run_ours(lora, out, rank):
    os.environ["LORA_COLAB_CACHE"] = str(Path(out) / "cache")
    from lora_colab import resize
    report = resize(None, [lora], out, f"rank={rank}", device="cpu", progress=False, resume=False)[0]
    return report.output


KOHYA_LIBRARY = {"train_util": ("precalculate_safetensors_hashes", "addnet_hash_legacy", "addnet_hash_safetensors"),
                 "model_util": ("is_safetensors",)}


def kohya_library(sd_scripts, root):
    """A `library` package of the sd-scripts snapshot's own hashing and file-name functions (their source)."""
    lib = root / "library"
    lib.mkdir(parents=True, exist_ok=True)
    (lib / "__init__.py").write_text("")
    (lib / "utils.py").write_text("import logging\n\ndef setup_logging(*a, **k):\n    logging.basicConfig(level=logging.INFO)\n")
    for module, functions in KOHYA_LIBRARY.items():
        source = (Path(sd_scripts) / "library" / f"{module}.py").read_text()
        tree = ast.parse(source)
        picked = [ast.get_source_segment(source, node) for node in tree.body
                  if isinstance(node, ast.FunctionDef) and node.name in functions]
        header = "import hashlib\nimport os\nfrom io import BytesIO\nimport safetensors.torch\n\n"
        (lib / f"{module}.py").write_text(header + "\n\n".join(picked) + "\n")
    return root


def run_kohya(sd_scripts, lora, out, rank, library_root):
    code = textwrap.dedent(f"""
        import runpy, sys
        sys.path[:0] = [{str(library_root)!r}, {str(sd_scripts)!r}]
        sys.argv = ["resize_lora.py", "--model", {str(lora)!r}, "--save_to", {str(out)!r}, "--new_rank", "{rank}",
                    "--device", "cpu", "--save_precision", "fp16"]
        runpy.run_path({str(Path(sd_scripts) / "networks" / "resize_lora.py")!r}, run_name="__main__")
    """)
    return [sys.executable, "-c", code]


def timed(command):
    """(seconds, peak RSS bytes) of a child process (its own VmHWM via wait4's rusage)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    if status != 0:
        raise SystemExit(f"{command[:3]} failed:\n{err[-2000:]}")
    return seconds, usage.ru_maxrss * 1024


def ours_command(lora, out, rank):
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            f"import resize_peft as b; b.run_ours({str(lora)!r}, {str(out)!r}, {rank})"]


def fidelity(original, rank, outputs):
    """{label: (worst, median) ‖client's change − optimum‖ / ‖trainer's change‖ over the modules} for
    `outputs` {label: (file, reader)}: the optimum is the best rank-`rank` approximation of the trainer's
    0.5 · B @ A (its SVD through a QR core of the factors, float64: exact), one module at a time."""
    from safetensors.torch import load_file
    src = load_file(original)
    files = {label: (load_file(path), reader) for label, (path, reader) in outputs.items()}
    errors = {label: [] for label in outputs}
    for key in src:
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[: -len(".lora_A.weight")]
        up, down = (ALPHA / RANK) * src[name + ".lora_B.weight"].double(), src[key].double()
        qb, rb = torch.linalg.qr(up)
        qa, ra = torch.linalg.qr(down.T)
        um, sv, vmh = torch.linalg.svd(rb @ ra.T)
        truth = up @ down
        optimum = ((qb @ um)[:, :rank] * sv[:rank]) @ (qa @ vmh.T)[:, :rank].T
        for label, (out, reader) in files.items():
            errors[label].append(float((reader(out, name).double() - optimum).norm() / truth.norm()))
    return {label: (max(e), sorted(e)[len(e) // 2]) for label, e in errors.items()}


def as_diffusers(out, name):
    """diffusers' reading of our output: its metadata's lora_alpha / r per module (alpha = rank here)."""
    return out[name + ".lora_B.weight"].double() @ out[name + ".lora_A.weight"].double()


def as_comfy(out, name):
    """ComfyUI's reading of kohya's output (diffusers refuses it: its metadata still says r=128):
    alpha / rank · B @ A."""
    down, up = out[name + ".lora_A.weight"].double(), out[name + ".lora_B.weight"].double()
    alpha = float(out[name + ".alpha"]) if name + ".alpha" in out else down.shape[0]
    return alpha / down.shape[0] * up @ down


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd-scripts", required=True, help="a snapshot of kohya-ss/sd-scripts")
    parser.add_argument("--dir", default="/tmp/lc_peft")
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    lora = root / "sdxl_peft_r128.safetensors"
    build(lora)
    print(f"LoRA: {len(targets())} modules, rank {RANK}, lora_alpha {ALPHA}, {lora.stat().st_size / 1e6:.0f} MB fp16")
    evict(lora)
    start = time.perf_counter()
    with open(lora, "rb") as f:
        while f.read(1 << 24):
            pass
    read = time.perf_counter() - start
    library = kohya_library(args.sd_scripts, root / "kohya_lib")
    ours_out, kohya_out = root / "ours", root / f"kohya_rank{args.rank}.safetensors"
    rows = {}
    for label, command in (("lora_colab", ours_command(lora, ours_out, args.rank)),
                           ("kohya resize_lora.py", run_kohya(args.sd_scripts, lora, kohya_out, args.rank, library))):
        evict(lora)
        rows[label] = timed(command)
    ours_file = next(ours_out.glob("*.safetensors"))
    meta = json.loads(__import__("safetensors").safe_open(str(kohya_out), "pt").metadata().get(
        "lora_adapter_metadata", "{}"))
    fid = fidelity(lora, args.rank, {"lora_colab": (ours_file, as_diffusers),
                                     "kohya resize_lora.py": (kohya_out, as_comfy)})
    print(f"reading the file cold: {read:.2f} s")
    for label, (seconds, rss) in rows.items():
        worst, median = fid[label]
        print(f"{label:22} {seconds:6.1f} s ({seconds / read:5.1f}x the read)  peak RSS {mib(rss):>10}  "
              f"error vs the optimum: worst {worst:.4f}, median {median:.4f}")
    ours_s, kohya_s = rows["lora_colab"][0], rows["kohya resize_lora.py"][0]
    print(f"ratio ours/kohya: time {ours_s / kohya_s:.2f}x, peak RSS {rows['lora_colab'][1] / rows['kohya resize_lora.py'][1]:.2f}x")
    print(f"kohya's output keeps lora_adapter_metadata r={meta.get('unet.r')} (its ranks are {args.rank}): "
          f"diffusers' load_lora_weights refuses it; read by ComfyUI's rules it is {1 / (ALPHA / RANK):.0f}x the "
          f"trainer's change (it takes the scale as 1)")


if __name__ == "__main__":
    main()
