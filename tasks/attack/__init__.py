"""The attack evaluation's stages: plan -> attack -> summary and report.

Imports :mod:`tasks.common` and :mod:`densepure_core`, never another job's package.
"""
