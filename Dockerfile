# The atlas-runner image: one static-ish binary on a slim base with a JRE for the server it runs.
# Build: docker build -t atlas-runner .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin atlas-runner

FROM eclipse-temurin:21-jre
RUN useradd --uid 1000 --home-dir /data --no-create-home minecraft && mkdir -p /data && chown minecraft /data
COPY --from=build /src/target/release/atlas-runner /usr/local/bin/atlas-runner
USER 1000
WORKDIR /data
ENTRYPOINT ["/usr/local/bin/atlas-runner"]
