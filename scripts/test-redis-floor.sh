#!/usr/bin/env bash
# The redis extra allows redis>=5.0: run the Redis tests (cache store, shared quota, a frozen
# server) against the lowest version it allows, shadowing the venv's newer redis-py.
set -euo pipefail
cd "$(dirname "$0")/.."

floor="$(mktemp -d)"
trap 'rm -rf "$floor"' EXIT
.venv/bin/pip install -q --target "$floor" 'redis==5.0.0'
PYTHONPATH="$floor" .venv/bin/python -c \
  'import redis, sys; sys.exit(redis.__version__ != "5.0.0" and f"got redis {redis.__version__}")'
PYTHONPATH="$floor" exec .venv/bin/python -m pytest -q -p no:cacheprovider \
  tests/test_cache.py tests/test_shared_ratelimit.py tests/test_redis_frozen.py "$@"
