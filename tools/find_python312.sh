#!/usr/bin/env bash
# Print the path of a working Python 3.12 interpreter, or explain on stderr and exit 1.
# Order: a plain `python3.12` on PATH, then pyenv (how the development machines provide it).
set -u
works() { "$@" -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }

if works python3.12; then
  python3.12 -c 'import sys; print(sys.executable)'
  exit 0
fi
roots=()
command -v pyenv >/dev/null 2>&1 && roots+=("$(pyenv root)")
roots+=("${PYENV_ROOT:-$HOME/.pyenv}")
for root in "${roots[@]}"; do
  for v in $(ls -1 "$root/versions" 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -t. -k3 -n -r); do
    py="$root/versions/$v/bin/python3.12"
    if works "$py"; then echo "$py"; exit 0; fi
  done
done
{
  echo "error: jaxblocks needs Python 3.12 (jax 0.11.2 requires Python >= 3.12) and none was found."
  echo "  Tried: \`python3.12\` on PATH, then the 3.12.x versions under pyenv"
  echo "  (\`pyenv root\`, \$PYENV_ROOT or ~/.pyenv)."
  echo "  Install one, e.g. \`pyenv install 3.12\` or your system's python3.12 package, then re-run make."
} >&2
exit 1
