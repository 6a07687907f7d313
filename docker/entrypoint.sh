#!/bin/sh
# Entry point of the tapmask images: `docker run IMAGE SUBCOMMAND [ARGS…]` runs `tapmask SUBCOMMAND`
# (serve labelstudio, worker, workers, weights, models, segment, eval, bench, prefetch…), while a
# first argument that is a program runs that program: nuclio's Dockerfile ends with
# `CMD ["processor"]` and does not reset ENTRYPOINT, so a function built FROM this image must
# start nuclio's processor, not `tapmask processor`; `docker run -it IMAGE bash` opens a shell.
set -e

case "${1:-}" in
    "" | -*) exec tapmask "$@" ;;                      # no argument, or tapmask's own options
    */*) exec "$@" ;;                                  # a path: /bin/sh, ./script
esac
# A program on PATH (command -v prints its path); subcommand names are not programs (a shell
# builtin such as `eval` prints its bare name, which is not a path).
if program="$(command -v -- "$1" 2>/dev/null)" && [ "${program#/}" != "$program" ]; then
    exec "$@"
fi
exec tapmask "$@"
