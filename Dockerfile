# syntax=docker/dockerfile:1
# One image build for the whole shop: a target per binary.
#
#   docker build --target user-service -t shop/user-service .
#   docker build --target order-service -t shop/order-service .
#   docker build --target notification-service -t shop/notification-service .
#   docker build --target shopctl -t shop/shopctl .
#
# Dependencies are compiled in their own layer (cargo-chef), so a change to
# the project's code rebuilds only the project. The runtime is distroless:
# no shell, no package manager, a non-root user (65532), CA certificates.
# Services bind 0.0.0.0 inside the container (the local stack binds loopback).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked \
      -p user-service -p order-service -p notification-service -p shopctl

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.source="https://github.com/shop/shop" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="shop"
USER 65532:65532
ENV APP_LOG_FORMAT=json

FROM runtime AS user-service
LABEL org.opencontainers.image.title="user-service" \
      org.opencontainers.image.description="Users, credentials and access tokens"
COPY --from=builder /src/target/release/user-service /usr/local/bin/user-service
ENV APP_GRPC_ADDR=0.0.0.0:50051 \
    APP_ADMIN_ADDR=0.0.0.0:9091
EXPOSE 50051 9091
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/user-service", "--healthcheck"]
ENTRYPOINT ["/usr/local/bin/user-service"]

FROM runtime AS order-service
LABEL org.opencontainers.image.title="order-service" \
      org.opencontainers.image.description="Event-sourced orders, read models, outbox relay"
COPY --from=builder /src/target/release/order-service /usr/local/bin/order-service
ENV APP_GRPC_ADDR=0.0.0.0:50052 \
    APP_ADMIN_ADDR=0.0.0.0:9092
EXPOSE 50052 9092
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/order-service", "--healthcheck"]
ENTRYPOINT ["/usr/local/bin/order-service"]

FROM runtime AS notification-service
LABEL org.opencontainers.image.title="notification-service" \
      org.opencontainers.image.description="Notifications from order and user events"
COPY --from=builder /src/target/release/notification-service /usr/local/bin/notification-service
ENV APP_GRPC_ADDR=0.0.0.0:50053 \
    APP_ADMIN_ADDR=0.0.0.0:9093
EXPOSE 50053 9093
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/notification-service", "--healthcheck"]
ENTRYPOINT ["/usr/local/bin/notification-service"]

FROM runtime AS shopctl
LABEL org.opencontainers.image.title="shopctl" \
      org.opencontainers.image.description="The shop's operator CLI: demo, load, status, projections, DLQ"
COPY --from=builder /src/target/release/shopctl /usr/local/bin/shopctl
ENTRYPOINT ["/usr/local/bin/shopctl"]
