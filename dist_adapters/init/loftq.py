"""LoftQ: quantize a base weight and start LoRA at the low-rank part of the quantization error.

    W  ~  Q + s * B @ A          s = lora_alpha / r (the adapter's own scaling)

Alternating, as in the paper (arXiv 2310.08659) and peft: Q = quant(W - s*B@A), then B, A from the
rank-r SVD of (W - Q) / s, singular values split as sqrt into both factors. Unlike peft 0.21:
- the scaling is honoured (peft fits B@A to W - Q, so with lora_alpha != r the adapter's actual
  delta s*B@A over- or under-corrects);
- the SVD is a randomized range finder with power iterations, warm-started from the previous
  iteration's singular vectors (the residual changes little between iterations), instead of a full
  SVD per matrix: O(m*n*r) instead of O(m*n*min(m, n));
- runs on whatever device the weight is on (CPU included), needs no bitsandbytes;
- ``loftq_model_dir`` streams a safetensors checkpoint tensor by tensor (peak memory ~ one matrix).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Callable, Optional, Union

import torch
from torch import nn

from ..checkpoint.safetensors_stream import StreamError, TensorFiles, read_header, rewrite_file
from ..control import adapter_layers, unwrap
from ..layers.lora import LoraLinear
from ..names import PREFIX, WEIGHTS_NAME, clean_name
from ..parallel.access import full_weights


class LoftQInputError(StreamError):
    """A problem with the user's input (paths, options, files); the CLI prints it as one line."""


# ----------------------------------------------------------------------------- NF quantization

_NF_OFFSET = 0.9677083  # the quantile of the outermost level, as in QLoRA / bitsandbytes / peft


