"""densepure_core: the pure library under the pipeline (torch, diffusers, timm, numpy, scipy,
pydantic; no Prefect, no Ray, no DuckDB, no I/O beyond model and image loading).

One folder per idea; dependencies point one way (``tests/densepure_core/test_core_layering.py``
holds the whole graph):

- ``certification``: from vote counts to certified radii (fixed and sequential bounds);
- ``diffusion``: schedule, sigma -> t*, re-spacing, the one reverse step, the purifiers;
- ``smoothing``: the smoothed base classifier (noise -> purify K times -> classify -> counts);
- ``attack``: attack evaluation of purification (PGD-EOT, deterministic white-box, BPDA, scoring);
- ``addt``: ADDT's formulas and its training step;
- ``models``: loading the two models, the ADM converter and presets, the bundled digits recipe;
- ``data``: the bundled digits and image sources;
- ``config``: the three jobs' configs, the field declarations, the packaged YAML presets;
- ``rng`` (keyed seeds and noise sources) and ``remote`` (local and ``s3://`` filesystems): leaves.
"""
