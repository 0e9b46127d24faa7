#!/usr/bin/env bash
# The test suite, on CPU (multi-process tests use gloo). Extra arguments go to pytest.
source "$(dirname "$0")/env.sh"
exec python -m pytest -q "$@"
