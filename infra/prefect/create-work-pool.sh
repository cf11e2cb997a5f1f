#!/usr/bin/env bash
# Create (or update) the Prefect work pool that prefect.yaml's deployments name: a process pool
# "densepure" whose base job template is infra/prefect/work-pool.json.
#
# The template is Prefect's default for process pools with one change: default environment
# variables for every flow run (OMP_WAIT_POLICY=PASSIVE, which the CLI sets for its own runs
# in flows/environment.py; PREFECT_LOGGING_LEVEL=INFO, so the run's logs reach the server).
# A deployment can add to them with work_pool.job_variables.env.
#
# Usage: PREFECT_API_URL=http://HOST:4200/api infra/prefect/create-work-pool.sh [POOL] [CONCURRENCY]
#   POOL         pool name (default densepure, as in prefect.yaml)
#   CONCURRENCY  flow runs at a time across the pool's workers (default 4; each certify run
#                drives its own Ray job, so this bounds how many share the cluster)
set -euo pipefail
cd "$(dirname "$0")/../.."
POOL=${1:-densepure}
CONCURRENCY=${2:-4}
prefect work-pool create "$POOL" --type process --base-job-template infra/prefect/work-pool.json --overwrite
prefect work-pool set-concurrency-limit "$POOL" "$CONCURRENCY"
