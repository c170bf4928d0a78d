# mxrelay container image: build with cargo, run the binary alone on a slim
# Debian base as a non-root user. Listens on unprivileged ports (SMTP 2525,
# admin 9425); compose/Kubernetes map port 25 to 2525.
#   docker build -t mxrelay .
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
RUN cargo build --release --locked \
    && strip target/release/mxrelay

FROM debian:bookworm-slim
# Migrations are compiled into the binary; the SQL is shipped for reference.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/mxrelay --create-home mxrelay
COPY --from=build /src/target/release/mxrelay /usr/local/bin/mxrelay
COPY migrations /usr/share/mxrelay/migrations
USER 10001:10001
WORKDIR /var/lib/mxrelay
ENV MXRELAY_SMTP_LISTEN=0.0.0.0:2525 \
    MXRELAY_ADMIN_LISTEN=0.0.0.0:9425 \
    MXRELAY_DATA_DIR=/var/lib/mxrelay/data
EXPOSE 2525 9425
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 CMD ["mxrelay", "healthcheck"]
ENTRYPOINT ["mxrelay"]
CMD ["serve"]
