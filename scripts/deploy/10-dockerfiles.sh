#!/usr/bin/env bash
# The images' Dockerfiles, checked without a container engine (deploy/docker/check.py: stages,
# pinned bases, a non-root user, a health check, COPY sources present and not .dockerignored,
# the binary built by scripts/release.sh), then the check's own self-test: broken copies of
# each Dockerfile must fail, each for its reason. Where docker runs, build them as well:
#   docker build -f deploy/docker/gateway.Dockerfile .
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bash -n scripts/release.sh
python3 deploy/docker/check.py --self-test