def nf_code_book(bits: int, device=None) -> torch.Tensor:
    """The normal-float levels in [-1, 1], sorted: quantiles of N(0, 1), asymmetric with an exact
    zero (2**(bits-1) positive levels, one fewer negative). For bits=4 these are bitsandbytes'
    nf4 values (to 1e-7); ``ndtri`` (inverse normal CDF) spares the scipy dependency."""
    if bits not in (2, 4, 8):
        raise LoftQInputError(f"bits must be 2, 4 or 8, got {bits!r}")
    half = 2 ** bits // 2
    pos = torch.special.ndtri(torch.linspace(_NF_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(_NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.max()).to(device=device, dtype=torch.float32)


def quantize(w: torch.Tensor, bits: int = 4, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax NF quantization of ``w`` in storage order (for a Linear weight [out, in]:
    blocks run along the input dim, as bitsandbytes). Returns (codes uint8 [numel], scales fp32
    [blocks]); a last partial block is zero-padded (zeros never raise its absmax)."""
    flat = w.detach().reshape(-1).float()
    pad = (-flat.numel()) % block_size
    blocks = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, block_size)
    scales = blocks.abs().amax(dim=1)
    # multiply by the reciprocal and clamp, as bitsandbytes does, so ties fall the same way
    scaled = (blocks * (1.0 / scales.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1)
    book = nf_code_book(bits, flat.device)
    # nearest level = bucket between midpoints: O(n log k) time, int32 out; an argmin over
    # |x - level| would build an n x 2**bits tensor (16 GB for a 4096^2 matrix at 8 bits)
    codes = torch.bucketize(scaled.view(-1)[: flat.numel()], (book[1:] + book[:-1]) / 2, out_int32=True)
    return codes.to(torch.uint8), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, shape, bits: int = 4, block_size: int = 64,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    numel = codes.numel()
    values = nf_code_book(bits, codes.device).index_select(0, codes.int())
    pad = (-numel) % block_size
    values = torch.nn.functional.pad(values, (0, pad)) if pad else values
    values.view(-1, block_size).mul_(scales.unsqueeze(1))  # in place: no second full-size tensor
    return values[:numel].view(shape).to(dtype)


def quantize_dequantize(w: torch.Tensor, bits: int = 4, quantizer: str = "torch", block_size: int = 64) -> torch.Tensor:
    """Q as fp32: what the base weight becomes after quantization. ``quantizer="bnb"`` (bits=4 only)
    uses bitsandbytes' own nf4 kernels (blocksize 64, no double quant, as peft's LoftQ)."""
    if quantizer == "bnb":
        if bits != 4:
            raise LoftQInputError("quantizer='bnb' supports bits=4 (nf4) only")
        try:
            import bitsandbytes.functional as bnbf
        except ImportError as exc:
            raise LoftQInputError("quantizer='bnb' needs bitsandbytes (pip install dist_adapters[quant])") from exc
        if w.device.type == "cpu" and w.shape[-1] % block_size:
            # bitsandbytes 0.50's CPU nf4 kernels mis-quantize rows whose length is not a multiple of the
            # block size: a [64, 32] weight comes back with relative error 0.27, not nf4's 0.09
            # (docs/field-notes.md)
            raise LoftQInputError(f"quantizer='bnb' on CPU needs rows whose length is a multiple of {block_size}, got "
                                  f"a weight of shape {tuple(w.shape)}; use quantizer='torch' (the same nf4 grid)")
        packed, state = bnbf.quantize_4bit(w.float().contiguous(), blocksize=block_size, compress_statistics=False,
                                           quant_type="nf4")
        return bnbf.dequantize_4bit(packed, state).float()
    if quantizer != "torch":
        raise LoftQInputError(f"quantizer must be 'torch' or 'bnb', got {quantizer!r}")
    codes, scales = quantize(w, bits, block_size)
    return dequantize(codes, scales, w.shape, bits, block_size)


# ----------------------------------------------------------------------------- low rank

def low_rank(m: torch.Tensor, r: int, svd: str = "auto", oversample: int = 16, power_iters: int = 8,
             start: Optional[torch.Tensor] = None, seed: int = 0):
    """Top-r singular triplets (U [rows, r], S [r], Vh [r, cols]) of ``m`` (fp32).

    "exact": ``torch.linalg.svd``. "randomized": block Krylov range finder on r + oversample random
    directions (``start``, rows of a previous Vh, replaces the first ones) with ``power_iters``
    products by m m^T, keeping every block, each orthogonalised against the earlier ones (block
    Gram-Schmidt, twice) so the basis K stays orthonormal without a QR of the whole of it; then
    Rayleigh-Ritz: the eigenvectors of (K^T m)(K^T m)^T, a small [p, p] matrix in float64, give the
    singular vectors (an SVD of the wide K^T m would cost 3x more and gives the same triplets). A
    quantization residual has a flat, noise-like spectrum where plain subspace iteration converges
    slowly; the Krylov basis reaches the exact SVD's error at the same number of products. "auto":
    randomized when the Krylov basis is at most half the smaller side (r=16: sides >= 576). The
    fixed seed makes every rank compute the same factors."""
    if svd not in ("auto", "exact", "randomized"):
        raise LoftQInputError(f"svd must be 'auto', 'exact' or 'randomized', got {svd!r}")
    k, side = min(r + oversample, *m.shape), min(m.shape)
    basis = k * (power_iters + 1)
    if svd == "exact" or basis >= side or (svd == "auto" and 2 * basis > side):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    else:
        gen = torch.Generator(device=m.device).manual_seed(seed)
        omega = torch.randn(m.shape[1], k, generator=gen, device=m.device, dtype=m.dtype)
        if start is not None:
            omega[:, : start.shape[0]] = start.T
        block = torch.linalg.qr(m @ omega).Q
        krylov = block
        for _ in range(power_iters):
            z = m @ torch.linalg.qr(m.T @ block).Q
            for _ in range(2):  # twice is enough (Giraud et al.): orthogonal to machine precision
                z = z - krylov @ (krylov.T @ z)
            block = torch.linalg.qr(z).Q
            krylov = torch.cat([krylov, block], dim=1)
        proj = krylov.T @ m  # [p, cols]
        evals, evecs = torch.linalg.eigh((proj.double() @ proj.double().T))  # ascending
        evecs = evecs[:, -r:].flip(1).to(m.dtype)
        s = evals[-r:].flip(0).clamp(min=0).sqrt().to(m.dtype)
        u = krylov @ evecs
        vh = (evecs.T @ proj) / s.clamp(min=torch.finfo(m.dtype).tiny).unsqueeze(1)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    if s.numel() < r:  # r above the matrix rank: the extra directions carry nothing
        extra = r - s.numel()
        u, s = torch.nn.functional.pad(u, (0, extra)), torch.nn.functional.pad(s, (0, extra))
        vh = torch.nn.functional.pad(vh, (0, 0, 0, extra))
    return u, s, vh


@torch.no_grad()
def loftq_factors(weight: torch.Tensor, r: int, bits: int = 4, iters: int = 1, scaling: float = 1.0,
                  svd: str = "auto", oversample: int = 16, power_iters: int = 8, quantizer: str = "torch",
                  stats: Optional[dict] = None):
    """LoftQ for one weight [out, in] on its own device. Returns (Q in ``weight.dtype``, A [r, in]
    fp32, B [out, r] fp32) with W ~ Q + scaling * B @ A. ``stats`` (a dict) receives the Frobenius
    norms ``weight``, ``quant_error`` (||W - quant(W)||) and ``loftq_error`` (||W - Q - s*B@A||)."""
    if iters < 1:
        raise LoftQInputError(f"iters must be >= 1, got {iters!r}")
    w = weight.detach().float()
    low = None  # s * B @ A of the previous iteration
    vh = None
    for i in range(iters):
        q = quantize_dequantize(w if low is None else w - low, bits, quantizer)
        low = None  # free it before the next full-size tensor: peak memory is a few matrices
        residual = w - q
        if i == 0 and stats is not None:
            stats.update(weight=w.norm().item(), quant_error=residual.norm().item())
        u, s, vh = low_rank(residual, r, svd, oversample, power_iters, start=vh)
        low = (u * s) @ vh
    # the adapter adds scaling * B @ A, so B @ A must be (W - Q) / scaling: sqrt(S / s) on each side
    root = (s / scaling).sqrt()
    a, b = root.unsqueeze(1) * vh, u * root
    if stats is not None:
        stats["loftq_error"] = (residual - low).norm().item()
    return q.to(weight.dtype), a, b


# ----------------------------------------------------------------------------- layers in a model

def apply_loftq(model: nn.Module, config, adapter_name: str, wrapper: Optional[nn.Module] = None) -> int:
    """``inject``'s ``init_lora_weights="loftq"``: for every LoraLinear of ``adapter_name`` the base
    weight becomes Q and the factors LoftQ's, one layer at a time inside the engine's
    ``full_weights``. ``wrapper``: the model as the caller holds it (an engine wrapper), if not
    ``model`` itself."""
    from tqdm.auto import tqdm

    layers = []
    for name, layer in adapter_layers(model):
        if adapter_name not in getattr(layer, "r", {}):
            continue
        if not isinstance(layer, LoraLinear):
            raise ValueError(f"init_lora_weights='loftq' supports linear layers only; {name!r} is of type "
                             f"{type(layer.base_layer).__name__}: leave it out of target_modules")
        if not torch.is_floating_point(layer.base_layer.weight) or type(layer.base_layer).__module__.startswith(
                "bitsandbytes"):
            raise ValueError(f"init_lora_weights='loftq' quantizes the base itself, but {name!r} is already "
                             "quantized: pass the unquantized model, or use replace_lora_weights_loftq")
        layers.append((name, layer))
    bits, iters = config.loftq_config.loftq_bits, config.loftq_config.loftq_iter
    for name, layer in tqdm(layers, desc="LoftQ", disable=None):
        with full_weights(layer, wrapper or model), torch.no_grad():
            weight = layer.base_layer.weight
            w = weight.T if layer.fan_in_fan_out else weight  # factors are always [r, in] / [out, r]
            q, a, b = loftq_factors(w, layer.r[adapter_name], bits, iters, layer.scaling[adapter_name])
            weight.data.copy_(q.T if layer.fan_in_fan_out else q)
            layer.lora_A[adapter_name].weight.data.copy_(a)
            layer.lora_B[adapter_name].weight.data.copy_(b)
    return len(layers)


@torch.no_grad()
def replace_lora_weights_loftq(model: nn.Module, model_dir_or_state: Union[str, dict], adapter_name: str = "default",
                               callback: Optional[Callable[[nn.Module, str], bool]] = None, svd: str = "auto") -> int:
    """One LoftQ step for LoRA layers over bitsandbytes ``Linear4bit`` bases (as peft's function of
    the same name): W is read from the original safetensors (a directory, a file, or a state dict),
    Q is the layer's stored 4-bit weight dequantized, and A, B become the rank-r SVD of
    (W - Q) / scaling. The base keeps its codes. ``callback(model, name) -> bool``: False rolls the
    layer back. Returns the number of layers changed."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise LoftQInputError("replace_lora_weights_loftq needs bitsandbytes (pip install dist_adapters[quant])") from exc
    source = model_dir_or_state if isinstance(model_dir_or_state, dict) else TensorFiles(model_dir_or_state)
    prefix = getattr(unwrap(model), "base_model_prefix", "") or ""
    found, changed = 0, 0
    for name, layer in adapter_layers(model):
        base = getattr(layer, "base_layer", None)
        if not (isinstance(layer, LoraLinear) and adapter_name in layer.r and isinstance(base, bnb.nn.Linear4bit)):
            continue
        found += 1
        key = clean_name(name) + ".weight"
        # checkpoints saved from the bare backbone lack its prefix ("model."), and the reverse
        alt = key[len(prefix) + 1:] if key.startswith(prefix + ".") else f"{prefix}.{key}"
        if key not in source and alt not in source:
            raise KeyError(f"LoRA layer {name!r}: no tensor {key!r} among the original weights")
        w = source[key if key in source else alt]
        with full_weights(layer, model):
            q = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
            u, s, vh = low_rank(w.to(q.device, torch.float32) - q, layer.r[adapter_name], svd)
            fa, fb = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            before = (fa.data.clone(), fb.data.clone()) if callback else None
            root_s = (s / layer.scaling[adapter_name]).sqrt()
            fa.data.copy_(root_s.unsqueeze(1) * vh)
            fb.data.copy_(u * root_s)
        if callback is not None and not callback(model, name):
            with full_weights(layer, model):
                fa.data.copy_(before[0])
                fb.data.copy_(before[1])
            continue
        changed += 1
    if found == 0:
        raise ValueError(f"no LoRA layer of adapter {adapter_name!r} over a bitsandbytes Linear4bit in the model")
    return changed


# ----------------------------------------------------------------------------- safetensors, streamed

# embeddings and output heads, by the last name segment; by name only: a shape rule (a dimension equal
# to the vocabulary size) would also drop MLPs whose width happens to equal it
_EMBEDDING_LIKE = re.compile(r"(^|.*\.)(embed[^.]*|[^.]*embeddings|wte|wpe|lm_head|embed_out)$|^output$")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def select_targets(headers: dict, target_modules) -> list[str]:
    """Module names (tensor name without ``.weight``) of the 2-D float weights to LoftQ.
    "all-linear": every one except embeddings and output heads (lm_head, embed_out, output); a list: names equal to an entry or ending with "." + entry (peft's rule); a
    str: full-match regex. An entry that matches nothing is an error (a typo would skip layers)."""
    mats = [k[: -len(".weight")] for k, v in headers.items()
            if k.endswith(".weight") and len(v["shape"]) == 2 and v["dtype"] in _FLOAT_DTYPES]
    if target_modules == "all-linear":
        chosen = [m for m in mats if not _EMBEDDING_LIKE.match(m)]
    elif isinstance(target_modules, str):
        chosen = [m for m in mats if re.fullmatch(target_modules, m)]
    else:
        chosen = [m for m in mats if any(m == t or m.endswith("." + t) for t in target_modules)]
        missing = [t for t in target_modules if not any(m == t or m.endswith("." + t) for m in chosen)]
        if missing:
            raise LoftQInputError(f"target module {missing[0]!r} matches no 2-D weight in the checkpoint")
    if not chosen:
        raise LoftQInputError(f"target_modules={target_modules!r} selects no 2-D weight in the checkpoint")
    return sorted(chosen)


_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf)$")  # never copied: W is replaced


def _checked_model_config(model_dir: str, out_dir: str, bits: int, r: int, iters: int) -> dict:
    """The model's config.json (empty when absent), after the checks that can fail on input."""
    if not os.path.isdir(model_dir):
        raise LoftQInputError(f"model directory {model_dir!r} does not exist")
    if bits not in (2, 4, 8):
        raise LoftQInputError(f"--bits must be 2, 4 or 8, got {bits}")
    if r < 1 or iters < 1:
        raise LoftQInputError(f"rank and iters must be >= 1, got rank={r}, iters={iters}")
    src, out = os.path.realpath(model_dir), os.path.realpath(out_dir)
    if out == src or out.startswith(src + os.sep):
        raise LoftQInputError(f"output {out_dir!r} is the model directory or inside it; the source is never modified")
    cfg_path = os.path.join(model_dir, "config.json")
    cfg = {}
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    if cfg.get("quantization_config"):
        raise LoftQInputError(f"{model_dir!r} is already quantized (config.json has quantization_config); "
                              "LoftQ needs the full-precision weights")
    return cfg


def loftq_model_dir(model_dir: str, out_dir: str, bits: int = 4, r: int = 16, iters: int = 1,
                    lora_alpha: Optional[float] = None, target_modules="all-linear", svd: str = "auto",
                    quantizer: str = "torch", fan_in_fan_out: Optional[bool] = None, progress: bool = True) -> dict:
    """LoftQ over a Hugging Face model directory without loading the model: each targeted weight is
    read, replaced by Q and factored, one tensor at a time. Writes ``out_dir`` (same files and
    layout, Q in place of W, config / tokenizer files copied) and ``out_dir/loftq_init`` (a PEFT
    adapter: init_lora_weights true, base_model_name_or_path = out_dir). ``model_dir`` is only read.
    Returns a summary (paths, module count, summed errors)."""
    from tqdm.auto import tqdm

    from ..checkpoint.atomic import atomic_path
    from ..config import LoraConfig

    cfg = _checked_model_config(model_dir, out_dir, bits, r, iters)
    out = os.path.realpath(out_dir)
    files = TensorFiles(model_dir)
    headers = {k: v for f in files.files for k, v in read_header(f)[0].items() if k != "__metadata__"}
    targets = set(select_targets(headers, target_modules))
    if fan_in_fan_out is None:  # transformers' Conv1D (GPT-2) stores weights as [in, out]
        fan_in_fan_out = cfg.get("model_type") == "gpt2"
    alpha = float(r if lora_alpha is None else lora_alpha)
    factors: dict[str, torch.Tensor] = {}
    totals = {"weight": 0.0, "quant_error": 0.0, "loftq_error": 0.0}

    def replace(name: str) -> Optional[torch.Tensor]:
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module not in targets:
            return None
        w = files[name]
        stats: dict = {}
        q, a, b = loftq_factors(w.T if fan_in_fan_out else w, r, bits, iters, alpha / r, svd,
                                quantizer=quantizer, stats=stats)
        for key in totals:
            totals[key] += stats[key] ** 2
        factors[f"{PREFIX}{module}.lora_A.weight"] = a.contiguous()
        factors[f"{PREFIX}{module}.lora_B.weight"] = b.contiguous()
        return q.T if fan_in_fan_out else q

    os.makedirs(out_dir, exist_ok=True)
    with tqdm(total=len(headers), desc="LoftQ", unit="tensor", disable=not progress) as bar:
        for path in files.files:
            rewrite_file(path, os.path.join(out_dir, os.path.basename(path)), replace, bar)
    for fname in sorted(os.listdir(model_dir)):  # config, tokenizer, index (layout unchanged), code
        if os.path.isfile(os.path.join(model_dir, fname)) and not _WEIGHT_FILE.match(fname):
            with atomic_path(os.path.join(out_dir, fname)) as tmp:
                shutil.copyfile(os.path.join(model_dir, fname), tmp)
    adapter_dir = os.path.join(out_dir, "loftq_init")
    os.makedirs(adapter_dir, exist_ok=True)
    from safetensors.torch import save_file

    with atomic_path(os.path.join(adapter_dir, WEIGHTS_NAME)) as tmp:
        save_file(dict(sorted(factors.items())), tmp, metadata={"format": "pt"})
    task = "CAUSAL_LM" if any(a.endswith("ForCausalLM") for a in cfg.get("architectures") or []) else None
    LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(targets), init_lora_weights=True, task_type=task,
               fan_in_fan_out=fan_in_fan_out, base_model_name_or_path=out).save(adapter_dir, inference_mode=True)
    return {"model_dir": out_dir, "adapter_dir": adapter_dir, "modules": len(targets),
            **{k: v ** 0.5 for k, v in totals.items()}}
