"""Which 8-bit format for the cache: the error each adds to the stored activations, and its bytes after zstd.

Harvests the built-in model's activations in float32 (the reference), then stores the same rows as bf16 (the
default cache), int8 with one absmax scale per row (what `--dtype int8` writes), int8 with one scale per channel,
and fp8 e4m3 with one scale per row. One JSON line each: NMSE of the stored rows against float32 (squared error
over the variance about the mean, the SAE metric's normalisation) and bytes per element after Blosc zstd-1 (as
the cache compresses: byte shuffle for bf16, none for 1-byte codes), scales included.

    .venv/bin/python bench/quant_bench.py [--tokens 320K] [--layer 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from numcodecs import Blosc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sae_cache.harvest.run import harvest  # noqa: E402
from sae_cache.sae_common.cache_format import open_cache  # noqa: E402
from sae_cache.sae_common.config import HarvestConfig, parse_count  # noqa: E402
from sae_cache.sae_common.console import make_console  # noqa: E402
from sae_cache.sae_common.quantize import dequantize, quantize_int8  # noqa: E402

FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def zstd_bytes(a: np.ndarray, shuffle: int) -> int:
    return len(Blosc(cname="zstd", clevel=1, shuffle=shuffle, blocksize=1 << 20).encode(np.ascontiguousarray(a)))


def stored_forms(x_ND: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
    """Each format: (the rows as read back, float32; bytes on disk after zstd)."""
    bf16 = x_ND.bfloat16()
    codes, scales = quantize_int8(x_ND)
    scales_1D = x_ND.abs().amax(0, keepdim=True) / 127
    per_channel = torch.round(x_ND / scales_1D).clamp(-127, 127).to(torch.int8)
    fp8_scales = x_ND.abs().amax(1, keepdim=True) / FP8_MAX
    fp8 = (x_ND / fp8_scales).to(torch.float8_e4m3fn)
    return {
        "bfloat16": (bf16.float(), zstd_bytes(bf16.view(torch.int16).numpy(), Blosc.SHUFFLE)),
        "int8_per_row": (dequantize(codes, scales), zstd_bytes(codes.numpy(), Blosc.NOSHUFFLE) + 4 * len(x_ND)),
        "int8_per_channel": (per_channel.float() * scales_1D, zstd_bytes(per_channel.numpy(), Blosc.NOSHUFFLE)),
        "fp8_e4m3_per_row": (fp8.float() * fp8_scales,
                             zstd_bytes(fp8.view(torch.int8).numpy(), Blosc.NOSHUFFLE) + 4 * len(x_ND)),
        # the same codes with Blosc's bit shuffle: bit-planes of small codes are long runs of equal bits
        "int8_per_row_bitshuffle": (dequantize(codes, scales),
                                    zstd_bytes(codes.numpy(), Blosc.BITSHUFFLE) + 4 * len(x_ND)),
        "int8_per_channel_bitshuffle": (per_channel.float() * scales_1D,
                                        zstd_bytes(per_channel.numpy(), Blosc.BITSHUFFLE)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="320K")
    ap.add_argument("--layer", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="quant-bench-"))
    try:
        cfg = HarvestConfig(model="tiny-stdlib-gpt2", dataset="stdlib-sample", layers=(args.layer,),
                            tokens=parse_count(args.tokens), dtype="float32", device="cpu")
        cache = open_cache(harvest(cfg, work / "f32.zarr", console=make_console()))
        x_ND = cache.read_rows(cache.hooks[0], 0, cache.n_tokens).float()
        variance = (x_ND - x_ND.mean(0)).pow(2).sum()
        forms = stored_forms(x_ND)
        for name, (y_ND, nbytes) in forms.items():
            print(json.dumps({"bench": "quantised_cache", "format": name, "tokens": len(x_ND), "d": x_ND.shape[1],
                              "nmse_vs_float32": float(f"{((y_ND - x_ND).pow(2).sum() / variance).item():.3g}"),
                              "bytes_per_element": round(nbytes / x_ND.numel(), 4),
                              "bytes_vs_bfloat16": round(nbytes / forms["bfloat16"][1], 4)}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
