#!/usr/bin/env bash
# Install the s3rver S3 server (npm) into .ci/node_modules, ignored by git; tests find it there.
#   scripts/install_s3rver.sh            then: .ci/node_modules/.bin/s3rver --help
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${S3RVER_VERSION:-3.7.1}"
if [ -x .ci/node_modules/.bin/s3rver ]; then
  echo "s3rver already installed in .ci/node_modules"
  exit 0
fi
mkdir -p .ci
npm install --prefix .ci --no-audit --no-fund --no-save "s3rver@${VERSION}"
.ci/node_modules/.bin/s3rver --version
