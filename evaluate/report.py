"""What `sae eval` writes and prints: eval.json per SAE, eval_summary.json for the run (the scalars of every SAE,
the config and what was evaluated), and a table on the terminal, one row per SAE sorted by L0. By default
eval.json goes beside each SAE; with --out, every output goes under that directory (<out>/<sae>/eval.json),
and the SAE directories are left as they were."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sae_cache.evaluate.sources import Target
from sae_cache.sae_common.cache_format import Cache
from sae_cache.sae_common.config import EvalConfig
from sae_cache.sae_common.files import write_atomic

EVAL_FILE = "eval.json"
SUMMARY_FILE = "eval_summary.json"


def _json_number(value: Any) -> Any:
    """NaN/inf (e.g. a CE loss score when zero ablation does not hurt) as null: JSON has no NaN."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def sae_report(target: Target, result: dict, *, cfg: EvalConfig, cache: Cache, rows: list[tuple[int, int]] | None,
               dataset: dict | None, model: str) -> dict[str, Any]:
    """The content of one SAE's eval.json: what was evaluated (the cache's held-out `rows` as [start, stop) ranges,
    or the --dataset text, rows null), how, and `result` (evaluate.metrics)."""
    sae_cfg = target.sae.cfg
    result = {**result, "metrics": {k: _json_number(v) for k, v in result["metrics"].items()}}
    return {"sae": target.name, "path": str(target.path), "arch": sae_cfg.arch, "d_sae": sae_cfg.d_sae,
            "k": sae_cfg.k if target.sae.arch.uses_k else None, "hook": target.hook, "model": model,
            "cache": str(cache.path), "rows": None if rows is None else [list(r) for r in rows],
            "dataset": dataset, "include_bos": cfg.include_bos,
            "batch_mode": cfg.batch_mode and target.sae.arch.batch_level, "config": cfg.to_dict(), **result}


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(content, indent=2, allow_nan=False).encode())  # never half a file


def eval_file(report: dict, out: Path | None) -> Path:
    """Where one SAE's eval.json goes: beside the SAE, or <out>/<sae name>/ when --out is given."""
    return (Path(report["path"]) if out is None else out / report["sae"]) / EVAL_FILE


def write_reports(reports: list[dict], out: Path, plots: list[str], beside_saes: bool = True) -> Path:
    """eval.json per SAE (in its directory if `beside_saes`, else under `out`), and eval_summary.json (scalars
    only) in `out`; returns the latter."""
    for r in reports:
        _write_json(eval_file(r, None if beside_saes else out), r)
    first = reports[0]
    summary = {"config": first["config"], "model": first["model"], "cache": first["cache"], "rows": first["rows"],
               "dataset": first["dataset"], "include_bos": first["include_bos"], "plots": plots,
               "saes": [{key: r[key] for key in ("sae", "path", "arch", "d_sae", "k", "hook", "batch_mode")}
                        | r["metrics"] for r in sorted(reports, key=lambda r: r["metrics"]["l0"])]}
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / SUMMARY_FILE, summary)
    return out / SUMMARY_FILE


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_table(reports: list[dict], console: Console) -> None:
    """One row per SAE, sorted by L0; the CEs all SAEs of a hook share go in the caption."""
    text = f"tokens of {reports[0]['dataset']['source']}" if reports[0]["dataset"] else "held-out tokens"
    table = Table(title=f"sae eval ({text}; CE in nats per token)", title_justify="left")
    for name in ("SAE", "arch", "L0", "FVU", "cos", "dead", "dense", "CE spliced", "ΔCE", "CE score", "KL"):
        table.add_column(name, justify="left" if name in ("SAE", "arch") else "right")
    for r in sorted(reports, key=lambda r: r["metrics"]["l0"]):
        m = r["metrics"]
        table.add_row(r["sae"], r["arch"], _fmt(m["l0"], ".1f"), _fmt(m["fvu"], ".4f"),
                      _fmt(m["cosine_similarity"], ".4f"), f"{m['dead_latents']:,}", f"{m['dense_latents']:,}",
                      _fmt(m["ce_spliced"], ".4f"), _fmt(m["ce_degradation"], "+.4f"), _fmt(m["ce_loss_score"], ".4f"),
                      _fmt(m["kl_div"], ".4f"))
    by_hook = {r["hook"]: r["metrics"] for r in reports}
    table.caption = "; ".join(f"{hook}: CE clean {_fmt(m['ce_clean'], '.4f')}, zero-ablated "
                              f"{_fmt(m['ce_zero_ablated'], '.4f')}, mean-ablated {_fmt(m['ce_mean_ablated'], '.4f')}"
                              for hook, m in by_hook.items()) + f"; {reports[0]['metrics']['tokens']:,} tokens"
    console.print(table)
