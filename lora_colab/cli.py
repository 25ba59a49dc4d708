"""The `lora-colab` command line."""

import argparse
import json
import sys

from . import __version__
from .errors import Interrupted, LoraColabError


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors under the one prefix every error has: `lora-colab: error: extract:
    argument --dtype: ... (see lora-colab extract --help)`, exit 2."""

    def error(self, message):
        command = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(2, f"lora-colab: error: {command}{message} (see {self.prog} --help)\n")


_SOURCES = ("a .safetensors file, a *.index.json or a diffusers folder: a local path, an http(s) URL, a Hub "
            "file (owner/repo:file, hf://owner/repo/file or its huggingface.co URL) or a Hub folder "
            "(hf://owner/repo[/subfolder]); remote files are read in place, by HTTP range")


def _add_source_options(p):
    p.add_argument("--token", default=None, metavar="TOKEN",
                   help="bearer token for plain URLs, sent only to that URL's own host and folder (default: "
                        "$LORA_COLAB_URL_TOKEN); the Hub uses HF_TOKEN or `hf auth login`")
    p.add_argument("--download", default=None, metavar="DIR",
                   help="download remote sources into DIR first instead of reading them in place")


def _local_or_remote(source, args):
    """`source` as given (read in place), or its downloaded copy with --download DIR."""
    if not args.download or str(source).lower() == "none":
        return source
    from .io.downloads import fetch
    return str(fetch(source, args.download, token=args.token))


def _cmd_inspect(args):
    from .io.opener import open_checkpoint
    from .io.hub import pinned_run
    from .lora.inspect import format_summary, summarize

    with pinned_run(), open_checkpoint(_local_or_remote(args.path, args), args.token) as ckpt:
        summary = summarize(ckpt)
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print("\n".join(format_summary(summary)))
        if args.keys:
            for key in ckpt.keys():
                print(f"{key}\t{ckpt.st_dtype(key)}\t{list(ckpt.shape(key))}")
    return 0


def _number(kind, check, what):
    """An argparse type: `kind(text)` that passes `check`, else an error saying `what` it must be."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
        return value
    return convert


def _clamp_value(text):
    value = _number(float, lambda v: 0.5 <= v <= 1.0, "in [0.5, 1] (1 turns the clamp off)")(text)
    return None if value >= 1.0 else value


def _dtype_value(text):
    from .dtypes import dtype_name

    try:
        return dtype_name(text)
    except LoraColabError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: use bf16, fp16 (or 16) or fp32 (or 32)") from exc


_POSITIVE_INT = _number(int, lambda v: v >= 1, "a positive integer")
_COUNT = _number(int, lambda v: v >= 0, "0 or more")
_POSITIVE = _number(float, lambda v: 0 < v < float("inf"), "a finite number > 0")


def _device_value(text):
    """cpu, cuda, cuda:N or auto (checked here, before torch loads or any file is touched)."""
    import re
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: use cpu, cuda (or cuda:N) or auto")


def _extract_options(args):
    return dict(rank=args.rank, alpha=args.alpha, clamp_quantile=args.clamp_quantile, conv_rank=args.conv_rank,
                conv_alpha=args.conv_alpha, text_encoders=not args.no_text_encoders, min_diff=args.min_diff,
                format=args.format, dtype=args.dtype, device=args.device, niter=args.niter,
                oversample=args.oversample, energy=args.energy, scale=args.scale, groups=args.include,
                on_nonfinite=args.on_nonfinite, progress=not args.quiet, bias_diff=args.bias_diff,
                recipe=args.recipe, resume=args.resume, restart=args.restart)


def _finish(report, as_json):
    print(json.dumps(report.to_dict(), indent=2, default=str) if as_json else str(report))
    return 1 if report.identical or report.nothing_selected else 0


def _cmd_extract(args):
    from .extraction.extractor import extract

    from .extraction.extractor import check_output_file

    check_output_file(args.output)
    base, tuned = _local_or_remote(args.base, args), _local_or_remote(args.tuned, args)
    return _finish(extract(base, tuned, args.output, token=args.token, **_extract_options(args)), args.json)


def _cmd_demo(args):
    from .notebook.demo import next_steps, run_demo

    options = _extract_options(args)
    rank = options.pop("rank")
    report = run_demo(args.output_dir, rank=rank, family=args.family, **options)
    status = _finish(report, args.json)
    if not args.json and report.output:
        print("\n".join(next_steps(report)))
    return status


