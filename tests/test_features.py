"""`sae features`: the streaming scan against a brute-force computation over the same rows, the command end to end
on the built-in model (pages, decoded tokens, logit lens against Hugging Face's weights), and the page as a real
browser renders it (Debian's chromium, headless; skipped where none is installed).

The scan test uses integer activations and weights, so every activation is exact whatever the order of sums:
equal values are frequent, which tests the tie order too (higher activation first, then the earlier row).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sae_cache.evaluate.features_scan import (HIST_BINS, WINDOW, WINDOW_BEFORE, LatentScan, ScanTarget,
                                              scan_rows)
from sae_cache.sae_common.cache_format import open_cache
from sae_cache.sae_common.cli import main
from sae_cache.sae_common.model import BUILTIN_MODELS
from sae_cache.sae_common.sae import SAE, SAEConfig
from tests.cache_utils import write_cache

HOOK = "blocks.0.hook_resid_post"
T, D, F, TOP = 16, 8, 12, 5


def integer_sae(arch: str) -> SAE:
    """An SAE whose pre-activations are exact integers: integer W_enc and b_enc, no normalisation, b_dec = 0."""
    g = torch.Generator().manual_seed(1)
    sae = SAE(SAEConfig(d_in=D, d_sae=F, arch=arch, k=4, input_norm="none")).eval()
    with torch.no_grad():
        sae.W_enc.copy_(torch.randint(-3, 4, (D, F), generator=g).float())
        sae.b_enc.copy_(torch.tensor([0, -2, -4, -8, 0, -1, -3, -6, -60, -1000, 0, -2]).float())
        sae.b_dec.zero_()
        if arch == "batchtopk":  # the inference threshold: the mean of the one filled window entry
            sae.theta_window[0] = 2.5
            sae.n_batches.fill_(1)
    return sae


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    """64 contexts of 16 tokens: small integer activations growing with the context, so the histogram's range
    doubles during the scan; random token ids."""
    g = torch.Generator().manual_seed(0)
    n = 64 * T
    scale_N = 1 + torch.arange(n) // (16 * T)  # 1, 2, 3, 4 by quarter of the cache
    acts_ND = torch.randint(-2, 3, (n, D), generator=g).float() * scale_N[:, None]
    tokens_N = torch.randint(0, 100, (n,), generator=g)
    return open_cache(write_cache(tmp_path_factory.mktemp("feat") / "c.zarr", acts_ND, tokens_N=tokens_N,
                                  context_size=T, rows_per_shard=256, hook=HOOK))


def brute_force(cache, sae: SAE, ranges: list[tuple[int, int]], keep_T: torch.Tensor) -> dict:
    """Everything at once: every token's activations, then per latent the sorted list of contexts."""
    rows = np.concatenate([np.arange(a, b) for a, b in ranges])
    x_ND = torch.cat([cache.read_rows(HOOK, a, b) for a, b in ranges]).float()
    tokens_CT = np.concatenate([cache.read_tokens(a, b) for a, b in ranges]).reshape(-1, T)
    with torch.no_grad():
        acts_CTF = sae.encode(x_ND, batch_mode=False).reshape(-1, T, F).numpy().copy()
    acts_CTF[:, ~keep_T.numpy()] = 0
    rows_CT = rows.reshape(-1, T)
    expected = {"acts": acts_CTF, "top": []}
    for f in range(F):
        best = [(acts_CTF[c, :, f].max(), c, int(np.argmax(acts_CTF[c, :, f]))) for c in range(len(acts_CTF))]
        best = sorted([b for b in best if b[0] > 0], key=lambda b: (-b[0], b[1]))[:TOP]
        windows = []
        for value, c, p in best:
            acts_W, tokens_W = np.full(WINDOW, np.nan, np.float32), np.full(WINDOW, -1)
            for w, t in enumerate(range(p - WINDOW_BEFORE, p - WINDOW_BEFORE + WINDOW)):
                if 0 <= t < T:
                    acts_W[w], tokens_W[w] = acts_CTF[c, t, f], tokens_CT[c, t]
            windows.append((value, rows_CT[c, p], acts_W, tokens_W))
        expected["top"].append(windows)
    return expected


