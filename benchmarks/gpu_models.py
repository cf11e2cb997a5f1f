"""GPU benchmark: ADM-256 UNet and BEiT-L/16 512 against the GPU's bf16 matmul rate, then the engine.

Run it on a GPU machine (about 10 minutes on one H100; sections can be run alone)::

    python benchmarks/gpu_models.py                                # all sections
    python benchmarks/gpu_models.py --sections matmul,unet --unet-batches 32,64
    python benchmarks/gpu_models.py --sections certify --graphs --noise-device device
    python benchmarks/gpu_models.py --dry-run                      # CPU, tiny sizes: a smoke test

Sections:

1. ``matmul``: an 8192^3 bf16 ``torch.mm`` (random inputs, three input sets in rotation, CUDA
   events, median of 20): the machine's measured bf16 rate R, the yardstick below.
2. ``unet``: the ADM-256 UNet of guided-diffusion's ``256x256_diffusion_uncond`` (DensePure and
   Carlini et al.'s ImageNet model: 256 channels, 2 res blocks, channel mult 1,1,2,2,4,4,
   attention at 32/16/8 with 64 channels per head, scale-shift norm, resblock up/down, learned
   sigma; 552.8 M parameters) as a diffusers ``UNet2DModel`` with random weights
   (``densepure_core.models.adm``'s preset when present). FLOPs per call are counted by
   ``torch.utils.flop_counter`` (2.24 TFLOP at 256x256). For each mode and batch size: ms per
   call, achieved TFLOP/s and its fraction of R. Target: >= 50 % of R in bf16.
3. ``beit``: timm ``beit_large_patch16_512`` (random weights, 0.72 TFLOP per image), the same table.
4. ``certify``: copies certified per second in the ImageNet DensePure setting (K = 10 votes,
   S = 10 reverse steps, sigma 0.5, 3x256x256 images, BEiT-L at 512 after an on-device bicubic
   resize) through ``SmoothedBaseClassifier`` with the random-weight stand-ins, early exit
   off (random weights make early-exit savings meaningless; off is the paper's full cost), and
   the implied hours per image at n0 + n = 10,100 next to the compute floor at rate R.

Modes: ``fp32`` (cuDNN's TF32 default for convolutions, as PyTorch ships), ``bf16-autocast``
(fp32 weights under ``torch.autocast``, the engine's ``precision: bf16``), ``bf16`` (bf16
weights), ``bf16+cl`` (bf16 weights, channels_last), ``bf16+compile`` (bf16 weights,
``torch.compile``, static shapes, only at ``--compile-batches``).

The GPU machines of this project have torch, timm and numpy but no diffusers: carry its wheel
(docs/performance.md says how). The last line is ``key=value`` pairs; ``--json FILE`` writes
every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MODES = ("fp32", "bf16-autocast", "bf16", "bf16+cl", "bf16+compile")


# --------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, *, warmup: int, reps: int) -> float:
    """Median wall time of ``fn()`` in ms (CUDA events on a GPU), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def matmul_tflops(device: torch.device, n: int, reps: int) -> float:
    """Measured bf16 (fp32 on a CPU without fast bf16: still bf16, just slow) n^3 matmul rate."""
    g = torch.Generator(device=device).manual_seed(0)
    sets = [(torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g),
             torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)) for _ in range(3)]
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    i = [0]

    def step():
        a, b = sets[i[0] % 3]
        i[0] += 1
        torch.mm(a, b, out=out)

    ms = time_ms(step, device, warmup=3, reps=reps)
    if not torch.isfinite(out).all():
        raise RuntimeError("matmul produced non-finite values")
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


# --------------------------------------------------------------------------- models
def tiny_adm_config():
    from densepure_core.models.adm import AdmConfig

    return AdmConfig(image_size=32, num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                     attention_resolutions=(16,), num_head_channels=16, learn_sigma=True,
                     resblock_updown=True, use_scale_shift_norm=True)


