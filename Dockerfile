# Multi-stage build of the socialcard binary (all services; each container runs one of them).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin socialcard

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 socialcard
COPY --from=build /src/target/release/socialcard /usr/local/bin/socialcard
USER socialcard
WORKDIR /var/lib/socialcard
ENTRYPOINT ["socialcard"]
CMD ["up", "--data-dir", "/var/lib/socialcard", "--registry-listen", "0.0.0.0:50051"]
