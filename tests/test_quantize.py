"""The int8 cache: the rounding bound from the maths, the plain-zarr recipe of the README, checksums over the scales,
the loader equal to a float cache of the same values, and harvest -> train -> eval on an int8 cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from sae_cache.sae_common import cache_format
from sae_cache.sae_common.cache_format import CacheError, open_cache, verify
from sae_cache.sae_common.cli import main
from sae_cache.sae_common.quantize import QMAX, quantize_int8, dequantize
from sae_cache.train.loader import ActivationLoader
from tests.cache_utils import write_cache
from tests.test_harvest import harvest_args

HOOK = "blocks.0.hook_resid_post"
# float32 rounding on top of the rounding to a code: x/s and q·s are each off by at most 127·2^-24 steps.
SLACK = 2 * QMAX * 2.0**-24


def rows_of_every_size(n: int = 512, d: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x_ND = torch.randn(n, d, generator=g) * 10.0 ** torch.empty(n, 1).uniform_(-4, 4, generator=g)
    x_ND[::7, 3] *= 300  # outlier channels in some rows
    return x_ND


def test_round_trip_is_within_half_a_step_per_element():
    x_ND = rows_of_every_size()
    codes_ND, scales_N1 = quantize_int8(x_ND)
    assert codes_ND.dtype == torch.int8 and scales_N1.dtype == torch.float32 and scales_N1.shape == (len(x_ND), 1)
    assert codes_ND.abs().max() == QMAX and (codes_ND.abs().amax(1) == QMAX).all()  # each row's largest uses 127
    err_ND = (x_ND - dequantize(codes_ND, scales_N1)).abs()
    assert (err_ND <= scales_N1 * (0.5 + SLACK)).all()
    # the bound is tight: some element lands close to half a step away (rounding, not truncation or worse)
    assert (err_ND / scales_N1).max() > 0.45


def test_zero_rows_are_exact_and_non_finite_rows_stay_non_finite():
    x_ND = torch.randn(4, 8)
    x_ND[0] = 0
    x_ND[1, 2], x_ND[2, 5] = float("nan"), float("inf")
    codes_ND, scales_N1 = quantize_int8(x_ND)
    y_ND = dequantize(codes_ND, scales_N1)
    assert scales_N1[0] == 0 and (y_ND[0] == 0).all()
    assert not torch.isfinite(y_ND[1]).any() and not torch.isfinite(y_ND[2]).all()  # `sae train` finds the row
    assert torch.isfinite(y_ND[3]).all()


@pytest.fixture
def int8_cache(tmp_path) -> tuple[Path, torch.Tensor]:
    x_ND = rows_of_every_size(1024, 8)
    return write_cache(tmp_path / "q.zarr", x_ND, rows_per_shard=256, dtype="int8", hook=HOOK), x_ND


def test_plain_zarr_reads_it_with_the_documented_recipe(int8_cache):
    path, x_ND = int8_cache
    # README.md, "The 8-bit cache": x = acts.astype(float32) * scales, row by row
    group = zarr.open_group(path, mode="r")
    assert group.attrs["sae_cache"]["dtype"] == "int8"
    codes, scales = group[f"acts/{HOOK}"][:], group[f"scales/{HOOK}"][:]
    assert codes.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == (len(x_ND), 1)
    plain = torch.from_numpy(codes.astype(np.float32) * scales)
    assert torch.equal(open_cache(path).read_rows(HOOK, 0, len(x_ND)), plain)
    assert ((plain - x_ND).abs() <= torch.from_numpy(scales) * (0.5 + SLACK)).all()


def flip_scales_byte(path: Path, shard: int) -> Path:
    file = path / "scales" / HOOK / "c" / str(shard) / "0"
    data = bytearray(file.read_bytes())
    data[len(data) // 3] ^= 0xFF
    file.write_bytes(bytes(data))
    return file


def test_checksums_cover_the_scales(int8_cache):
    path, _ = int8_cache
    cache = open_cache(path)
    assert verify(cache) == [] and cache.chunk_crc
    file = flip_scales_byte(path, 1)
    with pytest.raises(ValueError, match="checksum"):  # zarr checks the CRC32C itself
        zarr.open_array(path / "scales" / HOOK, mode="r")[256:512]
    assert any(f"shard 1 of scales/{HOOK} does not match its checksum" in p for p in verify(cache))
    loader = ActivationLoader(cache, HOOK, batch_size=64, n_batches=16, rows=(0, 1024))
    with pytest.raises(CacheError, match="CRC32C") as e:
        list(loader)
    assert str(file) in str(e.value)


def test_loader_batches_equal_a_float32_cache_of_the_dequantised_rows(tmp_path, monkeypatch):
    """Codes and scales go through the same shuffle: the int8 stream is the float32 stream of q·s, bit for bit."""
    x_ND = rows_of_every_size(2048, 8, seed=1)
    rows_per_chunk = 64
    caches = {}
    for dtype, itemsize in (("int8", 2), ("float32", 4)):  # int8 chunks are sized as bf16's: same rows per chunk
        monkeypatch.setattr(cache_format, "TARGET_CHUNK_BYTES", rows_per_chunk * 8 * itemsize)
        values = x_ND if dtype == "int8" else open_cache(caches["int8"]).read_rows(HOOK, 0, len(x_ND))
        caches[dtype] = write_cache(tmp_path / f"{dtype}.zarr", values, rows_per_shard=256, dtype=dtype, hook=HOOK)
    kw = dict(batch_size=100, n_batches=30, seed=5, shuffle_tokens=256)
    got = list(ActivationLoader(open_cache(caches["int8"]), HOOK, **kw))
    want = list(ActivationLoader(open_cache(caches["float32"]), HOOK, **kw))
    assert open_cache(caches["int8"]).layout == open_cache(caches["float32"]).layout
    assert len(got) == 30 and all(g.dtype == torch.float32 and torch.equal(g, w) for g, w in zip(got, want))
    bf16 = list(ActivationLoader(open_cache(caches["int8"]), HOOK, dtype=torch.bfloat16, **kw))
    assert all(b.dtype == torch.bfloat16 and torch.equal(b, g.bfloat16()) for b, g in zip(bf16, got))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_are_dequantised_on_the_gpu_equal_to_the_cpu(int8_cache):
    """Pinned codes and scales, copied without blocking, dequantised on the GPU: the CPU's values exactly (one
    float32 product per element on both)."""
    cache = open_cache(int8_cache[0])
    kw = dict(batch_size=64, n_batches=20, rows=(0, 1024), seed=2, shuffle_tokens=256)
    on_cpu = list(ActivationLoader(cache, HOOK, **kw))
    on_gpu = list(ActivationLoader(cache, HOOK, device="cuda", **kw))
    assert all(g.is_cuda and g.dtype == torch.float32 and torch.equal(g.cpu(), c) for g, c in zip(on_gpu, on_cpu))


# ---------------------------------------------------------------- harvest -> train -> eval on an int8 cache

def cli(*args: object) -> object:
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def harvested(checkpoints, corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("int8")
    caches = {}
    for dtype in ("float32", "int8"):
        caches[dtype] = root / f"{dtype}.zarr"
        result = cli(*harvest_args(checkpoints["gemma2"], corpus, caches[dtype], "--layer", 1, "--dtype", dtype))
        assert result.exit_code == 0, result.output
    return caches


def test_harvest_int8_stores_the_quantised_float32_activations(harvested):
    hook = "blocks.1.hook_resid_post"
    f32, q = open_cache(harvested["float32"]), open_cache(harvested["int8"])
    assert q.dtype == "int8" and q.n_tokens == f32.n_tokens and verify(q) == []
    codes_ND, scales_N1 = quantize_int8(f32.read_rows(hook, 0, f32.n_tokens))
    group = zarr.open_group(harvested["int8"], mode="r")
    np.testing.assert_array_equal(group[f"acts/{hook}"][:], codes_ND.numpy())
    np.testing.assert_array_equal(group[f"scales/{hook}"][:], scales_N1.numpy())
    np.testing.assert_array_equal(q.read_tokens(0, q.n_tokens), f32.read_tokens(0, f32.n_tokens))
    info = cli("cache", "info", harvested["int8"])
    assert info.exit_code == 0 and "int8, zstd" in info.output


def test_train_and_eval_on_an_int8_cache(harvested, tmp_path):
    run = tmp_path / "run"
    result = cli("train", "--cache", harvested["int8"], "--out", run, "--batch-size", 256, "--expansion", 2,
                 "--arch", "topk,relu", "--k", 4, "--holdout-fraction", 0.25, "--device", "cpu")
    assert result.exit_code == 0, result.output
    for cache in ("int8", "float32"):  # on its own held-out rows, and on the float32 cache's same rows
        result = cli("eval", run, "--device", "cpu", "--batch-size", 8, "--cache", harvested[cache],
                     "--out", tmp_path / cache)
        assert result.exit_code == 0, result.output
    for name in ("topk-k4-64", "relu-l1_0.01-64"):
        q, f = (json.loads((tmp_path / c / name / "eval.json").read_text()) for c in ("int8", "float32"))
        assert q["rows"] == f["rows"] and 0 < f["metrics"]["nmse"] < 2
        # eval reruns the model on the cache's tokens (equal in both caches): every metric but mean ablation
        # comes from that run; the cached rows give only the mean spliced in, within half a step per element
        for key in ("l0", "ce_clean", "ce_spliced", "ce_degradation"):
            assert q["metrics"][key] == f["metrics"][key], key
        # NMSE's variance is accumulated around the cache's mean activation (a shift for numerical stability):
        # the two caches' means differ, so the sums round differently, by float64 rounding only
        assert q["metrics"]["nmse"] == pytest.approx(f["metrics"]["nmse"], rel=1e-12)
        assert q["metrics"]["ce_mean_ablated"] == pytest.approx(f["metrics"]["ce_mean_ablated"], rel=1e-2)