def _cmd_resize(args):
    from .resizing.inputs import LoraInput
    from .resizing.resizer import resize

    checkpoint = None if args.checkpoint.lower() == "none" else _local_or_remote(args.checkpoint, args)
    loras = [LoraInput.parse(lora) for lora in args.loras]
    if args.download:
        loras = [lora.with_paths(lambda path: _local_or_remote(path, args)) for lora in loras]
    reports = resize(checkpoint, loras, args.output_folder, args.recipes, dtype=args.dtype,
                     device=args.device, verbose=0, token=args.token, progress=not args.quiet and not args.json,
                     resume=args.resume, restart=args.restart, to=args.to)
    return _print_reports(reports, args)


def _cmd_convert(args):
    from .resizing.convert import convert

    checkpoint = None if args.checkpoint.lower() == "none" else _local_or_remote(args.checkpoint, args)
    loras = [str(_local_or_remote(path, args)) for path in args.loras]
    reports = convert(checkpoint, loras, args.to, args.output_folder, dtype=args.dtype, device=args.device,
                      token=args.token, progress=not args.quiet and not args.json, resume=args.resume,
                      restart=args.restart)
    return _print_reports(reports, args)


def _print_reports(reports, args):
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2, default=str))
    else:
        for report in reports:
            print(report.summary(args.verbose))
    return 1 if any(report.nothing_kept for report in reports) else 0