def build_adm(tiny: bool, device: torch.device | str = "cpu"):
    """(UNet2DModel with random weights on ``device``, image size). ADM-256 unless ``tiny``."""
    torch.manual_seed(0)
    try:
        from densepure_core.models.adm import ADM_PRESETS, build_unet

        cfg = tiny_adm_config() if tiny else ADM_PRESETS["imagenet256-uncond"]
        # Initialised on the device itself: 552.8 M parameters initialise in seconds there.
        return build_unet(cfg, device=device).eval().requires_grad_(False), cfg.image_size
    except ImportError:  # no densepure_core.models.adm: the same architecture, spelled out
        from diffusers import UNet2DModel

        ch, mult, size = (32, (1, 2), 32) if tiny else (256, (1, 1, 2, 2, 4, 4), 256)
        attn = [size // (2 ** i) in ((16,) if tiny else (32, 16, 8)) for i in range(len(mult))]
        with torch.device(device):
            unet = UNet2DModel(
                sample_size=size, in_channels=3, out_channels=6, block_out_channels=tuple(ch * m for m in mult),
                layers_per_block=1 if tiny else 2, flip_sin_to_cos=True, freq_shift=0,
                down_block_types=tuple("AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attn),
                up_block_types=tuple("AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attn)),
                downsample_type="resnet", upsample_type="resnet", resnet_time_scale_shift="scale_shift",
                attention_head_dim=16 if tiny else 64, norm_num_groups=32, attn_norm_num_groups=32)
        return unet.eval().requires_grad_(False), size


def build_beit(tiny: bool, device: torch.device | str = "cpu"):
    """(timm BEiT with random weights on ``device``, input size). BEiT-L/16 at 512 unless ``tiny``."""
    import timm

    torch.manual_seed(0)
    with torch.device(device):
        if tiny:
            model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                      embed_dim=32, depth=1, num_heads=2, num_classes=10)
            return model.eval().requires_grad_(False), 32
        return timm.create_model("beit_large_patch16_512", pretrained=False).eval().requires_grad_(False), 512


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


def variant(model: torch.nn.Module, mode: str, device: torch.device):
    """(module to call, input dtype, autocast context factory) for a mode."""
    from densepure_core.models.accel import prepare_module

    if mode == "fp32":
        return model.float(), torch.float32, contextlib.nullcontext
    if mode == "bf16-autocast":
        return model.float(), torch.float32, lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    model = model.to(torch.bfloat16)
    if mode == "bf16":
        return model, torch.bfloat16, contextlib.nullcontext
    if mode == "bf16+cl":
        return (prepare_module(model, channels_last=True, compile=False, device=device), torch.bfloat16,
                contextlib.nullcontext)
    if mode == "bf16+compile":
        return (prepare_module(model, channels_last=False, compile=True, device=device,
                               compile_options={"dynamic": False}), torch.bfloat16, contextlib.nullcontext)
    raise ValueError(mode)


def sweep(name: str, build, call, flops_per_item: int, batches, modes, compile_batches, device, rate, reps,
          results: dict) -> None:
    """Time ``call(model, x)`` per mode and batch; print and record ms, TFLOP/s, fraction of R."""
    print(f"\n{name}: {flops_per_item / 1e12:.3f} TFLOP per image; R = {rate:.0f} TFLOP/s")
    print(f"  {'mode':<14} {'batch':>5} {'ms/call':>9} {'ms/image':>9} {'TFLOP/s':>8} {'of R':>6}")
    for mode in modes:
        base, size = build()
        model, dtype, ctx = variant(base, mode, device)
        for b in batches:
            if mode == "bf16+compile" and b not in compile_batches:
                continue
            x = torch.rand((b, 3, size, size), device=device, dtype=dtype)
            try:
                with torch.no_grad(), ctx():
                    ms = time_ms(lambda m=model, x=x: call(m, x), device, warmup=2, reps=reps)
            except torch.OutOfMemoryError:
                print(f"  {mode:<14} {b:>5}   out of memory")
                torch.cuda.empty_cache()
                continue
            tflops = flops_per_item * b / (ms * 1e-3) / 1e12
            results.setdefault(name, []).append({"mode": mode, "batch": b, "ms_per_call": ms,
                                                 "tflops": tflops, "fraction_of_matmul": tflops / rate})
            print(f"  {mode:<14} {b:>5} {ms:9.2f} {ms / b:9.3f} {tflops:8.4g} {100 * tflops / rate:5.1f}%",
                  flush=True)
        del model, base
        if device.type == "cuda":
            torch.cuda.empty_cache()


def best(results: dict, name: str, modes: tuple[str, ...]) -> dict:
    rows = [r for r in results.get(name, []) if r["mode"] in modes]
    if not rows:
        return {"tflops": float("nan"), "fraction_of_matmul": float("nan")}
    return max(rows, key=lambda r: r["tflops"])


# --------------------------------------------------------------------------- certify
def certify_section(args, device, rate, tiny: bool, results: dict) -> None:
    from densepure_core.models import Classifier
    from densepure_core.diffusion.purify import make_purifier, unet_denoiser
    from densepure_core.diffusion.schedule import DiffusionSchedule
    from densepure_core.smoothing import EngineOptions, SmoothedBaseClassifier

    unet, size = build_adm(tiny, device)
    beit, beit_size = build_beit(tiny, device)
    dtype = torch.bfloat16 if args.certify_dtype == "bf16" else torch.float32
    unet = unet.to(device=device, dtype=dtype)
    beit = beit.to(device=device, dtype=dtype)
    schedule = DiffusionSchedule.linear(variance_type="learned_range")  # ADM-256: linear, T = 1000
    purifier = make_purifier("densepure", unet_denoiser(unet), schedule, args.sigma, steps=args.steps)
    num_classes = beit.num_classes
    clf = Classifier(beit, input_size=beit_size, interpolation="bicubic", mean=0.5, std=0.5, in_chans=3,
                     num_classes=num_classes).to(device).eval()
    options = EngineOptions(
        batch_size=args.certify_batch, early_exit=False, pad_batches=True,
        precision="bf16" if args.certify_dtype == "bf16-autocast" else "fp32", device=device,
        noise_device=args.noise_device, cuda_graphs=args.graphs, compile=args.compile,
        channels_last=args.channels_last, model_name="stand-ins")
    sbc = SmoothedBaseClassifier(clf, purifier, args.sigma, votes=args.votes, num_classes=num_classes,
                                 options=options)
    x = torch.rand((3, size, size), generator=torch.Generator().manual_seed(0))
    # Warm-up, not timed: the K batches of one batch of copies (cuDNN autotuning, compile, graph
    # capture on the first).
    sbc.labels(x, "warm-up", range(args.certify_batch))
    sync(device)
    copies = args.certify_copies
    t0 = time.perf_counter()
    sbc.labels(x, "img-0", range(copies))
    sync(device)
    seconds = time.perf_counter() - t0
    cps = copies / seconds
    t_zero = torch.zeros(1, dtype=torch.long, device=device)
    unet_flops = results.get("unet_flops") or count_flops(
        lambda: unet(torch.rand((1, 3, size, size), device=device, dtype=dtype), t_zero))
    beit_flops = results.get("beit_flops") or count_flops(
        lambda: beit(torch.rand((1, 3, beit_size, beit_size), device=device, dtype=dtype)))
    per_copy = args.votes * (args.steps * unet_flops + beit_flops)
    per_image = 10_100 * per_copy
    floor_s = per_image / (rate * 1e12)
    hours = 10_100 / cps / 3600
    results["certify"] = {"copies": copies, "seconds": seconds, "copies_per_s": cps, "k": args.votes,
                          "s": args.steps, "batch": args.certify_batch, "dtype": args.certify_dtype,
                          "graphs": args.graphs, "noise_device": args.noise_device, "compile": args.compile,
                          "hours_per_image_10100": hours, "floor_hours_per_image": floor_s / 3600,
                          "achieved_tflops": per_copy * cps / 1e12}
    print(f"\ncertify (K={args.votes}, S={args.steps}, {size}px, classifier at {beit_size}px, batch "
          f"{args.certify_batch}, {args.certify_dtype}, graphs={args.graphs}, noise_device={args.noise_device}, "
          f"compile={args.compile}): {copies} copies in {seconds:.1f} s = {cps:.3f} copies/s; "
          f"{per_copy * cps / 1e12:.0f} TFLOP/s achieved; n0+n=10,100 copies: {hours:.2f} h per image "
          f"(compute floor at R: {floor_s / 3600:.2f} h)")


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="matmul,unet,beit,certify")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--unet-batches", default="8,16,32,64,128")
    ap.add_argument("--beit-batches", default="8,16,32,64")
    ap.add_argument("--compile-batches", default="64", help="batch sizes timed with bf16+compile")
    ap.add_argument("--matmul-n", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--votes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--certify-batch", type=int, default=64)
    ap.add_argument("--certify-copies", type=int, default=64)
    ap.add_argument("--certify-dtype", choices=["bf16", "bf16-autocast", "fp32"], default="bf16")
    ap.add_argument("--graphs", action="store_true", help="cuda_graphs in the certify section")
    ap.add_argument("--compile", action="store_true", help="torch.compile in the certify section")
    ap.add_argument("--channels-last", action="store_true", help="channels_last in the certify section")
    ap.add_argument("--noise-device", choices=["cpu", "device"], default="cpu")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models and sizes: checks the script runs")
    args = ap.parse_args(argv)
    tiny = args.dry_run
    if tiny:
        args.device, args.matmul_n, args.reps = "cpu", 256, 1
        args.unet_batches, args.beit_batches, args.compile_batches = "1,2", "1,2", ""
        args.modes = "fp32,bf16-autocast,bf16"
        args.votes, args.steps, args.certify_batch, args.certify_copies = 2, 2, 2, 2
    device = torch.device(args.device)
    with contextlib.suppress(ImportError):  # "modules that should be kept in float32: []" on every bf16 cast
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU machine (use --dry-run for a CPU smoke test)")
    sections = set(args.sections.split(","))
    modes = tuple(m for m in args.modes.split(",") if m)
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"gpu_models: {name}, torch {torch.__version__}, cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
          f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}{' (DRY RUN: tiny sizes)' if tiny else ''}")
    results: dict = {"device": name, "torch": torch.__version__, "dry_run": tiny}

    rate = float("nan")
    if "matmul" in sections or "unet" in sections or "beit" in sections or "certify" in sections:
        rate = matmul_tflops(device, args.matmul_n, reps=20 if not tiny else 2)
        results["matmul_tflops"] = rate
        print(f"matmul: bf16 {args.matmul_n}^3: {rate:.1f} TFLOP/s (R)")

    if "unet" in sections:
        unet, size = build_adm(tiny, device)
        results["unet_params"] = sum(p.numel() for p in unet.parameters())
        t1 = torch.zeros(1, dtype=torch.long, device=device)
        results["unet_flops"] = count_flops(lambda: unet(torch.rand((1, 3, size, size), device=device), t1))
        print(f"ADM UNet: {results['unet_params'] / 1e6:.1f} M parameters")
        del unet

        def call_unet(model, x):
            t = torch.full((x.shape[0],), 500, dtype=torch.long, device=x.device)
            return model(x, t).sample

        sweep("unet", lambda: build_adm(tiny, device), call_unet, results["unet_flops"], ints(args.unet_batches), modes,
              ints(args.compile_batches), device, rate, args.reps, results)
    if "beit" in sections:
        beit, size = build_beit(tiny, device)
        results["beit_params"] = sum(p.numel() for p in beit.parameters())
        results["beit_flops"] = count_flops(lambda: beit(torch.rand((1, 3, size, size), device=device)))
        print(f"\nBEiT: {results['beit_params'] / 1e6:.1f} M parameters")
        del beit
        sweep("beit", lambda: build_beit(tiny, device), lambda m, x: m(x), results["beit_flops"],
              ints(args.beit_batches), modes, ints(args.compile_batches), device, rate, args.reps, results)
    if "certify" in sections:
        certify_section(args, device, rate, tiny, results)

    bf16_modes = ("bf16-autocast", "bf16", "bf16+cl", "bf16+compile")
    u, b = best(results, "unet", bf16_modes), best(results, "beit", bf16_modes)
    summary = {
        "device": name.replace(" ", "_"), "matmul_tflops": float(f"{rate:.4g}"),
        "unet_bf16_best_tflops": float(f"{u['tflops']:.4g}"),
        "unet_bf16_best_fraction": round(u["fraction_of_matmul"], 3),
        "beit_bf16_best_tflops": float(f"{b['tflops']:.4g}"),
        "beit_bf16_best_fraction": round(b["fraction_of_matmul"], 3),
        "copies_per_s": round(results.get("certify", {}).get("copies_per_s", float("nan")), 4),
        # A dry run's tiny models say nothing about the target.
        "unet_target_met": (None if tiny or math.isnan(u["fraction_of_matmul"])
                            else bool(u["fraction_of_matmul"] >= 0.5)),
        "dry_run": tiny,
    }
    results["summary"] = summary
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return results


if __name__ == "__main__":
    main()
