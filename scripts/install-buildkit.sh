#!/usr/bin/env bash
# Installs the real BuildKit peers the test suite and the demo run against:
#   buildkitd, buildctl (github.com/moby/buildkit) and buildx (github.com/docker/buildx),
#   built with `go install` at the pinned versions below, plus Debian's runc and busybox-static;
# and what tests/gitlab_pipeline.rs runs the GitLab example with: gitlab-ci-local (npm, pinned
# below) and Debian's rsync (which it needs) and docker-registry (the registry the jobs push to).
#
# Usage: scripts/install-buildkit.sh            (prints the bin folder on its last line)
# The binaries land in .peers/bin (ignored by git; override with PEERS_DIR). A second run
# reuses what is there: each binary is rebuilt only when its pinned version changes.
#
# Why not `go install module/cmd@version`: buildkit's go.mod has `exclude` directives, which
# `go install pkg@version` refuses. So each module is downloaded at its pinned version with
# `go mod download` and `go install` runs inside it, honouring its own go.mod and go.sum.
set -euo pipefail

# The pinned versions: the one place they are set.
BUILDKIT_VERSION=v0.32.2
BUILDX_VERSION=v0.36.1
# 4.60 runs on Node 18-20 (later releases want a newer Node than Debian's or this machine's).
GITLAB_CI_LOCAL_VERSION=4.60.1

root="$(cd "$(dirname "$0")/.." && pwd)"
peers="${PEERS_DIR:-$root/.peers}"
bin="$peers/bin"
mkdir -p "$bin"

log() { echo "install-buildkit: $*" >&2; }

# Debian packages: runc runs RUN steps; busybox-static gives test images a shell in FROM scratch;
# rsync, docker-registry, npm (and g++, make, python3 for its native module) for the GitLab
# pipeline test.
need_apt=()
command -v runc >/dev/null 2>&1 || need_apt+=(runc)
command -v rsync >/dev/null 2>&1 || need_apt+=(rsync)
command -v docker-registry >/dev/null 2>&1 || need_apt+=(docker-registry)
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
for tool in g++ make python3; do command -v $tool >/dev/null 2>&1 || need_apt+=($tool); done
# A static busybox: `ldd` calls a static binary "not a dynamic executable".
if ! { [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; }; then
  need_apt+=(busybox-static)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    log "missing Debian packages: ${need_apt[*]} (run as root, or apt-get install them)"; exit 1
  fi
  log "apt-get install ${need_apt[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v go >/dev/null 2>&1; then
  for g in /usr/local/go/bin/go /usr/lib/go/bin/go; do [ -x "$g" ] && PATH="$(dirname "$g"):$PATH"; done
fi
if ! command -v go >/dev/null 2>&1; then
  log "no Go toolchain on PATH: cannot build buildkitd/buildctl/buildx"; exit 1
fi

# install MODULE VERSION VERSION_PKG CMD...
install_module() {
  local module=$1 version=$2 version_pkg=$3; shift 3
  local stamp="$peers/$(echo "$module" | tr / _).version"
  local missing=0 c
  for c in "$@"; do [ -x "$bin/$(basename "$c")" ] || missing=1; done
  if [ "$missing" = 0 ] && [ "$(cat "$stamp" 2>/dev/null)" = "$version" ]; then
    log "$module $version already installed"; return
  fi
  log "building $module $version ($*) with go install; a cold build takes a few minutes"
  local dir
  dir=$(GOFLAGS=-mod=mod go mod download -json "$module@$version" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -d "$dir" ] || { log "go mod download $module@$version failed"; exit 1; }
  (cd "$dir" && CGO_ENABLED=0 GOBIN="$bin" GOFLAGS=-mod=readonly go install -trimpath \
      -ldflags "-s -w -X $version_pkg.Version=$version" "$@")
  echo "$version" > "$stamp"
}

# gitlab-ci-local, in its own folder, built beside the Go modules. Its re2 dependency compiles a
# native module with node-gyp (g++, make, python3: a few minutes on 2 cores, once).
glci="$peers/gitlab-ci-local"
install_gitlab_ci_local() {
  if [ "$(cat "$glci.version" 2>/dev/null)" = "$GITLAB_CI_LOCAL_VERSION" ] && [ -x "$bin/gitlab-ci-local" ]; then
    log "gitlab-ci-local $GITLAB_CI_LOCAL_VERSION already installed"; return
  fi
  log "npm install gitlab-ci-local@$GITLAB_CI_LOCAL_VERSION (builds re2 with node-gyp)"
  rm -rf "$glci" && mkdir -p "$glci"
  npm install --no-audit --no-fund --loglevel=error --prefix "$glci" \
    "gitlab-ci-local@$GITLAB_CI_LOCAL_VERSION" >&2
  ln -sf "$glci/node_modules/.bin/gitlab-ci-local" "$bin/gitlab-ci-local"
  "$bin/gitlab-ci-local" --version >/dev/null
  echo "$GITLAB_CI_LOCAL_VERSION" > "$glci.version"
}
install_gitlab_ci_local &
glci_pid=$!

install_module github.com/moby/buildkit "$BUILDKIT_VERSION" github.com/moby/buildkit/version \
  ./cmd/buildkitd ./cmd/buildctl
install_module github.com/docker/buildx "$BUILDX_VERSION" github.com/docker/buildx/version \
  ./cmd/buildx
wait "$glci_pid" || { log "cannot install gitlab-ci-local"; exit 1; }


"$bin/buildkitd" --version >&2
"$bin/buildctl" --version >&2
"$bin/buildx" version >&2
echo "gitlab-ci-local $("$bin/gitlab-ci-local" --version)" >&2
echo "$bin"
