# syntax=docker/dockerfile:1
# Multi-stage build of the socialcard binary: every service is in it, and each container runs one with
# `socialcard serve <service>` (docker-compose.yml, deploy/k8s/), or all of them with `socialcard up`.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# librdkafka is built from source (rdkafka-sys): a C toolchain, make and zlib, all in this image.
COPY . .
# Cache mounts keep the registry and the build between image builds; the binary is copied out of them.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin socialcard \
    && cp target/release/socialcard /usr/local/bin/socialcard

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/socialcard socialcard \
    # Owned by the service user so volumes mounted here start writable by it (data, generated PKI).
    && mkdir -p /var/lib/socialcard /etc/socialcard/pki /etc/socialcard/banks \
    && chown socialcard /var/lib/socialcard /etc/socialcard/pki
COPY --from=build /usr/local/bin/socialcard /usr/local/bin/socialcard
# The partner banks' files; a bind mount or a ConfigMap replaces them.
COPY deploy/banks/ /etc/socialcard/banks/
ENV SOCIALCARD_DATA_DIR=/var/lib/socialcard \
    SOCIALCARD_BANKS_DIR=/etc/socialcard/banks
USER 10001:10001
WORKDIR /var/lib/socialcard
# gRPC: registry 50051, bank adapters 50061-50071, postal 50081 (webhook 50082), loss coordinator 50083,
# ops 50084 (dashboard 50085); Prometheus metrics 9464.
EXPOSE 50051 50061-50071 50081-50085 9464
ENTRYPOINT ["socialcard"]
# The embedded default in one container; the distributed shape overrides it per service.
CMD ["up", "--registry-listen", "0.0.0.0:50051", "--bank-host", "0.0.0.0", "--metrics-listen", "0.0.0.0:9464", \
     "--postal-listen", "0.0.0.0:50081", "--postal-webhook-listen", "0.0.0.0:50082", "--loss-listen", "0.0.0.0:50083", \
     "--ops-listen", "0.0.0.0:50084", "--ops-dashboard-listen", "0.0.0.0:50085"]
