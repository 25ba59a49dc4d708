"""LoRAs as the trainers write them, and the truth to hold our outputs to: the weight change the trainer's own
forward pass applies, read off each patched module by probing it (a Linear with the identity, a convolution
with one-hot patches), and the same read off the module once a client has loaded a file."""

import torch

TOL = 2e-4  # ‖client − optimum‖ / ‖change‖ allowed for float32 files (rounding of the factors only)


def _plain(module):
    """The nn.Linear / nn.Conv2d a LoRA wrapper (PEFT's base_layer) stands on, or the module itself."""
    return getattr(module, "base_layer", module)


def effective_weight(module):
    """The weight `module`'s forward applies (adapters included), as a 2-D float tensor [out, in·kh·kw]."""
    plain = _plain(module)
    with torch.no_grad():
        if isinstance(plain, torch.nn.Linear):
            eye = torch.eye(plain.in_features)
            return (module(eye) - module(torch.zeros(1, plain.in_features))).T.float()
        if isinstance(plain, torch.nn.Conv2d):
            c, (kh, kw) = plain.in_channels, plain.kernel_size
            (sh, sw), (ph, pw) = plain.stride, plain.padding
            i0, j0 = -(-ph // sh), -(-pw // sw)  # an output position whose window lies inside the input
            oh, ow = i0 * sh - ph, j0 * sw - pw
            x = torch.zeros(c * kh * kw, c, oh + kh, ow + kw)
            for n in range(c * kh * kw):
                ch, rest = divmod(n, kh * kw)
                a, b = divmod(rest, kw)
                x[n, ch, oh + a, ow + b] = 1.0
            y = module(x)[:, :, i0, j0] - module(torch.zeros(1, c, oh + kh, ow + kw))[:, :, i0, j0]
            return y.T.float()
    raise TypeError(f"cannot probe {type(plain).__name__}")


def weights(model, paths):
    """{module path: effective 2-D weight} of `model`'s modules at `paths`."""
    return {path: effective_weight(model.get_submodule(path)) for path in paths}


def changes(model, paths, base):
    """{path: effective weight − base weight} (`base`: {path: 2-D weight before any adapter})."""
    return {path: w - base[path] for path, w in weights(model, paths).items()}


def best(delta, k):
    """The best rank-k approximation of `delta` (truncated SVD)."""
    if k == 0:
        return torch.zeros_like(delta)
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vh[:k]).float()


def rel(a, b, scale):
    return float((a - b).norm()) / max(float(scale.norm()), 1e-30)


def dora(w0, delta, magnitude, axis):
    """DoRA's weight: magnitude · (W0 + ΔW) / ‖W0 + ΔW‖, the norm per output row ("out") or input column."""
    w = w0 + delta
    if axis == "out":
        return magnitude.reshape(-1, 1) * w / w.norm(dim=1, keepdim=True)
    cols = w.reshape(w.shape[0], magnitude.numel(), -1)
    norm = cols.pow(2).sum(dim=(0, 2)).sqrt()
    return (cols * (magnitude / norm).reshape(1, -1, 1)).reshape(w.shape)


def randomize(params, std=0.2, seed=0):
    """Fill trainable adapter tensors with random values (trainers initialise one factor at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def ranks_in(tensors, down_suffixes=(".lora_down.weight", ".lora_A.weight", ".lora_A.default.weight",
                                     ".lora_linear_layer.down.weight")):
    """{module name: rank} of a LoRA state dict."""
    out = {}
    for key, value in tensors.items():
        for suffix in down_suffixes:
            if key.endswith(suffix):
                out[key[: -len(suffix)]] = value.shape[0]
    return out


def within_optimum(got, truth, ranks, tol=TOL):
    """The modules whose change `got` is not the best rank-k approximation of `truth` ({path: (error, k)});
    `ranks`: {path: k kept}. Also asserts every module is present."""
    bad = {}
    for path, delta in truth.items():
        k = ranks[path]
        err = rel(got[path], best(delta, k), delta)
        if not err <= tol:
            bad[path] = (err, k)
    return bad


__all__ = ["TOL", "best", "changes", "dora", "effective_weight", "randomize", "ranks_in", "rel", "weights",
           "within_optimum"]
