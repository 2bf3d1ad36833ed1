# One image for every role; docker-compose.yml runs the nodes and the proxy from it.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked && cp target/release/gitfleet /usr/local/bin/gitfleet

FROM debian:bookworm-slim
# git does the work on the nodes; bash runs the health checks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends git ca-certificates bash \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/gitfleet gitfleet \
 && mkdir -p /var/lib/gitfleet \
 && chown gitfleet:gitfleet /var/lib/gitfleet
COPY --from=build /usr/local/bin/gitfleet /usr/local/bin/gitfleet
USER gitfleet
ENTRYPOINT ["gitfleet"]
