"""How much a library's Arrow prototypes can tell its experts apart, per adapted layer, as a Markdown table.

For each layer m and expert e, with factors A_e (r × in) and B_e (out × r) and prototype v_e the top right singular
vector of B_e·A_e (:func:`modlora.reuse.lowrank.top_right_singular_vector`):

* ``cos(A_e, A_ref)``: cosine of the flattened A factor with the first expert's (1 for experts that share an
  initialisation and barely moved);
* ``share in span(A_ref)``: ‖P v_e‖², P the projection onto the row space of the first expert's A (v_e lies in the
  row space of its own A_e, so this is 1 when the A factors span the same r-dimensional subspace);
* ``|cos| between prototypes``: the mean |v_e·v_f| over pairs of different experts (Arrow's logits are |x·v_e|, so
  values near 1 mean every expert gets nearly the same logit).

Medians (and the extreme) over layers and experts::

    python benchmarks/prototype_overlap.py runs/cpu-medium/private
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from modlora.errors import ModloraError
from modlora.library.remote import open_library
from modlora.reuse.lowrank import top_right_singular_vector


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("library", type=Path, help="an expert library directory")
    args = ap.parse_args()
    try:
        experts = open_library(args.library).experts()
    except ModloraError as err:
        ap.error(str(err))
    if len(experts) < 2:
        ap.error(f"{args.library}: {len(experts)} expert(s); the overlap needs at least two")
    adapters = list(experts.values())
    cos_a, share, pair_cos = [], [], []
    for module in adapters[0].modules:
        a_ref = adapters[0].A[module].float()
        basis, _ = torch.linalg.qr(a_ref.T)  # (in, r): orthonormal basis of A_ref's row space
        prototypes = []
        for adapter in adapters:
            a, b = adapter.A[module].float(), adapter.B[module].float()
            v, _ = top_right_singular_vector(a, b)
            prototypes.append(v / v.norm())
            if adapter is not adapters[0]:
                cos_a.append(float(torch.nn.functional.cosine_similarity(a.flatten(), a_ref.flatten(), dim=0)))
                share.append(float((basis.T @ prototypes[-1]).norm() ** 2))
        v = torch.stack(prototypes)
        gram = (v @ v.T).abs()
        n = len(prototypes)
        pair_cos.append(float((gram.sum() - gram.diagonal().sum()) / (n * n - n)))
    print(f"{args.library}: {len(adapters)} experts, {len(adapters[0].modules)} adapted layers\n")
    print("| quantity | median | extreme |\n|---|---:|---:|")
    print(f"| cos(A_e, A_ref), experts vs the first | {statistics.median(cos_a):.3f} | min {min(cos_a):.3f} |")
    print(f"| share of v_e in span(A_ref) | {statistics.median(share):.3f} | min {min(share):.3f} |")
    print(f"| mean \\|cos\\| between prototypes, per layer | {statistics.median(pair_cos):.3f} "
          f"| min {min(pair_cos):.3f} |")


if __name__ == "__main__":
    main()