@pytest.mark.parametrize("arch", ["relu", "batchtopk"])
@pytest.mark.parametrize("ranges,batch", [([(256, 1024)], 3), ([(0, 128), (512, 1024)], 5), ([(0, 1024)], 64)])
def test_the_scan_equals_brute_force_over_the_same_rows(synthetic_cache, arch, ranges, batch):
    sae = integer_sae(arch)
    keep_T = torch.ones(T, dtype=torch.bool)
    keep_T[0] = False  # BOS left out, as eval does
    scan = LatentScan(F, TOP)
    scan_rows(synthetic_cache, [ScanTarget(sae, HOOK, scan)], ranges, batch, keep_T, "cpu")
    expected = brute_force(synthetic_cache, sae, ranges, keep_T)
    ties = 0
    for f, windows in enumerate(expected["top"]):
        got = len(windows)
        assert scan.value_FN[f, :got].tolist() == [w[0] for w in windows], f  # values and order
        assert scan.row_FN[f, :got].tolist() == [w[1] for w in windows], f  # max positions (cache rows)
        assert (scan.value_FN[f, got:] == 0).all() and (scan.row_FN[f, got:] == -1).all()
        for n, (_, _, acts_W, tokens_W) in enumerate(windows):
            np.testing.assert_array_equal(scan.window_acts_FNW[f, n].numpy(), acts_W)  # NaN where outside
            np.testing.assert_array_equal(scan.window_tokens_FNW[f, n].numpy(), tokens_W)
        ties += len(windows) - len({w[0] for w in windows})
    assert ties > 0, "the data must hold equal values, or the tie order goes untested"
    assert 0 < len(expected["top"][8]) < TOP and expected["top"][9] == []  # a rare latent and a dead one

    acts_NF = expected["acts"][:, 1:].reshape(-1, F)  # kept positions only
    assert scan.n_tokens == len(acts_NF)
    assert scan.fired_F.tolist() == (acts_NF > 0).sum(0).tolist()
    assert scan.max_F.tolist() == acts_NF.max(0).tolist()
    assert scan.sum_F.tolist() == acts_NF.astype(np.float64).sum(0).tolist()
    for f in range(F):
        active = acts_NF[:, f][acts_NF[:, f] > 0]
        top = 2.0 ** math.frexp(active.max())[1] if len(active) else 0.0  # the smallest power of two above max
        assert scan.hist_range_F[f].item() == top
        counts = np.histogram(active, bins=HIST_BINS, range=(0, top))[0] if len(active) else np.zeros(HIST_BINS)
        assert scan.hist_FH[f].tolist() == counts.tolist(), f


def test_the_histogram_range_grew_during_the_scan(synthetic_cache):
    """The data of the test above makes the range double after the first batch, so the bin merging was used."""
    sae = integer_sae("relu")
    first, whole = LatentScan(F, TOP), LatentScan(F, TOP)
    keep_T = torch.ones(T, dtype=torch.bool)
    scan_rows(synthetic_cache, [ScanTarget(sae, HOOK, first)], [(0, 3 * T)], 3, keep_T, "cpu")
    scan_rows(synthetic_cache, [ScanTarget(sae, HOOK, whole)], [(0, 1024)], 3, keep_T, "cpu")
    live = first.hist_range_F > 0
    assert (whole.hist_range_F[live] > first.hist_range_F[live]).any()


# ---------------------------------------------------------------- the command, on the built-in model

@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """A cache of the built-in model and text, a BatchTopK SAE trained on it, and `sae features` on its run."""
    root = tmp_path_factory.mktemp("features_e2e")
    cache, run = root / "c.zarr", root / "runs" / "r1"
    for args in (["harvest", "--model", "tiny-stdlib-gpt2", "--dataset", "stdlib-sample", "--layer", "2", "--tokens",
                  "8192", "--rows-per-shard", "2048", "--device", "cpu", "--out", cache],
                 ["train", "--cache", cache, "--arch", "batchtopk", "--k", "8", "--dict-size", "128", "--batch-size",
                  "512", "--tokens", "12K", "--holdout-fraction", "0.1", "--device", "cpu", "--out", run]):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["features", str(run), "--top", "5", "--device", "cpu", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    return run, cache, result.output


def page_json(page: Path) -> dict:
    text = page.read_text()
    payload = re.search(r'<script type="application/json" id="sae-data">(.*?)</script>', text, re.S).group(1)
    return json.loads(payload)


@pytest.mark.slow
def test_the_command_writes_a_self_contained_page_per_sae_and_prints_where(pages):
    run, cache_path, output = pages
    page = run / "batchtopk-k8-128" / "features.html"
    assert str(page) in output.splitlines()  # stdout: the page's path
    text = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text) and "@import" not in text  # nothing fetched
    data = page_json(page)
    latents, info = data["latents"], data["info"]
    assert len(latents["density"]) == info["d_sae"] == 128 and info["top"] == 5
    cache = open_cache(cache_path)
    ranges = info["rows"]
    ctx = cache.meta["context_size"]
    n_rows = sum(stop - start for start, stop in ranges)
    assert info["tokens"] == n_rows // ctx * (ctx - cache.meta["prepend_bos"])  # BOS left out, as eval
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BUILTIN_MODELS["tiny-stdlib-gpt2"])
    shown = 0
    for f, contexts in enumerate(latents["contexts"]):
        assert [c[0] for c in contexts] == sorted((c[0] for c in contexts), reverse=True)
        assert len(contexts) <= 5 and (contexts == []) == (latents["fired"][f] == 0)
        for value, row, at, ids, acts in contexts:
            assert any(start <= row < stop for start, stop in ranges) and acts[at] == value and max(acts) == value
            first = row - at  # the window's first row: its tokens are the cache's
            assert ids == cache.read_tokens(first, first + len(ids)).tolist()
            assert all(data["vocab"][str(i)] == tokenizer.decode([i]) or "\ufffd" in tokenizer.decode([i]) for i in ids)
            shown += 1
    assert shown > 100


