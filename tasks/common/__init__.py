"""The run machinery every job shares: storage, the OUT layout, the Ray pool, shard completeness,
quarantine, the SQL connection and its UDFs, text formatting.

Imports :mod:`densepure_core` and this package only, never a job package (``tasks.certify``,
``tasks.attack``, ``tasks.train_addt``).
"""
