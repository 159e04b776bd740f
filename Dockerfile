# Builds every service binary; the compose file picks one per container.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin secret-service --bin authz-service --bin vault-config-service --bin gateway

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data secrets \
 && mkdir -p /data && chown secrets /data
COPY --from=build /src/target/release/secret-service /src/target/release/authz-service \
     /src/target/release/vault-config-service /src/target/release/gateway /usr/local/bin/
USER secrets
WORKDIR /data
