# syntax=docker/dockerfile:1
# The rig agent's image: `docker build -f deploy/docker/node-runner.Dockerfile -t garage-node-runner .`
# (the build context is the repository root; .dockerignore keeps it to the sources).
#
# Binary   /usr/local/bin/node-runner: the release artefact, built here by scripts/release.sh
#          exactly as a release is (glibc, see below); its CycloneDX SBOM in /usr/share/doc/garage.
# Runs     `node-runner run` with /etc/node-runner/node-runner.toml (the working directory, so
#          `run` and `health` read the same file): mount the rig's config there, read-only.
# User     10001:10001 (node-runner), not root. To start vLLM containers it talks to the host's
#          Docker or Podman through its socket, which makes whoever can use the socket root on
#          the host in all but name: give the container the socket's group, e.g.
#            --group-add "$(stat -c %g /var/run/docker.sock)"
#          or, with rootless Podman, run it as the socket's owner (--user "$(id -u):$(id -g)")
#          and point the engines' `docker_host` at the mounted socket.
# Network  the host's (--network host): the engines it starts publish their port on the host's
#          127.0.0.1 only (node-runner/src/engines/docker.rs), and the agent connects out to the
#          gateway. Nothing listens in this image; no port is exposed.
# Volumes  /etc/node-runner (config, read-only), /var/lib/node-runner (the rig's identity:
#          NODE_RUNNER_STATE_FILE; keep it, or the rig must enroll again), /var/run/docker.sock.
#          An engine's `model_cache` is a path on the host: the daemon mounts it into vLLM.
# GPUs     NVML (GPU names, memory, utilisation, temperature, power in heartbeats) comes from the
#          NVIDIA Container Toolkit: run with --gpus all (or --device nvidia.com/gpu=all with CDI);
#          NVIDIA_DRIVER_CAPABILITIES=utility below asks it for libnvidia-ml and nvidia-smi only.
#          Without it the rig runs and reports no GPUs.
# Env      NODE_RUNNER_GATEWAY_URL, NODE_RUNNER_ENROLLMENT_TOKEN (first start only),
#          NODE_RUNNER_NAME, NODE_RUNNER_STATE_FILE, NODE_RUNNER_GATEWAY_CA_FILE override the
#          config (docs/rigs.md). RUST_LOG sets the log filter.
# Health   `node-runner health`: enrolled, and every engine on a fixed port answers /health. The
#          start period is long because vLLM loads a model for minutes before it answers.
#
# Runtime base: Debian 12 slim, glibc. nvml-wrapper loads libnvidia-ml.so.1 with dlopen, which a
# static musl binary cannot do (tried: "Dynamic loading not supported"), and the toolkit injects
# the driver's glibc libraries into the container. The builder is Debian 12 as well, so the
# binary's glibc requirement is met by the runtime's.

# ---- build: the release script, as scripts/release.sh runs it on a release machine
FROM rust:1.95.0-slim-bookworm AS build
# musl-gcc is not needed for this glibc artefact; python3 and binutils for the release script.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 binutils \
 && rm -rf /var/lib/apt/lists/*
# The SBOM tool at the version scripts/release.sh pins (scripts/deploy/10-dockerfiles.sh checks).
ARG CARGO_CYCLONEDX_VERSION=0.5.9
RUN cargo install --locked cargo-cyclonedx --version "$CARGO_CYCLONEDX_VERSION"
WORKDIR /src
# The workspace: every member (Cargo.toml's list) and what they build from.
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
COPY wit/ wit/
COPY tls/ tls/
COPY node-protocol/ node-protocol/
COPY sim-engine/ sim-engine/
COPY plugin-sdk/ plugin-sdk/
COPY plugins/ plugins/
COPY gateway/ gateway/
COPY node-runner/ node-runner/
COPY cli/ cli/
COPY bench/hyper-floor/ bench/hyper-floor/
COPY scripts/release.sh scripts/release.sh
RUN scripts/release.sh --out /out node-runner

# ---- runtime
FROM debian:12.12-slim
RUN groupadd --system --gid 10001 node-runner \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/node-runner --shell /usr/sbin/nologin node-runner \
 && mkdir -p /etc/node-runner /var/lib/node-runner /usr/share/doc/garage \
 && chown 10001:10001 /var/lib/node-runner
COPY --from=build /out/node-runner /usr/local/bin/node-runner
COPY --from=build /out/node-runner.cdx.json /out/BUILDINFO /out/SHA256SUMS /usr/share/doc/garage/
USER 10001:10001
WORKDIR /etc/node-runner
ENV NODE_RUNNER_STATE_FILE=/var/lib/node-runner/state.json \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=utility
HEALTHCHECK --interval=30s --timeout=10s --start-period=15m --retries=3 \
    CMD ["/usr/local/bin/node-runner", "health"]
ENTRYPOINT ["/usr/local/bin/node-runner"]
CMD ["run"]
