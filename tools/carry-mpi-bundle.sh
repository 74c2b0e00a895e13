#!/bin/bash
# Packs what bench/compare.py's MPI section needs from this Debian 12
# machine (Open MPI, python3.11 with python3-mpi4py, and every shared library
# they and the given programs load) into one tar.xz, paths as here, for a
# machine that has none of it and cannot fetch packages (how the 16-core rows
# in bench/RESULTS.md were run). There, unpack it without replacing any file
# of that machine's own, and call Open MPI's launcher by its real name:
#   tar -xJf BUNDLE --skip-old-files --keep-directory-symlink -C / && ldconfig
#   mkdir -p /tmp/mpibin && ln -sf /usr/bin/orterun /tmp/mpibin/mpirun
#   PATH=/tmp/mpibin:$PATH OMPI_MCA_plm_rsh_agent=/bin/false \
#     OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo \
#     python3 bench/compare.py --only mpi --mpi-ranks 4 --python /usr/bin/python3.11 ...
# Usage: tools/carry-mpi-bundle.sh OUT.tar.xz [PROGRAM...]
set -eu
if [ $# -lt 1 ]; then
  echo "usage: $0 OUT.tar.xz [PROGRAM...]" >&2
  exit 2
fi
command -v file >/dev/null || { echo "$0: needs file(1): apt-get install file" >&2; exit 1; }
out=$1
shift
list=$(mktemp)
trap 'rm -f "$list" "$list.u" "$list.err"' EXIT
ompi=/usr/lib/x86_64-linux-gnu/openmpi
for d in $ompi /etc/openmpi /usr/share/openmpi /usr/lib/x86_64-linux-gnu/pmix2 /usr/share/pmix \
  /usr/lib/python3/dist-packages/mpi4py; do
  [ -e "$d" ] && find "$d" \( -type f -o -type l \) >>"$list"
done
# The standard library, less what no benchmark imports.
find /usr/lib/python3.11 \( -type f -o -type l \) |
  grep -v -E '/(config-3.11-x86_64-linux-gnu|test|tests|idlelib|tkinter|ensurepip|lib2to3|turtledemo|pydoc_data|__pycache__)/' >>"$list"
printf '%s\n' /usr/bin/orterun /usr/bin/orted /usr/bin/python3.11 /usr/bin/taskset >>"$list"
ls /usr/lib/x86_64-linux-gnu/libmpi*.so* /usr/lib/x86_64-linux-gnu/libopen-*.so* \
  /usr/lib/x86_64-linux-gnu/libpmix*.so* >>"$list"
# Every shared library that an ELF file of the list, or a given program, loads.
(
  while read -r f; do
    if [ -f "$f" ] && file -Lb "$f" | grep -q '^ELF'; then echo "$f"; fi
  done <"$list"
  printf '%s\n' "$@"
) | while read -r e; do ldd "$e" 2>/dev/null | awk '/=> \//{print $3} /^\t\//{print $1}'; done |
  sort -u | while read -r lib; do
  echo "$lib"
  readlink -f "$lib"
done >>"$list"
# Not the C and C++ runtimes (the other machine has its own, newer ones), nor static archives.
sort -u "$list" |
  grep -v -E '^/(usr/)?lib/x86_64-linux-gnu/(libc\.so|libm\.so|libpthread|libdl|librt|ld-linux|libstdc\+\+|libgcc_s)' |
  grep -v -E '^/lib64|\.a$' >"$list.u"
# (tar says that it drops the leading '/'; anything else it says is shown.)
if ! tar -cJf "$out" --transform 's,^lib/,usr/lib/,;s,^bin/,usr/bin/,' -T "$list.u" 2>"$list.err"; then
  cat "$list.err" >&2
  exit 1
fi
grep -v 'Removing leading' "$list.err" >&2 || true
ls -la "$out"
