#!/bin/sh
# Stand-in sources for the workspace's own crates, from their manifests alone: an empty
# library for each member and `fn main() {}` for each target a manifest names. deploy/Dockerfile
# builds them once in a layer of their own, so the dependencies (most of the build time) are
# compiled only when Cargo.toml or Cargo.lock change, not on every source change.
# Run from the workspace root; it only creates files that do not exist.
set -eu
for manifest in */Cargo.toml; do
  dir=${manifest%/Cargo.toml}
  mkdir -p "$dir/src"
  [ -e "$dir/src/lib.rs" ] || : > "$dir/src/lib.rs"
  # `path = "..."` of [[bin]] (and any other target given a path).
  sed -n 's/^path = "\(.*\)"$/\1/p' "$manifest" | while read -r path; do
    mkdir -p "$dir/$(dirname "$path")"
    [ -e "$dir/$path" ] || echo 'fn main() {}' > "$dir/$path"
  done
  # [[bench]] without a path: benches/NAME.rs.
  awk '/^\[\[bench\]\]/ { bench = 1; next } /^\[/ { bench = 0 }
       bench && $1 == "name" { gsub(/"/, "", $3); print $3 }' "$manifest" | while read -r name; do
    mkdir -p "$dir/benches"
    [ -e "$dir/benches/$name.rs" ] || echo 'fn main() {}' > "$dir/benches/$name.rs"
  done
done
