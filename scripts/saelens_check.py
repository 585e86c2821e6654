"""Check that SAELens itself loads our exported SAEs and reconstructs what ours do.

Runs in two environments so SAELens never enters the project's: with the project's Python it trains a few
batches of every architecture (scalar, standardize and no input normalisation), saves them with `save_sae`
and records inputs and our outputs; then it builds a separate virtualenv (torch pinned first, then sae-lens)
and re-runs itself there with `--check`, loading each directory with `sae_lens.SAE.load_from_disk`.

    .venv/bin/python scripts/saelens_check.py [--venv /tmp/sae-lens-venv] [--torch torch==2.13.0]
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CASES = [("relu", "scalar"), ("topk", "scalar"), ("batchtopk", "scalar"), ("jumprelu", "scalar"),
         ("feature_choice", "scalar"), ("mutual_choice", "scalar"), ("batchtopk", "standardize"),
         ("topk", "standardize"), ("relu", "none")]


def make(directory: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sae_cache.sae_common.sae import SAE, SAEConfig
    from sae_cache.sae_common.sae_io import save_sae

    g = torch.Generator().manual_seed(0)
    mix_DD = torch.randn(32, 32, generator=g)
    sample = lambda n: torch.randn(n, 32, generator=g) @ mix_DD * 3 + 1  # noqa: E731
    x = sample(256)
    expected = {"x": x}
    for arch, norm in CASES:
        torch.manual_seed(0)
        sae = SAE(SAEConfig(d_in=32, d_sae=128, arch=arch, k=8, input_norm=norm))
        if norm == "scalar":
            sae.set_input_scale(sample(1024))
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        sae.train()
        for _ in range(30):  # a few steps, so thresholds and weights are not at their initial values
            opt.zero_grad()
            sae(sample(512)).loss.backward()
            sae.constrain_decoder()
            opt.step()
        sae.eval()
        name = f"{arch}-{norm}"
        save_sae(sae, directory / name, model_name="gpt2", hook_name="blocks.1.hook_resid_post",
                 extra_record={"context_size": 128})
        with torch.no_grad():
            expected[f"{name}.x_hat"] = sae(x).x_hat
            expected[f"{name}.acts"] = sae.encode(x)
    save_file(expected, str(directory / "expected.safetensors"))


def check(directory: Path) -> int:
    from sae_lens import SAE, __version__

    expected = load_file(str(directory / "expected.safetensors"))
    x, failures = expected["x"], 0
    print(f"sae_lens {__version__}")
    for path in sorted(glob.glob(str(directory / "*-*"))):
        name = os.path.basename(path)
        sae = SAE.load_from_disk(path)
        with torch.no_grad():
            acts, x_hat = sae.encode(x), sae(x)
        err = ((x_hat - expected[f"{name}.x_hat"]).abs().max() / x.abs().max()).item()  # relative to |x|
        same = torch.equal(acts > 0, expected[f"{name}.acts"] > 0)
        ok = err < 1e-5 and same
        failures += not ok
        print(f"{'OK ' if ok else 'BAD'} {name:26s} {type(sae).__name__:14s} max|x_hat diff|/max|x| {err:.1e}  same active "
              f"latents: {same}")
    return failures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "sae-lens-venv")
    ap.add_argument("--torch", default="torch==2.13.0")
    ap.add_argument("--check", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.check:
        sys.exit(check(args.check))
    python = args.venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(args.venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", args.torch], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "sae-lens", args.torch], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        make(Path(tmp))
        sys.exit(subprocess.run([str(python), __file__, "--check", tmp]).returncode)


if __name__ == "__main__":
    main()
