#!/usr/bin/env bash
# Generate the man page and shell completions from the binary's own clap model, so the
# packages ship documentation that matches the flags exactly.
# Usage: packaging/gen-docs.sh <path/to/clawnode> <out-dir>
set -euo pipefail
bin=${1:?path to the clawnode binary}
out=${2:?output directory}
mkdir -p "$out/man" "$out/completions"
"$bin" manpage > "$out/man/clawnode.1"
gzip -9n -f "$out/man/clawnode.1"
"$bin" completions bash > "$out/completions/clawnode.bash"
"$bin" completions zsh > "$out/completions/_clawnode"
"$bin" completions fish > "$out/completions/clawnode.fish"
echo "wrote $out/man/clawnode.1.gz and completions for bash, zsh, fish"
