#!/usr/bin/env bash
# The quickstart: harvest -> train -> eval on the built-in model and text, under ./cache (see the README).
# `make quickstart` runs this with the project's virtualenv on PATH; tests/test_quickstart.py runs it too.
set -euo pipefail
sae harvest --model tiny-stdlib-gpt2 --dataset stdlib-sample --layer 2 --tokens 320K
sae train --arch topk,batchtopk --k 16,32 --expansion 8 --batch-size 1024 --tokens 1M --lr 1e-3
sae eval
