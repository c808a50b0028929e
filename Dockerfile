# owsfs in a container: `owsfs run` as the entrypoint mounts the workspace, runs the command,
# forwards signals and hands the workspace off when the command exits. See docs/containers.md
# for what the container needs (/dev/fuse, CAP_SYS_ADMIN) and a Kubernetes pod.
#
#   docker build -t owsfs .
#   docker run --device /dev/fuse --cap-add SYS_ADMIN -e OWSFS_STORE=s3://... owsfs python3 app.py

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin owsfs

FROM debian:bookworm-slim
# fuse3 for fusermount3 and /etc/fuse.conf; the store speaks TLS to S3.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /workspace /var/cache/owsfs
COPY --from=build /src/target/release/owsfs /usr/local/bin/owsfs
RUN ln -s /usr/local/bin/owsfs /sbin/mount.fuse.owsfs
ENV OWSFS_CACHE=/var/cache/owsfs/workspace \
    OWSFS_WORKSPACE=workspace
VOLUME ["/var/cache/owsfs"]
# SIGTERM reaches owsfs run, which passes it to the command and hands off after it exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["owsfs", "run", "--mount", "/workspace", "--"]
CMD ["sleep", "infinity"]
