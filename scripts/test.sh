#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds, runs every test (unit, crate
# integration with real peers, end-to-end with real QEMU guests). `.ci/run` calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_PROGRESS_WHEN=never
TARGET=${CARGO_TARGET_DIR:-target}
bash scripts/setup.sh
echo "== build"
cargo build --workspace --bins --quiet
echo "== lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== test guests"
for g in 1 2; do
  "$TARGET"/debug/xtask guest-image --generation "$g" --agent vireo --out "$TARGET/guest-gen$g.img" >/dev/null
done
echo "== tests"
# Every test binary, in parallel lanes (crate tests first beside the end-to-end lane),
# one line per binary with its wall time; failures print their whole output.
"$TARGET"/debug/xtask test-suite --jobs 2 --e2e-jobs 2 --test-threads 2
