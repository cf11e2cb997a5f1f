"""How far PGD breaks the bare digits classifier: robust accuracy under a union of strong attacks.

    .venv/bin/python benchmarks/undefended_digits.py                       # all 450 test images
    .venv/bin/python benchmarks/undefended_digits.py --every 7 --images 60 # the 60 images of digits_attacks
    .venv/bin/python benchmarks/undefended_digits.py --dry-run             # 20 images, fewer runs; the test

At L_inf 8/255 and 10/255 (``densepure_core.attack.run_attack``, random start, step eps/4):
PGD-20 with run seed 0 (the attack of the digits_attacks table, same streams), PGD-100, the
union of R restarts of PGD-100 (run seeds 0..R-1: an image counts as robust only if every
restart fails), and that union plus ten targeted PGD-100 runs from the clean image (one per
class, cross-entropy towards the class, step 1/255). A robust accuracy that a stronger attack
lowers was the attack's, not the classifier's. docs/results/digits_attacks.md quotes these
figures (benchmarks/digits_attacks.py calls :func:`undefended` on its own images). The last line
is ``key=value`` pairs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EPS = (8, 10)


def undefended(x, y, ids, clf, *, restarts: int = 10, iterations: int = 100, short: int = 20, eps_list=EPS) -> dict:
    """Robust accuracy (fractions) of ``clf`` on ``x`` ``[N, C, H, W]`` under the attacks of the
    module docstring, per eps in ``eps_list`` (in 1/255): keys ``short_<e>`` (PGD-``short``, run seed
    0), ``long_<e>`` (PGD-``iterations``), ``union_<e>`` (``restarts`` of them), ``union_targeted_<e>``."""
    import torch
    import torch.nn.functional as F

    from densepure_core.attack import AttackSpec, Defense, ThreatModel, predict, run_attack

    bare = Defense("none", clf)

    def survives(eps, iters, seed=0):
        x_adv, _ = run_attack(bare, x, y, ids, ThreatModel("linf", eps / 255),
                              AttackSpec("pgd_eot", iterations=iters, random_start=True), run_seed=seed)
        pred = predict(bare, x_adv, ids, run_seed=0, purpose="score", purifications=1)[:, 0]
        return torch.from_numpy(pred == y.numpy())

    out = {}
    for e in eps_list:
        out[f"short_{e}"] = float(survives(e, short).float().mean())
        union = survives(e, iterations, 0)
        out[f"long_{e}"] = float(union.float().mean())
        for seed in range(1, restarts):
            union &= survives(e, iterations, seed)
        out[f"union_{e}"] = float(union.float().mean())
        xs, ys = x[union], y[union]
        still = torch.ones(len(ys), dtype=torch.bool)
        for target in range(int(clf.num_classes)):
            adv = xs.clone()
            for _ in range(iterations):
                adv.requires_grad_(True)
                loss = -F.cross_entropy(clf(adv), torch.full_like(ys, target), reduction="sum")
                (g,) = torch.autograd.grad(loss, adv)
                adv = torch.min(torch.max(adv.detach() + g.sign() / 255, xs - e / 255), xs + e / 255).clamp(0, 1)
            with torch.no_grad():
                still &= clf(adv).argmax(1) == ys
        out[f"union_targeted_{e}"] = float(still.sum()) / len(y)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--images", type=int, default=None, help="at most this many (default: the whole test split)")
    p.add_argument("--restarts", type=int, default=10)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    if args.dry_run:
        args.images, args.restarts, args.iterations = 20, 2, 5
    import torch

    from densepure_core.config import DatasetConfig, resolve_source
    from densepure_core.data.sources import enumerate_records, load_image, select_records
    from densepure_core.models import load_classifier

    ds = DatasetConfig(kind="digits", split="test", every=args.every, max_images=args.images)
    recs = select_records(enumerate_records(ds)[0], ds)
    x = torch.stack([load_image(r, ds) for r in recs])
    y = torch.tensor([r.label for r in recs])
    clf = load_classifier(resolve_source("local-dir:bundled:digits/classifier_clean")).eval().requires_grad_(False)
    with torch.no_grad():
        out = {"images": len(y), "clean": float((clf(x).argmax(1) == y).float().mean())}
    out.update(undefended(x, y, [r.image_id for r in recs], clf, restarts=args.restarts, iterations=args.iterations))
    for k, v in out.items():
        print(f"{k:>26}: {v:.4f}" if isinstance(v, float) else f"{k:>26}: {v}")
    out["dry_run"] = args.dry_run
    print(" ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in out.items()))
    return out


if __name__ == "__main__":
    main()
