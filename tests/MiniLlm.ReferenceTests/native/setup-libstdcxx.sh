#!/usr/bin/env bash
# TorchSharp 0.107's native shim (libLibTorchSharp.so) needs GLIBCXX_3.4.32, i.e. libstdc++ from GCC ≥ 13;
# Debian 12 ships GCC 12's (GLIBCXX_3.4.30). This fetches libstdc++6 from the next Debian release with apt
# (the system's own mirror, from its sources list), and makes it loadable on glibc 2.36: that build needs glibc
# 2.38 for one symbol only (__isoc23_strtoul), so its version need is retargeted to GLIBC_2.36 and the symbol is
# supplied by a tiny preloaded shim. Only the reference-test process uses these (see the .runsettings written by
# the project); nothing is installed system-wide.
#   usage: setup-libstdcxx.sh OUTDIR
set -euo pipefail
out=$1
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
settings="$out/reference.runsettings"
write_settings() {  # $1: extra <EnvironmentVariables> body
  printf '<RunSettings>\n  <RunConfiguration>\n    <EnvironmentVariables>%s</EnvironmentVariables>\n  </RunConfiguration>\n</RunSettings>\n' "$1" > "$settings"
}
if strings /usr/lib/x86_64-linux-gnu/libstdc++.so.6 2>/dev/null | grep -q '^GLIBCXX_3\.4\.32$'; then
  echo "system libstdc++ already provides GLIBCXX_3.4.32" > "$out/not-needed"
  write_settings ""
  exit 0
fi
for tool in apt-get dpkg-deb gcc python3; do
  command -v $tool >/dev/null || { echo "setup-libstdcxx: '$tool' is needed" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The system's Debian mirror, as configured for apt.
uri=$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | awk '{print $2}')
[ -n "$uri" ] || uri=$(grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | head -1 | awk '{print $2}')
[ -n "$uri" ] || { echo "setup-libstdcxx: no Debian mirror found in the apt sources" >&2; exit 1; }
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/etc"
printf 'Types: deb\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" > "$work/etc/trixie.sources"
opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$work/etc" -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
apt-get "${opts[@]}" -qq update
(cd "$work" && apt-get "${opts[@]}" -qq download libstdc++6)
dpkg-deb -x "$work"/libstdc++6_*.deb "$work/x"
cp "$work"/x/usr/lib/x86_64-linux-gnu/libstdc++.so.6.* "$out/libstdc++.so.6"
python3 "$here/retarget-glibc-need.py" "$out/libstdc++.so.6" GLIBC_2.38 GLIBC_2.36
gcc -shared -fPIC -O2 -o "$out/libisoc23shim.so" "$here/isoc23shim.c"
write_settings "<LD_LIBRARY_PATH>$out</LD_LIBRARY_PATH><LD_PRELOAD>$out/libisoc23shim.so</LD_PRELOAD>"
echo "libstdc++ with GLIBCXX_3.4.32 ready in $out"
