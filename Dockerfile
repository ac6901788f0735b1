# agentq container image: agentq-worker (the ENTRYPOINT), agentq-producer,
# agentqctl and agentq-mockllm, with the SQL migrations for
# `agentqctl migrate`. Two stages on Debian 12 (bookworm): the build stage
# has the compilers and -dev packages, the runtime stage only the shared
# libraries the binaries load.
#
#   docker build --build-arg VERSION=0.1.0 -t agentq:0.1.0 .
#   docker build --build-arg AGENTQ_TEST=1 -t agentq:0.1.0 .   # + unit tests
#   docker run --rm agentq:0.1.0 --help
#   docker run --rm --entrypoint agentqctl agentq:0.1.0 --help
#
# Building for a cluster and pushing to a registry (docs/deploy.md, "Build
# and push the image"):
#
#   docker buildx build --platform linux/amd64 --build-arg VERSION=0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg SOURCE="$(git remote get-url origin)" \
#     -t REGISTRY/agentq:0.1.0 --push .
#
# Base images: pinned to a Debian 12 point release, so a rebuild gets the
# same base, not whatever `debian:12` points at that day (the packages
# apt-get installs on top are still bookworm's current ones, security
# updates included). To move to a newer point release, change both tags.
# To pin the exact bytes too, append the multi-arch index digest, which
#   docker buildx imagetools inspect debian:12.15-slim   (the "Digest:" line)
# prints, e.g. debian:12.15-slim@sha256:<64 hex digits>; or pass it at build
# time: --build-arg RUNTIME_IMAGE=debian:12.15-slim@sha256:... .
# tests/k8s/check refuses an unpinned FROM.
ARG BUILD_IMAGE=debian:12.15
ARG RUNTIME_IMAGE=debian:12.15-slim

FROM ${BUILD_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake pkg-config \
      librabbitmq-dev libpq-dev libcurl4-openssl-dev libjansson-dev \
      libconfig-dev libevent-dev check \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# AGENTQ_INTEGRATION=OFF: the integration tests need a RabbitMQ and a
# PostgreSQL that the build has no business starting. The install prefix
# is compiled in (agentqctl's default SQL directory), so it must be the
# prefix the runtime stage uses; DESTDIR only stages the files.
ARG AGENTQ_TEST=0
RUN cmake -S . -B /build -DAGENTQ_INTEGRATION=OFF -DCMAKE_INSTALL_PREFIX=/usr/local \
 && cmake --build /build -j"$(nproc)" \
 && if [ "$AGENTQ_TEST" = 1 ]; then ctest --test-dir /build -L unit --output-on-failure; fi \
 && DESTDIR=/out cmake --install /build --strip

FROM ${RUNTIME_IMAGE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      librabbitmq4 libpq5 libcurl4 libjansson4 libconfig9 \
      libevent-2.1-7 libevent-pthreads-2.1-7 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# OCI image annotations (https://github.com/opencontainers/image-spec,
# annotations.md): what registries and scanners show. VERSION, REVISION
# and SOURCE (the repository's URL) come from the build (--build-arg);
# the rest is fixed.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown
ARG RUNTIME_IMAGE
LABEL org.opencontainers.image.title="agentq" \
      org.opencontainers.image.description="agentq worker fleet: runs LLM agent tasks from RabbitMQ, results in PostgreSQL (agentq-worker, agentq-producer, agentqctl, agentq-mockllm)" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${RUNTIME_IMAGE}"

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it and
# the manifests in k8s/ can name it (runAsUser: 10001; tests/k8s/check
# compares them).
RUN groupadd --system --gid 10001 agentq \
 && useradd --system --uid 10001 --gid agentq --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin agentq

COPY --from=build /out/usr/local/ /usr/local/

# Where agentqctl finds the migrations (also its compiled-in default;
# explicit so a different prefix cannot silently break `migrate`).
ENV AGENTQ_SQL_DIR=/usr/local/share/agentq/sql

USER 10001:10001
# metrics.listen default: /metrics, /healthz, /readyz
EXPOSE 9464
# Exec form: the worker is PID 1 and gets SIGTERM itself, which starts its
# drain (stop consuming, finish in-flight work for worker.drain_seconds,
# requeue the rest); a second signal exits at once.
ENTRYPOINT ["agentq-worker"]