def _add_extract_options(p, rank_default):
    p.add_argument("--rank", type=_POSITIVE_INT, default=rank_default,
                   help=f"LoRA rank, or with --recipe the most each layer may keep (default {rank_default or 32})")
    p.add_argument("--recipe", default=None, metavar="RECIPE",
                   help="choose each layer's rank as the resizer does, relative to the base's own weights, in the "
                        "same pass: e.g. 'spn_ckpt=1,size=50' (the best LoRA of 50 MiB), 'fro_ckpt=1,thr=-2.5', "
                        "'sv_fro=0.9' (see Resizing LoRAs)")
    p.add_argument("--alpha", type=_POSITIVE, default=None, help="alpha (default: = rank); only the factors' "
                   "scale depends on it: alpha/rank · up @ down always equals the extracted difference")
    p.add_argument("--scale", type=_POSITIVE, default=1.0, help="multiply the extracted difference (0.5 = half "
                   "strength at weight 1.0; default %(default)s)")
    p.add_argument("--clamp-quantile", type=_clamp_value, default=0.99, metavar="Q",
                   help="cut outlier rows/columns of the factors at this quantile of their norms "
                        "(default %(default)s; 1 turns it off)")
    p.add_argument("--conv-rank", type=_POSITIVE_INT, default=None, help="LoCon: also extract k×k convolutions at this rank")
    p.add_argument("--conv-alpha", type=_POSITIVE, default=None, help="alpha for conv layers (default: = conv rank)")
    p.add_argument("--no-text-encoders", action="store_true", help="UNet/transformer only (SD1.5/SDXL)")
    p.add_argument("--include", action="append", default=[], metavar="GROUP",
                   help="optional target groups, repeatable (e.g. --include adaln for Z-Image's modulation): "
                        "`lora-colab inspect BASE` lists a model's groups and their layers; every family's: "
                        "docs/models.md")
    p.add_argument("--energy", type=_number(float, lambda v: 0 < v <= 1, "in (0, 1]"), default=None, metavar="F",
                   help="adaptive rank: per layer the smallest rank <= --rank keeping this fraction of ‖ΔW‖²")
    p.add_argument("--min-diff", type=_number(float, lambda v: v >= 0, ">= 0"), default=0.0,
                   help="skip layers whose |difference| never exceeds this (default %(default)s)")
    p.add_argument("--format", default="auto", choices=("auto", "kohya", "comfy", "diffusers", "peft"),
                   help="key naming (default auto: what loads in the most clients for the architecture)")
    p.add_argument("-t", "--dtype", type=_dtype_value, default=None,
                   help="factor dtype: bf16, fp16 (or 16) or fp32 (or 32) (default bf16 for DiTs, fp16 for SD/SDXL)")
    p.add_argument("--device", type=_device_value, default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--niter", type=_COUNT, default=2, help="randomized-SVD power iterations (default %(default)s: within 1%% of the optimal error with the default oversampling; see bench/extract.py)")
    p.add_argument("--oversample", type=_COUNT, default=8, help="randomized-SVD oversampling (default %(default)s)")
    p.add_argument("--bias-diff", action=argparse.BooleanOptionalAction, default=None,
                   help="write changed biases and norm scales whole as .diff_b/.diff (default: where every client "
                        "of the format loads them, i.e. the comfy format of most models; the report says so)")
    p.add_argument("--on-nonfinite", choices=("stop", "skip"), default="stop",
                   help="a layer with NaN/Inf: stop with an error naming it (default) or skip it")
    _add_resume_options(p, "OUT.journal")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_resume_options(p, journal):
    p.add_argument("--restart", action="store_true",
                   help="start over, setting aside the journal of an interrupted run (by default the same "
                        "command continues where an interrupted run stopped)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help=f"keep no journal ({journal}) of finished layers: an interrupted run cannot resume")


def build_parser():
    parser = _Parser(
        prog="lora-colab",
        description="Extract LoRAs from checkpoint pairs and resize LoRAs, in bounded memory.",
        epilog="Run 'lora-colab COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"lora-colab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    _add_inspect(commands)
    _add_extract(commands)
    _add_demo(commands)
    _add_resize(commands)
    _add_convert(commands)
    return parser


def _add_inspect(commands):
    inspect = commands.add_parser(
        "inspect", help="show tensors, dtypes, size, metadata and detected layout of a checkpoint",
        description=f"Summarise {_SOURCES} (reads the headers only).")
    inspect.add_argument("path", metavar="SOURCE")
    _add_source_options(inspect)
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.add_argument("--keys", action="store_true", help="also list every tensor: name, dtype, shape")
    inspect.set_defaults(func=_cmd_inspect)


def _add_extract(commands):
    ext = commands.add_parser(
        "extract", help="extract a LoRA from a base and a fine-tuned checkpoint",
        description=f"LoRA = low-rank SVD of (tuned - base), one layer at a time, in bounded memory. BASE and "
                    f"TUNED each take {_SOURCES}. Their layouts may differ.")
    ext.add_argument("base", metavar="BASE")
    ext.add_argument("tuned", metavar="TUNED")
    ext.add_argument("-o", "--output", required=True, metavar="OUT.safetensors",
                     help="the LoRA file to write (a file, not a folder; written atomically)")
    _add_extract_options(ext, None)
    _add_source_options(ext)
    ext.set_defaults(func=_cmd_extract)


def _add_demo(commands):
    demo = commands.add_parser(
        "demo", help="make a small pair of a family you use (Z-Image, SDXL, Flux.1) and extract a LoRA from it",
        description="Writes a small base and fine-tune with a planted low-rank change (Z-Image: a diffusers folder "
                    "and a ComfyUI single file; SDXL and Flux.1: single files with the real names), then runs the "
                    "extractor on them and prints the report.")
    demo.add_argument("--family", choices=("zimage", "sdxl", "flux"), default="zimage",
                      help="the model family of the pair (default %(default)s)")
    demo.add_argument("-o", "--output-dir", default=None, metavar="DIR",
                      help="where to write the pair and the LoRA (default: lora_colab_demo in the temporary "
                           "folder, replaced by each run)")
    _add_extract_options(demo, 16)
    demo.set_defaults(func=_cmd_demo)


def _add_resize(commands):
    res = commands.add_parser(
        "resize", help="compress LoRAs by scoring their singular values (against the base model too)",
        description="Decompose each LoRA once (QR core, exact, no full matrix), score every singular "
                    "direction, keep what each recipe selects and write one file per (LoRA, recipe). "
                    "Recipes: ':'-separated, each a ','-separated list of key[=value]: score weights "
                    "spn_ckpt, spn_lora, fro_ckpt, fro_lora, subspace, params with thr=LOG10 or size=MiB; "
                    "or kohya's rank=N, sv_ratio=P, sv_fro=P, sv_cumulative=P; rescale=F.",
        epilog="A LORA of the form 'a.safetensors:0.7,b.safetensors:0.3' is merged with those weights first.")
    res.add_argument("checkpoint", metavar="CHECKPOINT",
                     help="base model the LoRAs were trained on ('none' when no recipe uses *_ckpt/subspace); "
                          "CHECKPOINT and each LORA take " + _SOURCES)
    res.add_argument("loras", nargs="+", metavar="LORA")
    res.add_argument("-o", "--output-folder", default=None, metavar="FOLDER",
                     help="the folder to write into (a folder, not a file: one file per LoRA and recipe, named "
                          "after the recipe); default: each local LoRA's own folder, else the current one")
    res.add_argument("-r", "--recipes", default="spn_ckpt=1,thr=-1.2", help="default: %(default)s")
    _add_dtype_option(res)
    _add_spelling_option(res, required=False)
    _add_run_options(res, "-v: totals, threshold, size and score quantiles; -vv: every layer's old -> new rank")
    _add_resume_options(res, "STEM.resize.journal beside the outputs")
    _add_source_options(res)
    res.set_defaults(func=_cmd_resize)


def _add_convert(commands):
    conv = commands.add_parser(
        "convert", help="rewrite LoRAs in the spelling a client loads (kohya, ComfyUI, diffusers, PEFT)",
        description="Read each LoRA as its trainer wrote it (kohya, LyCORIS, musubi-tuner, OneTrainer, ComfyUI, "
                    "ai-toolkit, DiffSynth-Studio, diffusers, PEFT folders: each with its own alpha rule) and write "
                    "it whole in the spelling a client loads. Module paths that differ between spellings change "
                    "through the base checkpoint's map (only its header is read); what the target cannot load is "
                    "named in one line and left out.")
    conv.add_argument("checkpoint", metavar="CHECKPOINT",
                      help="the base model the LoRAs were trained on, or 'none' where the module paths stay as "
                           "they are (e.g. PEFT folder <-> diffusers file); takes " + _SOURCES)
    conv.add_argument("loras", nargs="+", metavar="LORA")
    _add_spelling_option(conv, required=True)
    conv.add_argument("-o", "--output-folder", default=None, metavar="FOLDER",
                      help="the folder to write into (STEM_SPELLING.safetensors, a folder for peft); default: "
                           "each local LoRA's own folder, else the current one")
    _add_dtype_option(conv)
    _add_run_options(conv, "-vv: every layer")
    _add_resume_options(conv, "STEM.resize.journal beside the outputs")
    _add_source_options(conv)
    conv.set_defaults(func=_cmd_convert)


def _add_dtype_option(p):
    p.add_argument("-t", "--dtype", type=_dtype_value, default=None,
                   help="output precision: bf16, fp16 (or 16) or fp32 (or 32) (default: the input's)")


def _add_run_options(p, verbose_help):
    """A resize's or conversion's device, verbosity and output options."""
    p.add_argument("-d", "--device", type=_device_value, default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("-v", "--verbose", action="count", default=0, help=verbose_help)
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


_SPELLINGS = ("kohya", "comfy", "diffusers", "peft")


def _add_spelling_option(p, required):
    p.add_argument("--to", choices=_SPELLINGS, required=required, default=None,
                   help="the output's spelling: kohya (lora_unet_: kohya, A1111/Forge, ComfyUI), comfy "
                        "(diffusion_model.: ComfyUI), diffusers (transformer./unet. + lora_A/B with its adapter "
                        "metadata: load_lora_weights), peft (a save_pretrained folder: PeftModel.from_pretrained)"
                        + ("" if required else "; default: the input's own"))


def main(argv=None):
    """Entry point of `lora-colab` and `python -m lora_colab`; returns the exit status."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the command ran (parsing): nothing was written
        print("lora-colab: interrupted; no partial output was kept", file=sys.stderr)
        return 130


def _main(argv):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        _import_torch_holding_ctrl_c()
        return args.func(args)
    except LoraColabError as exc:
        print(f"lora-colab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        said = str(exc) if isinstance(exc, Interrupted) else "interrupted; no partial output was kept"
        print(f"lora-colab: {said}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lora-colab inspect --json | head`: the reader left, nothing to report
        _silence_stdout()
        return 0


def _import_torch_holding_ctrl_c():
    """Import torch with Ctrl-C held back until the import is done: an interrupt inside torch's native
    import is lost, or aborts the process (pybind11 error_already_set, exit 134). Held, it is honoured right
    after the import as a KeyboardInterrupt (exit 130, nothing written)."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread() or "torch" in sys.modules:
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        import torch  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def _silence_stdout():
    """Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    import os
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
