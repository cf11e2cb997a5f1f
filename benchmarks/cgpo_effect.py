"""How much CGPO's delta raises the classifier's loss on x0_hat, with fixed or fresh mixing noise.

    .venv/bin/python benchmarks/cgpo_effect.py                          # the bundled digits DDPM
    .venv/bin/python benchmarks/cgpo_effect.py --model results/digits_addt/addt/model
    .venv/bin/python benchmarks/cgpo_effect.py --dry-run                # 4 images, one t; the test

ADDT's premise is that CGPO finds a Gaussian-marginal delta that the classifier finds harder than
a random one. Here, for 64 digits training images at fixed timesteps t, the classifier's
cross-entropy on the one-step estimate x0_hat (``densepure_core.addt``) is measured with:

- a random delta (N(0, I), what plain denoising training sees in the lambda part);
- CGPO's delta with one mixing-noise draw reused by all 5 iterations (this project before issue 24);
- CGPO's delta with a fresh draw per iteration (the reference loop; now ``addt.cgpo``).

Each delta is scored under 16 mixing-noise draws that CGPO never saw (ADDT trains against a fresh
eps'), averaged per image; each +- is 1.96 standard errors of a per-image paired difference
(from the random delta, or fresh minus fixed). Every draw is keyed (``rng.derive_seed``). The classifier is the
bundled clean digits classifier; the model runs in eval mode (the digits DDPM has no dropout).
benchmarks/digits_addt.py calls :func:`cgpo_effect` for the original and the tuned model. The last
line is ``key=value`` pairs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TIMESTEPS = (10, 50, 100, 300)
EVAL_DRAWS = 16


def cgpo_effect(model_source: str = "bundled:digits/ddpm", *, images: int = 64, every: int = 20,
                timesteps=TIMESTEPS, eval_draws: int = EVAL_DRAWS, seed: int = 0) -> list[dict]:
    """One dict per t: lambda_t, the mean loss with a random / fixed-noise CGPO / fresh-noise CGPO
    delta, the paired increases over random with 95 % half-widths, and fresh/fixed."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from densepure_core.addt import formulas as addt
    from densepure_core.config import DatasetConfig, resolve_source
    from densepure_core.data.sources import enumerate_records, load_image, select_records
    from densepure_core.models import load_classifier, load_diffusion
    from densepure_core.rng import derive_seed, gaussian_rows, row_generator
    from densepure_core.diffusion.schedule import DiffusionSchedule

    ds = DatasetConfig(kind="digits", split="train", every=every, max_images=images)
    recs = select_records(enumerate_records(ds)[0], ds)
    x0 = torch.stack([load_image(r, ds) for r in recs]) * 2 - 1
    y = torch.tensor([r.label for r in recs])
    ids = [r.image_id for r in recs]
    clf = load_classifier(resolve_source("local-dir:bundled:digits/classifier_clean")).eval().requires_grad_(False)
    dm = load_diffusion(resolve_source(model_source))
    dm.unet.eval().requires_grad_(False)
    abar_all = torch.tensor(DiffusionSchedule.from_scheduler(dm.scheduler).alphas_cumprod, dtype=torch.float32)

    def model(x, t):
        return dm.unet(x, t).sample

    def normals(purpose: str, t: int) -> torch.Tensor:
        return gaussian_rows([derive_seed(seed, i, t, -1, f"cgpo_effect:{purpose}") for i in ids], x0.shape[1:])

    def per_image_loss(t, abar, delta, eval_noise) -> np.ndarray:
        lam = addt.addt_lambda(abar).view(-1, 1, 1, 1)
        a = abar.view(-1, 1, 1, 1)
        losses = []
        with torch.no_grad():
            for eps in eval_noise:
                x_t = a.sqrt() * x0 + (1 - a).sqrt() * ((1 - lam ** 2).sqrt() * eps + lam * delta)
                logits = clf(addt.x0_estimate(model, x_t, t, abar) / 2 + 0.5)
                losses.append(F.cross_entropy(logits, y, reduction="none").numpy())
        return np.mean(losses, axis=0)

    rows = []
    for step in timesteps:
        t = torch.full((len(ids),), step, dtype=torch.long)
        abar = abar_all[t]
        delta0, random_delta = normals("delta0", step), normals("random", step)
        fresh = torch.stack([normals(f"eps{j}", step) for j in range(5)])
        eval_noise = [normals(f"eval{j}", step) for j in range(eval_draws)]

        def rbgm_generators(step=step):  # the same RBGM draws for both variants
            return [row_generator(derive_seed(seed, i, step, -1, "cgpo_effect:rbgm")) for i in ids]

        deltas = {"fixed": addt.cgpo(model, clf, x0, y, t, abar, [fresh[0]] * 5, delta0, rbgm_generators()),
                  "fresh": addt.cgpo(model, clf, x0, y, t, abar, fresh, delta0, rbgm_generators())}
        def mean_hw(diff: np.ndarray) -> tuple[float, float]:
            hw = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
            return float(diff.mean()), float(hw)

        base = per_image_loss(t, abar, random_delta, eval_noise)
        row = {"t": step, "lambda": float(addt.addt_lambda(abar[:1])), "images": len(ids), "random": float(base.mean())}
        losses = {}
        for name, delta in deltas.items():
            losses[name] = per_image_loss(t, abar, delta, eval_noise)
            row[name] = float(losses[name].mean())
            row[f"{name}_gain"], row[f"{name}_gain_hw"] = mean_hw(losses[name] - base)
        row["fresh_minus_fixed"], row["fresh_minus_fixed_hw"] = mean_hw(losses["fresh"] - losses["fixed"])
        row["fresh_over_fixed"] = row["fresh_gain"] / row["fixed_gain"] if row["fixed_gain"] else float("nan")
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    from tasks.common.textfmt import markdown_table

    def pm(r, k):
        return f"{r[k]:+.4f} +- {r[k + '_hw']:.4f}"

    return markdown_table(
        ["t", "lambda_t", "loss, random delta", "loss, CGPO fixed noise", "loss, CGPO fresh noise",
         "gain fixed", "gain fresh", "fresh - fixed", "gain fresh / gain fixed"],
        [[str(r["t"]), f"{r['lambda']:.3f}", f"{r['random']:.4f}", f"{r['fixed']:.4f}", f"{r['fresh']:.4f}",
          pm(r, "fixed_gain"), pm(r, "fresh_gain"), pm(r, "fresh_minus_fixed"), f"{r['fresh_over_fixed']:.2f}"]
         for r in rows], "rrrrrrrrr")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bundled:digits/ddpm")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    kw = {"images": 4, "timesteps": (100,), "eval_draws": 2} if args.dry_run else {"images": args.images}
    rows = cgpo_effect(args.model, **kw)
    print(table(rows))
    at = next((r for r in rows if r["t"] == 100), rows[0])
    print(" ".join(f"{k}={v}" for k, v in {"images": at["images"], "t": at["t"], "random": round(at["random"], 5),
                                           "fixed": round(at["fixed"], 5), "fresh": round(at["fresh"], 5),
                                           "dry_run": args.dry_run}.items()))
    return rows


if __name__ == "__main__":
    main()