@pytest.mark.slow
def test_the_logit_lens_matches_hugging_faces_unembedding(pages):
    from transformers import AutoModelForCausalLM

    from sae_cache.sae_common.sae_io import load_sae

    run, _, _ = pages
    data = page_json(run / "batchtopk-k8-128" / "features.html")
    model = AutoModelForCausalLM.from_pretrained(BUILTIN_MODELS["tiny-stdlib-gpt2"])
    W_dec_FD = load_sae(run / "batchtopk-k8-128").W_dec.detach()
    d_FD = W_dec_FD - W_dec_FD.mean(-1, keepdim=True)  # GPT-2's final LayerNorm centres, then scales by its weight
    d_FD = d_FD / d_FD.norm(dim=-1, keepdim=True)
    logits_FV = (d_FD * model.transformer.ln_f.weight.detach()) @ model.lm_head.weight.detach().T
    for f in (0, 17, 127):
        top = logits_FV[f].topk(10)
        assert [p[0] for p in data["latents"]["lens_pos"][f]] == top.indices.tolist()
        # the page keeps 3 significant digits: half a unit of the third is at most 5e-3 relative (leading digit 1)
        np.testing.assert_allclose([p[1] for p in data["latents"]["lens_pos"][f]], top.values, rtol=5e-3, atol=1e-6)
        assert [p[0] for p in data["latents"]["lens_neg"][f]] == logits_FV[f].topk(10, largest=False).indices.tolist()


class Elements(HTMLParser):
    """The rendered DOM's elements by class: (attributes, text)."""

    def __init__(self):
        super().__init__()
        self.found: dict[str, list[dict]] = {}
        self.open: list[dict] = []

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, **dict(attrs), "text": ""}
        for cls in (element.get("class") or "").split():
            self.found.setdefault(cls, []).append(element)
        if tag not in ("br", "input", "meta", "img"):
            self.open.append(element)

    def handle_endtag(self, tag):
        if self.open:
            self.open.pop()

    def handle_data(self, data):
        for element in self.open:
            element["text"] += data


@pytest.mark.slow
def test_a_real_browser_renders_latents_highlighted_contexts_and_the_logit_lens(pages, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium); the page is not rendered")
    run, _, _ = pages
    page = run / "batchtopk-k8-128" / "features.html"
    data = page_json(page)
    latent = max(range(128), key=lambda f: data["latents"]["max"][f])
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                           "--dump-dom", f"{page.as_uri()}#{latent}"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = Elements()
    dom.feed(done.stdout)
    index_rows = re.findall(r'<tr data-latent="(\d+)"', done.stdout)
    assert sorted(map(int, index_rows)) == list(range(128))  # the index lists every latent
    assert [int(e["data-latent"]) for e in dom.found["sel"]] == [latent]  # and marks the one shown
    contexts = data["latents"]["contexts"][latent]
    tokens = dom.found["tok"]
    assert len(tokens) == sum(len(c[3]) for c in contexts)
    shaded = [t for t in tokens if "background" in (t.get("style") or "")]
    assert len(shaded) >= len(contexts) and all("\u2192" in t["title"] for t in tokens)
    maxima = dom.found["max"]
    assert [float(m["data-act"]) for m in maxima] == [c[0] for c in contexts]  # the highlighted maximum of each
    lens = [e["text"] for e in dom.found["lens-tok"]]
    expected = [data["vocab"][str(t)] for t, _ in data["latents"]["lens_pos"][latent]]
    assert len(lens) == 20 and all(w.replace("\n", "\u21b5").replace("\t", "\u21e5") in got
                                   for w, got in zip(expected, lens))
