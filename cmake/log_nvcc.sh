#!/bin/sh
# CMake compiler launcher for nvcc: runs the compile, passes its diagnostics through to the
# build output and appends them (the ptxas -v register / spill report included) to the log
# named by the first argument. The compile's exit status is kept.
log="$1"
shift
tmp="$log.$$"
"$@" 2> "$tmp"
rc=$?
cat "$tmp" >&2
cat "$tmp" >> "$log"
rm -f "$tmp"
exit $rc
