"""Engine benchmark: the same DensePure certification through the reference loop and the engine.

Run it (a few minutes on two cores with the bundled digits models)::

    .venv/bin/python benchmarks/engine.py                       # K=10, S=2, sigma 0.5
    .venv/bin/python benchmarks/engine.py --steps 4 --repeats 5
    .venv/bin/python benchmarks/engine.py --profile             # where the engine's time goes
    .venv/bin/python benchmarks/engine.py --dry-run             # seconds: tiny random models

Workload: ``--images`` test images of the digits split (``load_digits_split("test")``), n0 + n
noisy copies each, sigma 0.5, DensePure with K votes of S reverse steps, the bundled DDPM
(``densepure_core/assets/digits/ddpm``) and clean classifier (``classifier_clean``).

(a) reference: the structure of DensePure's published code (``eval_certified_densepure.py`` +
    ``core.Smooth._sample_noise`` + ``results/merge_results.py``): one pass over all copies per
    reverse seed k (the paper's K separate processes, run one after another), copies in batches
    of ``--ref-batch`` (16, its ``--certified_batch``), selection and estimation copies sampled
    separately, every vote computed (no early exit), labels saved, then the majority per copy
    (``max(votes, key=votes.count)``: ties to the earliest vote). It uses the same purifier and
    classifier objects and the same per-row seeds as the engine, so the counts must be equal.
(b) engine: ``SmoothedBaseClassifier.certify_many`` (slots of ``--batch-size`` rows, copies x
    votes per batch, exact early exit, images streamed back to back).

Both run ``--repeats`` times, alternating; the figures are medians. Prints UNet calls, copies
per second, the speed ratio (b over a) and whether the counts are identical (exit code 1 if
not). The last line is ``key=value`` pairs. The target on the 2-core dev machine: >= 2x at
K = 10. Timings on a shared machine are noisy: compare medians, and repeat.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from densepure_core.rng import REVERSE, SMOOTH, derive_seed, gaussian_rows, make_noise  # noqa: E402
from densepure_core.smoothing import EngineOptions, SmoothedBaseClassifier, VoteStats  # noqa: E402

ASSETS = ROOT / "densepure_core" / "assets" / "digits"


# --------------------------------------------------------------------------- models
def load_models(random_models: bool, tiny: bool):
    """(unet, schedule, classifier, description). Bundled digits models unless ``random_models``."""
    from densepure_core.models import Classifier, load_classifier, load_diffusion
    from densepure_core.diffusion.schedule import DiffusionSchedule
    from densepure_core.models.toy import ToyRecipe, build_classifier, build_scheduler, build_unet

    if not random_models:
        if not (ASSETS / "manifest.json").is_file():
            raise SystemExit(f"no bundled digits models in {ASSETS} (manifest.json missing); train them with "
                             f"`densepure train-toy`, or pass --random-models")
        dm = load_diffusion(str(ASSETS / "ddpm"))
        clf = load_classifier(f"local-dir:{ASSETS / 'classifier_clean'}", num_classes=10)
        return dm.unet, DiffusionSchedule.from_scheduler(dm.scheduler), clf, "bundled digits models"
    recipe = ToyRecipe()
    if tiny:  # same code path, a fraction of the cost (dry runs)
        recipe = ToyRecipe(unet_block_out_channels=(8, 16), unet_norm_num_groups=4,
                           classifier_model_args={"channels": [8, 8, 8, 8], "stem_width": 8})
    torch.manual_seed(0)
    unet = build_unet(recipe).eval().requires_grad_(False)
    model = build_classifier(recipe).eval().requires_grad_(False)
    clf = Classifier(model, input_size=recipe.image_size, interpolation="bilinear", mean=0.5, std=0.5,
                     in_chans=1, num_classes=10).eval()
    return unet, DiffusionSchedule.from_scheduler(build_scheduler(recipe)), clf, "random-weight digits architectures"


# --------------------------------------------------------------------------- (a) reference
@torch.no_grad()
def reference_counts(purifier, classifier, images, ids, *, sigma, k_votes, n0, n, batch, run_seed,
                     num_classes=10, noise_device="cpu"):
    """The reference code's structure; returns ({id: (counts0, counts)}, unet_calls)."""
    saved = {}  # (k, image, set) -> labels, as the reference saves one .npy per reverse seed
    unet_calls = 0
    for k in range(k_votes):  # one "process" per reverse seed
        for x, image_id in zip(images, ids):
            for name, copies in (("n0", range(0, n0)), ("n", range(n0, n0 + n))):
                labels = []
                for start in range(0, len(copies), batch):  # Smooth._sample_noise
                    js = list(copies[start:start + batch])
                    eps = gaussian_rows([derive_seed(run_seed, image_id, j, -1, SMOOTH) for j in js], x.shape,
                                        noise_device=noise_device)
                    noisy = x.unsqueeze(0) + sigma * eps
                    noise = make_noise([derive_seed(run_seed, image_id, j, k, REVERSE) for j in js], x.shape,
                                       x.device, noise_device=noise_device)
                    logits = classifier(purifier(noisy, noise))  # the purifier clips its own output
                    labels.append(logits.argmax(1).cpu().numpy())
                    unet_calls += len(js) * purifier.unet_calls_per_purification
                saved[(k, image_id, name)] = np.concatenate(labels)
    out = {}
    for image_id in ids:  # merge_results.py: majority over the K saved label arrays, per copy
        res = []
        for name in ("n0", "n"):
            votes = np.stack([saved[(k, image_id, name)] for k in range(k_votes)], axis=1)
            top = [max(list(row), key=list(row).count) for row in votes]
            res.append(np.bincount(np.asarray(top, dtype=np.int64), minlength=num_classes))
        out[image_id] = (res[0], res[1])
    return out, unet_calls


