"""The certification job's stages: plan -> vote -> aggregate -> report.

Imports :mod:`tasks.common` and :mod:`densepure_core`, never another job's package.
"""
