"""tasks: the pipeline's stages (Prefect tasks and Ray actor code), one package per job.

- ``common``: the run machinery every job shares (storage, the OUT layout, the Ray pool, shard
  completeness, quarantine, the SQL connection and its UDFs, text formatting, plan and worker
  helpers);
- ``certify``: plan -> vote -> aggregate -> report (``densepure certify``);
- ``attack``: plan -> attack -> summary and report (``densepure attack``);
- ``train_addt``: plan -> train on Ray Train -> export -> report (``densepure train-addt``);
- ``query``: ``densepure sql``, every job's views on one read-only connection.

Imports point one way: a job imports ``common`` and :mod:`densepure_core`, never another job;
``common`` imports no job (``tests/tasks/test_layering.py``).
"""
