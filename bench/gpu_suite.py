"""The GPU figures in one command, one JSON line each: harvest, every architecture's step, the loader, a sweep.

    .venv/bin/python bench/gpu_suite.py                  # on one GPU; under 8 minutes on one H200
    .venv/bin/python bench/gpu_suite.py --smoke          # tiny shapes on the CPU in seconds (tests/test_gpu_suite.py)

Lines, in order (every line has "bench"):
  device       the GPU, and the peak bf16 dense tensor TFLOP/s taken from PEAK_BF16_TFLOPS by its name (null
               when the name is not in the table, and always on the CPU).
  harvest      `harvest()` (the real one: text, forward passes, bf16 storage, compression, shards) of a
               random-init gemma-2-2b-shaped model built in memory from transformers.Gemma2Config (26 layers, d_model
               2304, d_mlp 9216, 8 heads, 4 KV heads, head_dim 256, vocab 256000; bf16), booted through
               transformer-lens's TransformerBridge as `sae harvest` boots a checkpoint, reading layer 12 (blocks 0-12
               built and run). Also the bare forward pass on the same contexts. Model-FLOPs utilisation = 2 * (the
               parameters of the blocks run) * tokens/s / peak: the embedding is a lookup and the unembedding is not
               run; attention's T^2 term is left out, as in the usual 2*params*tokens count.
  encoder_gemm the bound: the encoder GEMM alone at the training shape, timed by bench/train_bench.py (reused).
  train_step   per architecture at d=2304, F=16384, k=32, B=4096 (bf16 autocast on a GPU): tokens/s, the fraction
               of the bound measured in the same process, and SAELens's step where its virtualenv is there.
  loader       the training loader's rate into GPU memory (pinned host batches, non-blocking copies) from a bf16
               and an int8 cache of the same synthetic rows: tokens/s, GB/s of stored bytes and of bf16 rows.
  sweep        `sae train`'s one pass over 4 SAEs (TopK and BatchTopK, k=16 and 32) with the real loader.
  sae_lens     whether SAELens was measured, and why not where it was not.
  scaling      the command that measures sae train on 1 vs N GPUs under torchrun (bench/scaling_bench.py).

SAELens runs in its own virtualenv (bench/saelens_env.py, --venv); it is built only where PyPI answers (a lent
GPU machine has no network: build the virtualenv beforehand, or the train_step lines carry null for it).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harvest_bench import forward_only  # noqa: E402
from saelens_env import DEFAULT_VENV, saelens_python  # noqa: E402
from train_bench import SAELENS_ARCHS, encoder_gemm_bound, ours, saelens  # noqa: E402

from sae_cache.harvest.run import harvest  # noqa: E402
from sae_cache.sae_common.allocator import retain_freed_memory  # noqa: E402
from sae_cache.sae_common.architectures import ARCHS  # noqa: E402
from sae_cache.sae_common.cache_format import open_cache, row_bytes  # noqa: E402
from sae_cache.sae_common.config import HarvestConfig, TrainConfig, hook_names  # noqa: E402
from sae_cache.sae_common.model import ASSETS, LoadedModel  # noqa: E402
from sae_cache.train.loader import ActivationLoader  # noqa: E402
from sae_cache.train.run import train  # noqa: E402
from tests.cache_utils import write_cache  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, without 2:4 sparsity) from NVIDIA's data sheets; matched against
# torch.cuda.get_device_name() in this order (the first name it contains).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}
FULL = dict(layer=12, n_layers=26, d_model=2304, d_mlp=9216, heads=8, kv_heads=4, head_dim=256, vocab=256000,
            harvest_tokens=1_000_000, context=1024, harvest_batch=16, d=2304, F=16384, k=32, B=4096, steps=20,
            loader_mb=1024, rows_per_shard=None, sweep_batches=100)
SMOKE = dict(layer=1, n_layers=3, d_model=64, d_mlp=128, heads=4, kv_heads=2, head_dim=16, vocab=None,
             harvest_tokens=2048, context=64, harvest_batch=8, d=16, F=64, k=4, B=64, steps=2, loader_mb=0,
             rows_per_shard=256, sweep_batches=4)
SWEEP = (("topk", "batchtopk"), (16, 32))
HOOK = "blocks.0.hook_resid_post"  # of the synthetic loader and sweep caches


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_tflops(device: str) -> tuple[float | None, str]:
    if not device.startswith("cuda"):
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    return next(((v, name) for k, v in PEAK_BF16_TFLOPS.items() if k in name), (None, name))


# -- harvest -----------------------------------------------------------------------------------------------

def gemma2_in_memory(s: dict, device: str) -> tuple[LoadedModel, int]:
    """The gemma-2-2b shape (tiny in --smoke), random weights, blocks up to s["layer"] only, booted through the
    bridge; and the parameter count of the blocks run."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config

    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-stdlib-gpt2")  # its ids fit any vocab at least this large
    config = Gemma2Config(vocab_size=s["vocab"] or len(tok), hidden_size=s["d_model"], intermediate_size=s["d_mlp"],
                          num_hidden_layers=s["layer"] + 1, num_attention_heads=s["heads"],
                          num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"], bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    config.architectures = ["Gemma2ForCausalLM"]
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: no 5 GB copy from the host
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    block_params = sum(p.numel() for p in model.model.layers.parameters())
    bridge = TransformerBridge.boot_transformers("gemma-2-2b-random", hf_model=model, tokenizer=tok, device=device,
                                                 dtype=torch.bfloat16)
    bridge.eval()
    loaded = LoadedModel(bridge, tok, "gemma-2-2b-random (in memory)", s["n_layers"], s["layer"] + 1, "bfloat16")
    return loaded, block_params


def harvest_figures(s: dict, device: str, work: Path, peak: float | None) -> dict:
    loaded, block_params = gemma2_in_memory(s, device)
    text = (ASSETS / "stdlib-sample.txt").read_text()
    repeats = -(-s["harvest_tokens"] // 300_000) + 1  # the sample holds over 300K tokens of its tokenizer
    (work / "text.txt").write_text("\n\n".join([text] * repeats))
    cfg = HarvestConfig(model="gemma-2-2b-random", layers=(s["layer"],), dataset=str(work / "text.txt"),
                        tokens=s["harvest_tokens"], context_size=s["context"], batch_size=s["harvest_batch"],
                        device=device)
    forward = forward_only(cfg, loaded)
    t0 = time.perf_counter()
    cache = open_cache(harvest(cfg, work / "harvest.zarr", loaded=loaded, console=Console(file=io.StringIO())))
    seconds = time.perf_counter() - t0
    tok_s = cache.n_tokens / seconds
    mfu = (lambda rate: None if peak is None else float(f"{2 * block_params * rate / (peak * 1e12):.3g}"))
    return {"bench": "harvest", "model": "gemma-2-2b-random" if s["vocab"] else "tiny-gemma2-random",
            "layer": s["layer"], "hook": hook_names(cfg.layers, cfg.hook)[0], "d_model": s["d_model"],
            "blocks_run": s["layer"] + 1, "block_params": block_params, "tokens": cache.n_tokens,
            "context_size": s["context"], "batch_size": s["harvest_batch"], "stored_dtype": cfg.dtype,
            "harvest_tokens_per_s": round(tok_s), "forward_only_tokens_per_s": round(forward),
            "mfu_harvest": mfu(tok_s), "mfu_forward_only": mfu(forward), "wall_s": round(seconds, 2)}


# -- training step, loader, sweep --------------------------------------------------------------------------

def saelens_venv(venv: Path, smoke: bool) -> tuple[Path | None, str]:
    """SAELens's python where its virtualenv exists, or can be built (never in --smoke: it takes minutes)."""
    if (venv / "bin" / "python").exists():
        return saelens_python(venv), "its virtualenv is there"
    if smoke:
        return None, f"no virtualenv at {venv} (--smoke never builds one)"
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
    except OSError:
        return None, f"no virtualenv at {venv} and PyPI is unreachable to build one"
    python = saelens_python(venv)
    return python, "built its virtualenv" if python else "its virtualenv could not be built (see stderr)"


def train_figures(s: dict, device: str, dtype: str, venv: Path | None) -> list[dict]:
    shape = dict(d=s["d"], F=s["F"], k=s["k"], B=s["B"], steps=s["steps"], device=device, dtype=dtype)
    bound = encoder_gemm_bound(s["d"], s["F"], s["B"], s["steps"], device, dtype)
    rows = [{"bench": "encoder_gemm", **shape, "tokens_per_s": round(bound),
             "tflops": round(2 * s["d"] * s["F"] * bound / 1e12, 3)}]
    for arch in ARCHS:
        rate = ours(arch, s["d"], s["F"], s["B"], s["k"], s["steps"], device, dtype, True)
        theirs = (saelens(venv, arch, s["d"], s["F"], s["B"], s["k"], s["steps"], device)
                  if venv is not None and arch in SAELENS_ARCHS else None)
        rows.append({"bench": "train_step", "arch": arch, **shape, "tokens_per_s": round(rate),
                     "encoder_gemm_tokens_per_s": round(bound), "fraction_of_encoder_gemm_bound": round(rate / bound, 3),
                     "sae_lens_tokens_per_s": None if theirs is None else round(theirs),
                     "ratio_vs_sae_lens": None if theirs is None else round(rate / theirs, 2)})
    return rows


def synthetic_caches(s: dict, work: Path) -> dict[str, Path]:
    """A bf16 and an int8 cache of the same rows (about loader_mb MB as bf16), held-out tail included."""
    n = max(16 * s["B"], s["loader_mb"] * 2**20 // (2 * s["d"])) // 128 * 128
    x_ND = torch.randn(n, s["d"], generator=torch.Generator().manual_seed(0)) * 3 + 1
    return {dtype: write_cache(work / f"{dtype}.zarr", x_ND, context_size=128, dtype=dtype, hook=HOOK,
                               rows_per_shard=s["rows_per_shard"])
            for dtype in ("bfloat16", "int8")}


def loader_figures(s: dict, device: str, caches: dict[str, Path]) -> list[dict]:
    rows = []
    for dtype, path in caches.items():
        cache = open_cache(path)
        n_batches = 2 * cache.n_tokens // s["B"]  # two epochs of every row
        loader = ActivationLoader(cache, HOOK, batch_size=s["B"], n_batches=n_batches, rows=(0, cache.n_tokens),
                                  device=device, workers=4 if device.startswith("cuda") else 2)
        it = iter(loader)
        next(it)  # the first window is decoded before anything is served, once per run
        sync(device)
        t0 = time.perf_counter()
        served = sum(1 for _ in it)
        sync(device)
        tok_s = served * s["B"] / (time.perf_counter() - t0)
        rows.append({"bench": "loader", "stored_dtype": dtype, "device": device, "d": s["d"], "B": s["B"],
                     "tokens_per_s": round(tok_s), "stored_gb_per_s": round(tok_s * row_bytes(s["d"], dtype) / 1e9, 3),
                     "bf16_gb_per_s": round(tok_s * s["d"] * 2 / 1e9, 3)})
    return rows


def sweep_figures(s: dict, device: str, dtype: str, cache: Path, work: Path) -> dict:
    archs, ks = SWEEP
    tokens = s["sweep_batches"] * s["B"]
    cfg = TrainConfig(cache=str(cache), archs=archs, ks=ks, dict_sizes=(s["F"],), batch_size=s["B"], tokens=tokens,
                      log_every=10**9, checkpoint_every=10**15, device=device, dtype=dtype)
    t0 = time.perf_counter()
    train(cfg, out=work / "sweep", console=Console(file=io.StringIO()))
    seconds = time.perf_counter() - t0
    return {"bench": "sweep", "saes": len(archs) * len(ks), "archs": list(archs), "ks": list(ks), "d": s["d"],
            "F": s["F"], "B": s["B"], "tokens": tokens, "device": device, "dtype": dtype, "wall_s": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds), "sae_tokens_per_s": round(len(archs) * len(ks) * tokens / seconds)}


def scaling_line(device: str) -> dict:
    """The multi-GPU figure is its own command: torchrun needs the whole node, and this suite runs in one process."""
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    n = max(gpus, 2)
    return {"bench": "scaling", "gpus": gpus, "measured": False,
            "command": f".venv/bin/python bench/scaling_bench.py --device {'cuda' if gpus else 'cpu'} --nproc {n} "
                       f"--saes {2 * n} --d-model 2304 --tokens 4194304",
            "why": "sweep-parallel sae train on 1 vs N ranks under torchrun; run it beside this suite"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU unless --device says otherwise")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="SAELens's virtualenv")
    args = ap.parse_args()
    device = args.device or ("cpu" if args.smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench/gpu_suite.py: torch sees no CUDA device; run with --smoke on the CPU")
    s = SMOKE if args.smoke else FULL
    dtype = "bfloat16" if device.startswith("cuda") else "float32"  # bf16 autocast is for GPUs (TrainConfig.dtype)
    retain_freed_memory()  # as `sae` does when it starts
    peak, name = peak_tflops(device)
    emit({"bench": "device", "device": device, "name": name, "peak_bf16_tflops": peak, "smoke": args.smoke,
          "torch": torch.__version__})
    work = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    try:
        emit(harvest_figures(s, device, work, peak))
        venv, why = saelens_venv(args.venv, args.smoke)
        for row in train_figures(s, device, dtype, venv):
            emit(row)
        caches = synthetic_caches(s, work)
        for row in loader_figures(s, device, caches):
            emit(row)
        emit(sweep_figures(s, device, dtype, caches["bfloat16"], work))
        emit({"bench": "sae_lens", "measured": venv is not None, "why": why, "venv": str(args.venv)})
        emit(scaling_line(device))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
