"""Adaptive vs fixed sampling on the bundled digits models: copies, UNet calls, certified accuracy.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/adaptive.py        # papers' protocol, slow on CPU
    .venv/bin/python benchmarks/adaptive.py --dry-run                      # seconds; the test
    .venv/bin/python benchmarks/adaptive.py --device cuda --batch-size 8192 --methods rs dds densepure

The papers' protocol: n0 = 100, n_max = n = 10,000, alpha = 0.001, on ``--images`` (default 100)
digits test images, sigma 0.25 and 0.5; methods ``rs`` (Cohen et al. with the noise-trained
classifier), ``dds`` (one-shot denoising, clean classifier), optionally ``densepure`` (K = 5,
S = 2). Each (sigma, method) runs twice through the same engine (``VoteWorker.smoothed``, the
vote stage's): fixed CERTIFY with n copies, and ``sampling: adaptive`` (staged bound, batch 100)
twice: stopping on the default radius grid (``config.DEFAULT_RADII``) and on a one-radius grid
``[0, --headline-radius]`` (certifying one radius, as Horvath et al. report). Copy j's noise is
the same in both, so the adaptive counts are a prefix of the fixed run's.

Reported per (sigma, method, mode): mean estimation copies and mean UNet / classifier calls per
image, and certified accuracy at every default-grid radius (fixed: Clopper-Pearson at n;
adaptive: the anytime bound at n_used, both at alpha). The last line is ``key=value`` pairs.
Nothing is written under OUT: the engine runs in-process, no pipeline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = {
    "rs": {"kind": "rs", "name": "rs", "classifier": {"source": "local-dir:bundled:digits/classifier_noise_{sigma}"}},
    "dds": {"kind": "dds", "name": "dds"},
    "densepure": {"kind": "densepure", "name": "densepure", "k": 5, "steps": 2},
}


def build_config(args: argparse.Namespace, sampling: str, radii: list[float]):
    from densepure_core.config import load_config

    return load_config(data={
        "run_name": "adaptive-bench",
        "dataset": {"kind": "digits", "split": "test", "every": args.every, "max_images": args.images},
        "diffusion": {"source": "bundled:digits/ddpm"},
        "classifier": {"source": "local-dir:bundled:digits/classifier_clean"},
        "methods": [METHODS[m] for m in args.methods],
        "sigmas": args.sigmas, "n0": args.n0, "n": args.n_max, "alpha": args.alpha, "radii": radii,
        "batch_size": args.batch_size, "device": args.device, "seed": 0, "prefetch": 0,
        "sampling": sampling, "adaptive": {"batch": args.look_batch},
    })


def certify(cfg, worker, method, sigma: float, records) -> dict:
    """One (sigma, method) pass over the images: per-image n_used, calls and certificate."""
    from densepure_core.certification import sequential, stats
    from densepure_core.data.sources import load_image
    from densepure_core.smoothing import AdaptivePlan

    sbc = worker.smoothed(method, sigma)
    plan = AdaptivePlan.from_config(cfg, sigma) if cfg.sampling == "adaptive" else None
    images = ((r.image_id, load_image(r, cfg.dataset)) for r in records)
    out = {"n_used": [], "unet": [], "clf": [], "lower": [], "pred": [], "label": [r.label for r in records]}
    for res in sbc.certify_many(images, cfg.n0, cfg.n, adaptive=plan):
        c_a = int(np.argmax(res.counts0))
        n_a, n = int(res.counts[c_a]), res.n_used
        lower = float(stats.clopper_pearson_lower(n_a, n, cfg.alpha) if plan is None else
                      sequential.anytime_lower_bound(n_a, n, cfg.alpha, plan.bound, **plan.params))
        out["n_used"].append(n)
        out["unet"].append(res.stats.unet_calls)
        out["clf"].append(res.stats.classifier_calls)
        out["lower"].append(lower)
        out["pred"].append(c_a if lower >= 0.5 else -1)
    return {k: np.asarray(v) for k, v in out.items()}


def accuracy(res: dict, sigma: float, radii: list[float]) -> list[float]:
    from densepure_core.certification import stats

    radius = np.where(res["pred"] >= 0, stats.certified_radius(sigma, np.maximum(res["lower"], 0.5)), 0.0)
    correct = (res["pred"] == res["label"]) & (res["pred"] >= 0)
    return [float(a) for a in stats.certified_accuracy(radius, correct, radii)]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n-max", type=int, default=10_000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--methods", nargs="+", default=["rs", "dds"], choices=sorted(METHODS))
    p.add_argument("--look-batch", type=int, default=100)
    p.add_argument("--headline-radius", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=2000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dry-run", action="store_true", help="3 images, n0 10, n_max 60: seconds")
    args = p.parse_args(argv)
    if args.dry_run:
        args.images, args.every, args.n0, args.n_max, args.look_batch = 3, 40, 10, 60, 10
        args.sigmas, args.batch_size, args.alpha = [0.5], 64, 0.01
    return args


def main(argv: list[str] | None = None) -> dict:
    from densepure_core.config import DEFAULT_RADII
    from densepure_core.data.sources import enumerate_records, select_records
    from tasks.certify.vote import VoteWorker

    args = parse_args(argv)
    start = time.perf_counter()
    grids = {"fixed": DEFAULT_RADII, "adaptive-grid": DEFAULT_RADII,
             "adaptive-headline": [0.0, args.headline_radius]}
    results: dict[tuple[float, str, str], dict] = {}
    worker = None
    for mode, grid in grids.items():
        cfg = build_config(args, "fixed" if mode == "fixed" else "adaptive", list(grid))
        worker = worker or VoteWorker(cfg, None, "bench")
        worker.cfg = cfg  # same models; the engine per (method, sigma) is reused across modes
        records = select_records(enumerate_records(cfg.dataset)[0], cfg.dataset)
        for sigma in cfg.sigmas:
            for method in cfg.methods:
                results[(sigma, method.label, mode)] = certify(cfg, worker, method, sigma, records)

    print(f"n0={args.n0} n_max={args.n_max} alpha={args.alpha} images={args.images} "
          f"look batch={args.look_batch} headline radius={args.headline_radius}")
    print("sigma method mode | mean copies | UNet calls/image | classifier calls/image | "
          "certified accuracy at " + " ".join(f"{r:g}" for r in DEFAULT_RADII))
    summary = {"dry_run": args.dry_run, "images": args.images}
    for (sigma, method, mode), res in sorted(results.items()):
        acc = accuracy(res, sigma, DEFAULT_RADII)
        print(f"{sigma:g} {method} {mode} | {res['n_used'].mean():.0f} | {res['unet'].mean():.0f} | "
              f"{res['clf'].mean():.0f} | " + " ".join(f"{100 * a:.1f}" for a in acc))
        fixed = results[(sigma, method, "fixed")]
        if mode != "fixed":
            key = f"{method}_s{sigma:g}_{mode}"
            summary[f"{key}_copies_ratio"] = round(float(res["n_used"].mean() / fixed["n_used"].mean()), 4)
            summary[f"{key}_clf_ratio"] = round(float(res["clf"].mean() / fixed["clf"].mean()), 4)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return {"results": results, "summary": summary}


if __name__ == "__main__":
    main()