# --------------------------------------------------------------------------- (b) engine
def engine_counts(sbc: SmoothedBaseClassifier, images, ids, *, n0, n):
    """The engine; returns ({id: (counts0, counts)}, total VoteStats)."""
    out, total = {}, VoteStats()
    for res in sbc.certify_many(zip(ids, images), n0, n):
        out[res.image_id] = (res.counts0, res.counts)
        total.add(res.stats)
    return out, total


def same_counts(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[i][0], b[i][0]) and np.array_equal(a[i][1], b[i][1])
                                        for i in a)


def profile_engine(make_sbc, images, ids, n0, n, top=12) -> None:
    """cProfile the engine; print its time split (model compute, RNG, engine bookkeeping)."""
    sbc = make_sbc()
    prof = cProfile.Profile()
    prof.enable()
    engine_counts(sbc, images, ids, n0=n0, n=n)
    prof.disable()
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values())
    groups = {"rng (seeds, generators, randn, counter noise)": 0.0,
              "engine bookkeeping (slots, votes, numpy)": 0.0, "models (UNet, classifier, step math)": 0.0}
    for (file, _line, func), v in st.stats.items():
        tt = v[2]
        if "rng.py" in file or any(s in func for s in ("standard_normal", "Philox", "Generator", "blake2b")):
            groups["rng (seeds, generators, randn, counter noise)"] += tt
        elif "smoothing/scheduler.py" in file or "numpy" in file or func.startswith("<method '") and "numpy" in func \
                or any(s in func for s in ("bincount", "flatnonzero", "unique", "argmax' of 'numpy")):
            groups["engine bookkeeping (slots, votes, numpy)"] += tt
        else:
            groups["models (UNet, classifier, step math)"] += tt
    print(f"profile of the engine ({total:.2f} s under cProfile):")
    for name, tt in groups.items():
        print(f"  {name:<52} {tt:7.2f} s  {100 * tt / total:5.1f} %")
    st.sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--n0", type=int, default=20)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--votes", "-k", type=int, default=10)
    ap.add_argument("--steps", "-s", type=int, default=2)
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=128, help="engine rows per batch")
    ap.add_argument("--ref-batch", type=int, default=16, help="reference batch (DensePure's --certified_batch)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both paths)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise-device", choices=["cpu", "device"], default="cpu")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile (Inductor; ~1-2 min on 2 cores)")
    ap.add_argument("--pad-batches", action="store_true")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--random-models", action="store_true", help="random-weight digits architectures")
    ap.add_argument("--profile", action="store_true", help="also cProfile one engine run")
    ap.add_argument("--dry-run", action="store_true", help="tiny random models and workload (a smoke test)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.images, args.n0, args.n, args.votes, args.steps, args.repeats = 2, 3, 5, 3, 2, 1
        args.random_models, args.batch_size = True, 4
    torch.set_num_threads(args.threads)

    from densepure_core.data.digits import load_digits_split
    from densepure_core.diffusion.purify import make_purifier, unet_denoiser

    unet, schedule, clf, what = load_models(args.random_models, tiny=args.dry_run)
    purifier = make_purifier("densepure", unet_denoiser(unet), schedule, args.sigma, steps=args.steps)
    split = load_digits_split("test")
    images = [split.images[i] for i in range(args.images)]
    ids = split.ids[:args.images]
    copies = args.images * (args.n0 + args.n)

    def make_sbc():
        # EngineOptions takes the switches named like the command line's (batch_size, precision, ...).
        return SmoothedBaseClassifier(clf, purifier, args.sigma, votes=args.votes, num_classes=10,
                                      run_seed=args.seed, options=EngineOptions.from_settings(args))

    print(f"engine benchmark: {what}; {args.images} images x (n0={args.n0} + n={args.n}) copies, sigma={args.sigma}, "
          f"K={args.votes}, S={args.steps} (t*={purifier.t_star}), torch {torch.__version__}, "
          f"{args.threads} thread(s), {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    sbc = make_sbc()
    # Warm-up (allocations, oneDNN primitives, compile) on one image, outside the timings.
    engine_counts(sbc, images[:1], ["warm-up"], n0=1, n=min(args.n, args.batch_size))

    ref_times, eng_times = [], []
    ref = eng = None
    ref_calls = 0
    stats = VoteStats()
    for r in range(args.repeats):
        t0 = time.perf_counter()
        ref, ref_calls = reference_counts(purifier, clf, images, ids, sigma=args.sigma, k_votes=args.votes,
                                          n0=args.n0, n=args.n, batch=args.ref_batch, run_seed=args.seed,
                                          noise_device=args.noise_device)
        ref_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        eng, stats = engine_counts(sbc, images, ids, n0=args.n0, n=args.n)
        eng_times.append(time.perf_counter() - t0)
        print(f"  repeat {r + 1}: reference {ref_times[-1]:7.2f} s   engine {eng_times[-1]:7.2f} s   "
              f"ratio {ref_times[-1] / eng_times[-1]:.2f}", flush=True)
    identical = same_counts(ref, eng)
    t_ref, t_eng = statistics.median(ref_times), statistics.median(eng_times)
    full = copies * args.votes
    print(f"reference: {ref_calls} UNet calls, {full} classifier calls, {copies / t_ref:.1f} copies/s "
          f"(median {t_ref:.2f} s)")
    print(f"engine:    {stats.unet_calls} UNet calls, {stats.classifier_calls} classifier calls, "
          f"{stats.votes_skipped} votes skipped by exact early exit ({100 * stats.votes_skipped / full:.1f} %), "
          f"{stats.batches} batches, {copies / t_eng:.1f} copies/s (median {t_eng:.2f} s)")
    print(f"counts identical: {identical}")
    for i in ids:
        print(f"  {i}: counts0={eng[i][0].tolist()} counts={eng[i][1].tolist()}")
    if args.profile:
        profile_engine(make_sbc, images, ids, args.n0, args.n)
    result = {
        "k": args.votes, "s": args.steps, "copies": copies, "unet_calls_ref": ref_calls,
        "unet_calls_engine": stats.unet_calls, "calls_saved": ref_calls - stats.unet_calls,
        "votes_skipped": stats.votes_skipped, "copies_per_s_ref": round(copies / t_ref, 2),
        "copies_per_s_engine": round(copies / t_eng, 2), "speedup": round(t_ref / t_eng, 3),
        "counts_identical": identical,
    }
    print(" ".join(f"{k}={v}" for k, v in result.items()))
    if not identical:
        print(json.dumps({i: [ref[i][0].tolist(), ref[i][1].tolist()] for i in ref}), file=sys.stderr)
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
