# syntax=docker/dockerfile:1
# The gateway image: `docker build -f deploy/docker/gateway.Dockerfile -t garage-gateway .`
# (the build context is the repository root; .dockerignore keeps it to the sources).
#
# Binary   /usr/local/bin/gateway: the static x86_64 musl release artefact, built here by
#          scripts/release.sh exactly as a release is; its CycloneDX SBOMs in /usr/share/doc/garage.
# Runs     `gateway serve` (ENTRYPOINT gateway, CMD serve): configuration from GARAGE_* variables,
#          or mount a file and run `serve --config /etc/garage/gateway.toml` (docs/configuration.md).
# User     65532:65532 (garage), not root; it owns only /var/lib/garage.
# Port     8080 (GARAGE_LISTEN=0.0.0.0:8080): the OpenAI API, /admin, /node (rigs connect here),
#          the console, /metrics. Plain HTTP; TLS with GARAGE_TLS_CERT_FILE and _KEY_FILE, or in
#          front of it.
# Volume   /var/lib/garage: the admin token file (GARAGE_AUTH_ADMIN_TOKEN_FILE, generated at the
#          first start when missing). The embedded store lives in memory: for state that survives
#          a restart, or several replicas, set GARAGE_STORE=redis://... (docs/redis.md).
# Env      GARAGE_LISTEN, GARAGE_AUTH_ADMIN_TOKEN_FILE as below; GARAGE_AUTH_KEY_SECRET (required
#          with Redis), GARAGE_AUTH_ADMIN_TOKEN, GARAGE_STORE, GARAGE_LOG_FORMAT and every other
#          field of docs/gateway.toml as GARAGE_<PATH>. RUST_LOG sets the log filter.
# Health   `gateway health`: GET /health on the GARAGE_LISTEN port, exit 0 or 1 (no curl here).
#
# Runtime base: `scratch`. The binary is static (musl, mimalloc as its allocator, so musl's slow
# malloc is not on the request path) and trusts the web's root CAs compiled into it
# (webpki-roots), so it needs no libc, no CA bundle and no shell. What the image holds is the
# binary, its SBOMs, /etc/passwd and /etc/group naming the user, and /tmp. Nothing to patch but
# the binary itself.

# ---- build: the release script, as scripts/release.sh runs it on a release machine
FROM rust:1.95.0-slim-bookworm AS build
# musl-gcc for ring's and mimalloc's C code; python3 for the release script's embedding check.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools python3 binutils \
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
RUN scripts/release.sh --out /out gateway
# The filesystem of the final image, owned as it will be used.
RUN mkdir -p /rootfs/etc /rootfs/tmp /rootfs/var/lib/garage /rootfs/usr/share/doc/garage \
 && chmod 1777 /rootfs/tmp \
 && chown 65532:65532 /rootfs/var/lib/garage \
 && echo 'garage:x:65532:65532:garage:/var/lib/garage:/sbin/nologin' >/rootfs/etc/passwd \
 && echo 'garage:x:65532:' >/rootfs/etc/group \
 && cp /out/*.cdx.json /out/BUILDINFO /out/SHA256SUMS /rootfs/usr/share/doc/garage/

# ---- runtime
FROM scratch
COPY --from=build /rootfs/ /
COPY --from=build /out/gateway /usr/local/bin/gateway
USER 65532:65532
WORKDIR /var/lib/garage
ENV GARAGE_LISTEN=0.0.0.0:8080 \
    GARAGE_AUTH_ADMIN_TOKEN_FILE=/var/lib/garage/admin-token
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=6s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/gateway", "health"]
ENTRYPOINT ["/usr/local/bin/gateway"]
CMD ["serve"]
