#!/usr/bin/env bash
# Helpers shared by the launch scripts; sourced, never run.

# Prints a command with each argument single-quoted where the shell needs it (readable, and
# shlex.split-able).
show() {
  local arg out=()
  for arg in "$@"; do
    if [[ "${arg}" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("${arg}")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}
