"""The ADDT training job's stages: plan -> train on Ray Train -> export the model -> report.

Imports :mod:`tasks.common` and :mod:`densepure_core`, never another job's package.
"""
