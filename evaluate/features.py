"""`sae features`: the feature browser. One scan of the held-out rows for every SAE of a run (features_scan.py),
the logit lens of each decoder direction through the harvested model's unembedding, and one self-contained HTML
page per SAE (features_html.py). The SAEs, the cache, its held-out rows and the model are found exactly as
`sae eval` finds them (evaluate/sources.py).

Shapes: F latents, N contexts kept per latent, W window tokens, D d_model, V vocabulary, K logit-lens tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor

from sae_cache.evaluate.features_html import render_page
from sae_cache.evaluate.features_scan import WINDOW_BEFORE, LatentScan, ScanTarget, scan_rows
from sae_cache.evaluate.metrics import DENSE_FREQUENCY
from sae_cache.evaluate.sources import (Target, check_heldout, find_sae_dirs, harvested_model, heldout_rows,
                                        keep_positions, load_targets, open_target_cache)
from sae_cache.sae_common.cache_format import DEFAULT_ROOT, Cache
from sae_cache.sae_common.checks import check_output_dir
from sae_cache.sae_common.console import make_console
from sae_cache.sae_common.features_config import FeaturesConfig
from sae_cache.sae_common.files import write_atomic
from sae_cache.sae_common.model import load_model, resolve_device, resolve_source

PAGE_FILE = "features.html"  # in each SAE directory, without --out
LENS_TOKENS = 10  # promoted and suppressed tokens shown per latent
LENS_CHUNK_ELEMENTS = 1 << 26  # latents x vocabulary logits computed at a time (256 MB of float32)


def features(cfg: FeaturesConfig, console: Console | None = None, root: Path = DEFAULT_ROOT) -> list[Path]:
    """Scan and write one page per SAE `cfg` names; returns the pages' paths."""
    console = console or make_console()
    device = resolve_device(cfg.device)
    if cfg.model is not None:
        resolve_source(cfg.model)  # a model that is not there is refused before the SAEs and the cache are read
    targets = load_targets(find_sae_dirs(cfg.saes, root, console))
    pages = page_paths(targets, cfg.out)
    cache = open_target_cache(targets, cfg.cache)
    rows = heldout_rows(cache, targets, cfg.tokens)
    check_heldout(cache, {t.hook for t in targets}, rows)
    lens = load_lens(cache, cfg.model)
    scans = [ScanTarget(t.sae.to(device), t.hook, LatentScan(t.sae.cfg.d_sae, cfg.top, device)) for t in targets]
    n_rows = sum(stop - start for start, stop in rows)
    console.print(f"scanning {n_rows:,} held-out tokens ({len(rows):,} row range(s) of {cache.path}) "
                  f"for {len(targets)} SAE(s), keeping the top {cfg.top} contexts of each latent")
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        TextColumn("{task.completed:,.0f}/{task.total:,.0f} tokens"), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console)
    with progress:
        task = progress.add_task("features", total=n_rows)
        scan_rows(cache, scans, rows, cfg.batch_size, keep_positions(cache, include_bos=False), device,
                  lambda n: progress.advance(task, n))
    for target, scanned, page in zip(targets, scans, pages):
        data = page_data(target, scanned.scan, lens, cache, rows)
        write_atomic(page, render_page(data).encode())
        console.print(f"{target.name}: {page}")
    return pages


def page_paths(targets: list[Target], out: str | None) -> list[Path]:
    """features.html in each SAE directory, or <out>/<SAE name>.html; every directory checked before the work."""
    if out is None:
        pages = [t.path / PAGE_FILE for t in targets]
    else:
        check_output_dir(out)
        pages = [Path(out) / f"{t.name}.html" for t in targets]
    for page in pages:
        check_output_dir(page.parent, "out")
    return pages


# ---------------------------------------------------------------- the logit lens

@dataclass
class Lens:
    """The harvested model's tokenizer and its unembedding as seen from the residual stream."""

    source: str
    tokenizer: object
    W_U_DV: Tensor  # the final norm's scale folded in (LayerNorm models)
    centre: bool  # LayerNorm removes a direction's mean before scaling it


def load_lens(cache: Cache, model: str | None) -> Lens:
    """Tokenizer and W_U of the cache's model (or `model`), loaded on CPU in float32 with one block built."""
    loaded = load_model(model or harvested_model(cache), [], device="cpu", dtype="float32", n_layers=1)
    bridge = loaded.bridge
    W_U_DV = bridge.W_U.detach().float()
    layer_norm = getattr(bridge.cfg, "normalization_type", None) in ("LN", "LNPre")
    scale_D = getattr(getattr(bridge, "ln_final", None), "weight", None)
    if layer_norm and scale_D is not None:  # RMSNorm weights differ by model (Gemma's is 1 + w): left unfolded
        W_U_DV = scale_D.detach().float()[:, None] * W_U_DV
    return Lens(loaded.source, loaded.tokenizer, W_U_DV, layer_norm)


