#!/bin/sh
# Generate a Python client (package csms_client, in ./csms-client) from a running CSMS's OpenAPI document.
# Usage: generate.sh [API base URL, default http://127.0.0.1:8080/api/v1]
set -eu
api=${1:-http://127.0.0.1:8080/api/v1}
here=$(dirname "$0")
document=$(mktemp --suffix=.json)
trap 'rm -f "$document"' EXIT
curl -sSf "$api/openapi.json" -o "$document"
openapi-python-client generate --path "$document" --config "$here/generator.yml" --output-path csms-client --overwrite
echo "generated ./csms-client: pip install ./csms-client, then see $here/scenario.py"
