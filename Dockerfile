# syntax=docker/dockerfile:1
# Builds the single static shoal binary and ships it on a distroless base.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
# go.mod replaces go-utp with this local stub (the proxy does not serve the real one).
COPY third_party/go-utp third_party/go-utp
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
ARG VERSION=dev
ARG TARGETOS=linux
ARG TARGETARCH=amd64
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=${TARGETOS} GOARCH=${TARGETARCH} \
    go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/shoal ./cmd/shoal

# The agent runs as root in a DaemonSet because it writes containerd's hosts.toml on the node;
# the controller image is the same binary and runs as nonroot through its pod securityContext.
FROM gcr.io/distroless/static-debian12
COPY --from=build /out/shoal /usr/local/bin/shoal
ENTRYPOINT ["/usr/local/bin/shoal"]
