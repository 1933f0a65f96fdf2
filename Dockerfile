# The atlas-runner image: one static-ish binary on a slim base with a JRE for the server it runs.
# Build: docker build -t atlas-runner .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin atlas-runner

# Java 25 runs both 1.21.x (which needs 21+) and the year-numbered 26.x (which needs 25).
FROM eclipse-temurin:25-jre
RUN useradd --uid 10001 --home-dir /data --no-create-home minecraft && mkdir -p /data && chown minecraft /data
COPY --from=build /src/target/release/atlas-runner /usr/local/bin/atlas-runner
USER 10001
WORKDIR /data
ENTRYPOINT ["/usr/local/bin/atlas-runner"]
