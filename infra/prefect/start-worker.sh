#!/usr/bin/env bash
# Start a Prefect worker for the "densepure" process pool: it polls the server and runs each
# flow run as a subprocess in $DENSEPURE_HOME (the pull step of prefect.yaml).
#
# Run it where the flows can reach Ray: on the Ray head node (deployments pass
# ray_address "auto"), or on any machine for the deployments that start local Ray.
#
# Usage: PREFECT_API_URL=http://HOST:4200/api DENSEPURE_HOME=/opt/densepure infra/prefect/start-worker.sh [prefect worker start options]
#   e.g. --run-once (take the runs that are due, wait for them, exit), --limit 2
set -euo pipefail
: "${PREFECT_API_URL:?set PREFECT_API_URL to the API of the Prefect server, e.g. http://127.0.0.1:4200/api}"
export DENSEPURE_HOME=${DENSEPURE_HOME:-$(cd "$(dirname "$0")/../.." && pwd)}
# --no-create-pool-if-not-found: a pool the worker made itself would lack work-pool.json's
# settings; a missing pool should stop here, naming create-work-pool.sh.
exec prefect --no-prompt worker start --pool "${DENSEPURE_POOL:-densepure}" --type process \
  --name "densepure-$(hostname)" --no-create-pool-if-not-found "$@"
