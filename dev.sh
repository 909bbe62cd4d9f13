#!/usr/bin/env bash
# Entry point for the README's commands: installs what is missing (idempotent), then runs
# the xtask. Usage: ./dev.sh demo | ./dev.sh demo-containers | ./dev.sh test | ./dev.sh bench connect|proxy | ./dev.sh build
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
exec cargo xtask "$@"
