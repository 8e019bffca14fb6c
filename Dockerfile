# Build: the same `cargo build --release --locked` that CI runs.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY benches ./benches
# `--version` names this revision: docker build --build-arg GIT_REVISION=$(git rev-parse --short=12 HEAD)
ARG GIT_REVISION=unknown
RUN TOKENGATE_GIT_REV="$GIT_REVISION" cargo build --release --locked

# Run: a minimal image with glibc and CA certificates, as an unprivileged user.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/tokengate /usr/local/bin/tokengate
# Mount the configuration directory at /etc/tokengate/config (a ConfigMap: a directory, not a
# subPath, so updates arrive and are reloaded) and secrets as files or environment variables.
# In a container the config must listen on 0.0.0.0 (the default is loopback) and should
# restrict who may connect.
USER 65532:65532
# The image's default configuration: the documented example (mounting a directory replaces it).
COPY config/tokengate.example.yaml /etc/tokengate/config/tokengate.yaml
# In a container the listeners bind every interface, whatever the file says (the file's default
# is loopback); `run --listen` overrides these in turn. (DL3064 flags the name "TOKEN…"; these hold
# addresses, not secrets.)
# hadolint ignore=DL3064
ENV TOKENGATE_LISTEN=0.0.0.0:8080 TOKENGATE_ADMIN_LISTEN=0.0.0.0:9090
EXPOSE 8080 9090
# Probes: GET :9090/healthz (liveness) and :9090/readyz (readiness: started, and the token
# warm-up finished; /readyz?strict=1 also needs a valid token per provider).
ENTRYPOINT ["/usr/local/bin/tokengate"]
CMD ["run", "/etc/tokengate/config/tokengate.yaml"]
