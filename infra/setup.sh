#!/usr/bin/env bash
# Create or update .venv from requirements/lock.txt. Called by `make setup`; idempotent.
#
# - uv is installed with pip (user site) when missing.
# - On machines that carry a local CPU torch wheel in /opt/wheels (this project's dev and CI
#   machines), uv looks there too, so torch==2.13.0 resolves to the CPU build and no CUDA
#   packages are pulled. Elsewhere the same pin takes the registry's build (CUDA on Linux).
# - The torchvision import fix (infra/_densepure_tvfix.py) is installed into site-packages
#   through a .pth file; it is a no-op on a CUDA torch.
# - Bytecode is compiled (PYTHONDONTWRITEBYTECODE is set on these machines; imports of
#   torch+timm+diffusers+prefect+ray take 2.5x longer without it).
set -euo pipefail
cd "$(dirname "$0")/.."

UV=$(command -v uv || true)
if [ -z "$UV" ]; then
  python3 -m pip install --quiet --user uv
  UV=$(python3 -c 'import site,os;print(os.path.join(site.USER_BASE,"bin","uv"))')
fi

FIND_LINKS=()
if [ -d /opt/wheels ]; then FIND_LINKS=(--find-links /opt/wheels); fi

[ -x .venv/bin/python ] || "$UV" venv --quiet --python "${DENSEPURE_PYTHON:-python3.11}" .venv
"$UV" pip install --quiet --python .venv/bin/python --compile-bytecode "${FIND_LINKS[@]}" \
  -r requirements/lock.txt
"$UV" pip install --quiet --python .venv/bin/python --compile-bytecode --no-deps -e .

SITE=$(.venv/bin/python -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')
cp infra/_densepure_tvfix.py infra/densepure_tvfix.pth "$SITE/"
.venv/bin/python -c 'import timm, diffusers' >/dev/null
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch;print("torch", torch.__version__)'))"
