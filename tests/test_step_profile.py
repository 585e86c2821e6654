"""bench/step_profile.py at a tiny shape: every op of a BatchTopK step lands in the part it belongs to, so the README's
"Where a training step's time goes" table can be re-measured by anyone (and the script never rots)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from step_profile import PARTS, breakdown, part  # noqa: E402


def test_a_batchtopk_step_has_time_in_each_of_its_parts_and_none_in_an_auxiliary_loss():
    ms = breakdown("batchtopk", d=24, F=640, B=96, k=4, steps=1)
    assert set(ms) == set(PARTS)
    for name in ("encoder_gemm", "selection", "sparse_products", "transpose", "decoder", "adam"):
        assert ms[name] > 0, (name, ms)
    assert ms["aux_loss"] == 0  # no latent is dead in the bench's step


def test_the_auxiliary_losss_products_are_told_apart_when_its_candidates_number_the_batch():
    d, F, B = 768, 12288, 4096  # Feature Choice at the GPT-2 shape: C = 4096 candidate columns = B
    assert part("aten::mm", [[B, B], [B, d]], [], d, F, B) == "aux_loss"
    assert part("aten::mm", [[d, B], [B, B]], [], d, F, B) == "aux_loss"
    assert part("aten::addmm", [[F], [B, d], [d, F], [], []], [], d, F, B) == "encoder_gemm"
    assert part("aten::topk", [[B, 128], [], [], [], []], [], d, F, B) == "selection"
