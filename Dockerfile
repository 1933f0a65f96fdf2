# The atlas-runner image: the binary on Debian with the JREs real servers need (21 for 1.21.x, 25 for the
# year-numbered 26.x) under /usr/lib/jvm/NAME/, where the runner's Java search looks.
#
# A user's build runs every stage: `build` (cargo in the Rust image), `jre21`, `jre25`, `runtime` (Debian
# slim + both Temurin JREs) and the last, unnamed stage. It works with BuildKit, the legacy builder,
# podman and buildah alike (.dockerignore keeps target/ and .git out of the context):
#     docker build -t atlas-runner .
# The test bed (testbed/src/image.rs) builds this same file with buildah, where no registry is reachable:
# a named build context `build` (a directory holding the release binary built on the host) stands in
# for the `build` stage, and its own base image for `runtime`, so only the last stage runs:
#     buildah bud --build-context build=DIR --build-arg RUNTIME_IMAGE=<base> -f Dockerfile DIR
ARG RUST_IMAGE=rust:1.95-bookworm
ARG DEBIAN_IMAGE=debian:bookworm-slim
ARG JRE21_IMAGE=eclipse-temurin:21-jre
ARG JRE25_IMAGE=eclipse-temurin:25-jre
# The image the final stage starts from: `runtime` below, or any image that carries the JREs the same way.
ARG RUNTIME_IMAGE=runtime

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin atlas-runner && cp target/release/atlas-runner /atlas-runner

FROM ${JRE21_IMAGE} AS jre21
FROM ${JRE25_IMAGE} AS jre25

FROM ${DEBIAN_IMAGE} AS runtime
COPY --from=jre21 /opt/java/openjdk /usr/lib/jvm/temurin-21-jre
COPY --from=jre25 /opt/java/openjdk /usr/lib/jvm/temurin-25-jre
# Debian slim has no CA certificates, and every HTTPS request of the binary (Mojang, PaperMC,
# Fabric, Modrinth, a pack hub, S3) trusts the system's: the Temurin image's, its bundle
# (/etc/ssl/certs/ca-certificates.crt) and the certificates the directory's links point to.
COPY --from=jre25 /etc/ssl/certs /etc/ssl/certs
COPY --from=jre25 /usr/share/ca-certificates /usr/share/ca-certificates

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="atlas-runner" \
      org.opencontainers.image.description="Runs Minecraft servers on Kubernetes and on plain hosts: packs, supervision, backups, metrics" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
# A fixed non-root uid/gid (the pod's runAsUser and fsGroup), owning the data volume.
RUN groupadd --gid 10001 minecraft \
    && useradd --uid 10001 --gid 10001 --home-dir /data --no-create-home --shell /usr/sbin/nologin minecraft \
    && mkdir -p /data \
    && chown 10001:10001 /data
COPY --from=build /atlas-runner /usr/local/bin/atlas-runner
# Without a UTF-8 locale the JVM's file names are ASCII (sun.jnu.encoding), and a world or plugin
# path with other characters cannot be opened.
ENV LANG=C.UTF-8
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
# 25565: Minecraft; 9100: /metrics, /healthz and /readyz.
EXPOSE 25565 9100
ENTRYPOINT ["/usr/local/bin/atlas-runner"]
