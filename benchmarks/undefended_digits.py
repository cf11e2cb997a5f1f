"""How far PGD breaks the bare digits classifier: robust accuracy on the whole test split.

    .venv/bin/python benchmarks/undefended_digits.py            # 450 images, ~2 min on 2 cores
    .venv/bin/python benchmarks/undefended_digits.py --dry-run  # 20 images, fewer runs; the test

Prints, at L_inf 8/255: PGD-20 and PGD-100 (random start) (``densepure_core.attack.run_attack``), the images
that resist every one of 10 random restarts of PGD-50, and of those, the ones that also resist
ten targeted PGD-100 runs (one per class: cross-entropy towards the class, step 1/255); and
PGD-20 at 10/255 and 12/255. docs/results/digits_attacks.md quotes these figures. The last line
is ``key=value`` pairs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from densepure_core.attack import AttackSpec, Defense, ThreatModel, predict, run_attack
    from densepure_core.config import DatasetConfig, resolve_source
    from densepure_core.data.sources import enumerate_records, load_image, select_records
    from densepure_core.models import load_classifier

    ds = DatasetConfig(kind="digits", split="test", max_images=20 if args.dry_run else None)
    recs = select_records(enumerate_records(ds)[0], ds)
    x = torch.stack([load_image(r, ds) for r in recs])
    y = torch.tensor([r.label for r in recs])
    ids = [r.image_id for r in recs]
    clf = load_classifier(resolve_source("local-dir:bundled:digits/classifier_clean")).eval().requires_grad_(False)
    bare = Defense("none", clf)
    restarts, long_run = (2, 5) if args.dry_run else (10, 100)

    def robust(eps, iterations, seed=0):
        x_adv, _ = run_attack(bare, x, y, ids, ThreatModel("linf", eps / 255), AttackSpec("pgd_eot", iterations=iterations, random_start=True),
                              run_seed=seed)
        return torch.from_numpy(predict(bare, x_adv, ids, run_seed=0, purpose="score", purifications=1)[:, 0] == y.numpy())

    out = {"images": len(y), "clean": float((clf(x).argmax(1) == y).float().mean())}
    out["pgd20_8"] = float(robust(8, 20).float().mean())
    out[f"pgd{long_run}_8"] = float(robust(8, long_run).float().mean())
    survivors = torch.ones(len(y), dtype=torch.bool)
    for seed in range(restarts):
        survivors &= robust(8, 50 if not args.dry_run else 5, seed)
    out[f"restarts{restarts}_8"] = float(survivors.float().mean())
    xs, ys = x[survivors], y[survivors]
    still = torch.ones(len(ys), dtype=torch.bool)
    eps = 8 / 255
    for target in range(10):
        adv = xs.clone()
        for _ in range(long_run):
            adv.requires_grad_(True)
            loss = -F.cross_entropy(clf(adv), torch.full_like(ys, target), reduction="sum")
            (g,) = torch.autograd.grad(loss, adv)
            adv = torch.min(torch.max(adv.detach() + g.sign() / 255, xs - eps), xs + eps).clamp(0, 1)
        with torch.no_grad():
            still &= clf(adv).argmax(1) == ys
    out["restarts_and_targeted_8"] = float(still.sum()) / len(y)
    out["pgd20_10"] = float(robust(10, 20).float().mean())
    out["pgd20_12"] = float(robust(12, 20).float().mean())
    for k, v in out.items():
        print(f"{k:>26}: {v:.4f}" if isinstance(v, float) else f"{k:>26}: {v}")
    out["dry_run"] = args.dry_run
    print(" ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in out.items()))
    return out


if __name__ == "__main__":
    main()
