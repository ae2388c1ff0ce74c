# The app's image for Flower's deployment engine (flwr 1.41, process isolation):
# it runs `flower-superexec`, which starts the ServerApp (next to the SuperLink) or the
# ClientApps (next to a SuperNode) as the SuperLink / SuperNode ask. The SuperLink and the
# SuperNodes themselves use Flower's own images, flwr/superlink and flwr/supernode, unchanged.
#
#   docker build -t fl-app-superexec:0.1.0 .          (docker compose builds it for you)
#
# The app's code reaches the processes as a FAB (`flwr run` ships it: fl_app, server_app,
# client_app, profiles). What the image must hold is what the FAB cannot: the dependencies.
# The code is copied to /app as well, so `python -m fl_app.measure` works inside a container;
# it is not on the ClientApp's import path (Flower puts the installed FAB first).

# Keep equal to the flwr pin in pyproject.toml (tests/test_deployment.py checks it). Python 3.11,
# as in development and CI (Flower publishes <version>-py3.1x-ubuntu24.04 tags for amd64 and arm64;
# the plain <version> tag is the newest Python). The image runs as user app (uid 49999), HOME=/app,
# with a virtual environment at /python/venv that this user may install into.
ARG FLWR_VERSION=1.41.0
ARG PYTHON_TAG=py3.11-ubuntu24.04
FROM flwr/superexec:${FLWR_VERSION}-${PYTHON_TAG}

# CPU-only PyTorch: the default PyPI wheel for linux/x86_64 drags in several GB of CUDA
# libraries. The CPU index has x86_64 and aarch64 wheels, so this image builds on an arm64
# host (a Raspberry Pi 4/5 with 64-bit OS) too, where pyproject.toml's platform markers pick
# torch 2.9.1. Override for a GPU base if you have one, or where the CPU index is not reachable:
# scripts/compose_federation.py (CI) builds with --build-arg TORCH_INDEX_URL=https://pypi.org/simple
# (a CUDA build of torch 2.14.1 that runs on the CPU: a 6 GB image).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG FLWR_VERSION

WORKDIR /app

# 1. Dependencies from pyproject.toml (this layer is cached while only the code changes).
#    flwr is already in the base image at exactly FLWR_VERSION; its [simulation] extra (Ray)
#    is not needed in a deployment. torch/torchvision come from the CPU index, at the pins.
COPY --chown=app:app pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
open('/tmp/torch.txt', 'w').write('\n'.join(d for d in deps if d.split('=')[0].strip() in ('torch', 'torchvision')) + '\n'); \
open('/tmp/rest.txt', 'w').write('\n'.join(d for d in deps if not d.startswith('flwr')) + '\n')" \
 && python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" -r /tmp/torch.txt \
 && python -m pip install --no-cache-dir -r /tmp/rest.txt \
 && python -c "import importlib.metadata as m, sys; v = m.version('flwr'); \
sys.exit(0 if v == '${FLWR_VERSION}' else 'flwr ' + v + ' in the base image, expected ${FLWR_VERSION}')" \
 && rm /tmp/torch.txt /tmp/rest.txt

# 2. The app itself (for fl_app.measure and the profiles inside the container), and the
#    folder the ServerApp writes results to (a named volume in docker-compose.yml).
COPY --chown=app:app fl_app ./fl_app
COPY --chown=app:app server_app ./server_app
COPY --chown=app:app client_app ./client_app
COPY --chown=app:app profiles ./profiles
RUN mkdir -p /app/outputs

ENV FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0

ENTRYPOINT ["flower-superexec"]
