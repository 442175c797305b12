#!/bin/sh
# Copies the prebuilt, minified libraries of the live view from node_modules into vendor/, with their
# licenses. Run after `npm ci` (offline with a warm npm cache): `npm run vendor`. vendor/ is committed,
# so installing gradwatch never needs npm.
set -eu
cd "$(dirname "$0")"
[ -d node_modules/echarts ] || { echo "build.sh: run 'npm ci' first" >&2; exit 1; }
mkdir -p vendor
cp node_modules/echarts/dist/echarts.min.js vendor/echarts.min.js
cp node_modules/echarts/LICENSE vendor/LICENSE-echarts.txt
cp node_modules/echarts/NOTICE vendor/NOTICE-echarts.txt
cp node_modules/echarts/licenses/LICENSE-d3 vendor/LICENSE-d3.txt
cp node_modules/zrender/LICENSE vendor/LICENSE-zrender.txt   # bundled into echarts.min.js
cp node_modules/tslib/LICENSE.txt vendor/LICENSE-tslib.txt    # bundled into echarts.min.js
echo "vendor/: echarts $(node -p "require('./node_modules/echarts/package.json').version")"