def logit_lens(W_dec_FD: Tensor, lens: Lens, k: int = LENS_TOKENS) -> tuple[Tensor, ...]:
    """(top values, top ids, bottom values, bottom ids), each [F, K]: the logits a unit step along each decoder
    direction adds through the final norm (to first order: centred and scaled for LayerNorm) and W_U."""
    d_FD = W_dec_FD.detach().float().cpu()
    d_FD = d_FD - d_FD.mean(-1, keepdim=True) if lens.centre else d_FD
    d_FD = d_FD / d_FD.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    chunk = max(1, LENS_CHUNK_ELEMENTS // lens.W_U_DV.shape[1])
    parts = []
    for f0 in range(0, len(d_FD), chunk):
        logits_CV = d_FD[f0:f0 + chunk] @ lens.W_U_DV
        top, bottom = logits_CV.topk(k), logits_CV.topk(k, largest=False)
        parts.append((top.values, top.indices, bottom.values, bottom.indices))
    return tuple(torch.cat(p) for p in zip(*parts))


# ---------------------------------------------------------------- the page's data

def sig(values: Tensor) -> list[float]:
    """Three significant digits: what a page shows, and a third of the bytes of full floats."""
    return [float(f"{v:.3g}") for v in values.tolist()]


def page_data(target: Target, scan: LatentScan, lens: Lens, cache: Cache, rows: list[tuple[int, int]]) -> dict:
    """Everything the page shows, as JSON-able lists per latent (the page renders it with its own script)."""
    sae, F = target.sae, target.sae.cfg.d_sae
    fired_F, n = scan.fired_F.cpu(), max(scan.n_tokens, 1)
    mean_F = scan.sum_F.cpu() / fired_F.clamp(min=1)
    used: set[int] = set()
    kept = (scan.value_FN.cpu(), scan.row_FN.cpu(), scan.window_acts_FNW.cpu(), scan.window_tokens_FNW.cpu())
    contexts = [latent_contexts(*(t[f] for t in kept), used) for f in range(F)]
    if sae.cfg.d_in == lens.W_U_DV.shape[0]:
        top_v, top_i, bottom_v, bottom_i = logit_lens(sae.W_dec, lens)
        used.update(top_i.flatten().tolist() + bottom_i.flatten().tolist())
        lens_pos = [list(zip(i, sig(v))) for i, v in zip(top_i.tolist(), top_v)]
        lens_neg = [list(zip(i, sig(v))) for i, v in zip(bottom_i.tolist(), bottom_v)]
        lens_note = None
    else:
        lens_pos = lens_neg = [[] for _ in range(F)]
        lens_note = (f"no logit lens: the SAE reads {target.hook}, of width {sae.cfg.d_in}, not the residual "
                     f"stream's {lens.W_U_DV.shape[0]}")
    vocab = {i: token_text(lens.tokenizer, i) for i in sorted(used)}
    info = {"name": target.name, "arch": sae.cfg.arch, "k": sae.cfg.k, "d_sae": F, "d_in": sae.cfg.d_in,
            "hook": target.hook, "model": Path(lens.source).name, "cache": str(cache.path), "rows": [list(r) for r in rows],
            "tokens": scan.n_tokens, "top": scan.value_FN.shape[1], "window_before": WINDOW_BEFORE,
            "dense_frequency": DENSE_FREQUENCY, "lens_note": lens_note}
    latents = {"density": sig(fired_F / n), "mean": sig(mean_F), "max": sig(scan.max_F.cpu()),
               "fired": fired_F.tolist(), "hist_range": sig(scan.hist_range_F.cpu()),
               "hist": scan.hist_FH.cpu().tolist(), "contexts": contexts, "lens_pos": lens_pos, "lens_neg": lens_neg}
    return {"info": info, "vocab": vocab, "latents": latents}


@functools.cache
def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character -> the byte it stands for (GPT-2's byte encoder)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def token_text(tokenizer, token_id: int) -> str:
    """A token as text. A byte-level BPE token holding part of a multi-byte character decodes to U+FFFD alone;
    it is shown as its bytes instead (\\xe2), so that such tokens stay tellable apart."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text
    raw, byte_of = tokenizer.convert_ids_to_tokens(token_id), byte_level_alphabet()
    if not all(c in byte_of for c in raw):
        return raw  # not a byte-level vocabulary (e.g. SentencePiece's <0xE2>): its own spelling says it
    return bytes(byte_of[c] for c in raw).decode("utf-8", errors="backslashreplace")


def latent_contexts(value_N: Tensor, row_N: Tensor, acts_NW: Tensor, tokens_NW: Tensor, used: set[int]) -> list[list]:
    """[value, cache row, index of the max token, token ids, activations] per kept context of one latent, the
    window cut to the context's own tokens. Adds the token ids to `used`."""
    out = []
    for value, row, acts_W, tokens_W in zip(value_N.tolist(), row_N.tolist(), acts_NW, tokens_NW.tolist()):
        if value <= 0:
            break  # slots are best first; the rest are empty
        inside = [i for i, t in enumerate(tokens_W) if t >= 0]
        ids = [tokens_W[i] for i in inside]
        used.update(ids)
        out.append([float(f"{value:.3g}"), row, WINDOW_BEFORE - inside[0], ids, sig(acts_W[inside])])
    return out
