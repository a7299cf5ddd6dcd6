#!/usr/bin/env bash
# make test-fresh: the README's quick start in a Debian 12 root that never saw
# this machine's hand-installed packages, as a new user runs it.
#
#   rig/fresh.sh [COMMAND]     default: make demo && make test
#
# debootstrap makes a minimal bookworm root (~30 s), a fresh clone of this
# repository's HEAD goes into it (uncommitted changes do not), and COMMAND
# runs there as root after the quick start's first line (apt-get install
# make).  The root is entered with unshare --mount + pivot_root, not chroot:
# the kernel refuses new user namespaces to a chrooted caller, so no PD could
# start.  pip inside needs this machine's package-index configuration: the
# pip config files, the CA files and local indexes they name, and the PIP_*
# and SSL_* environment are carried in (read-only binds).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${BMI_FRESH_ROOT:-/var/tmp/bmi-fresh-root}
MIRROR=${BMI_FRESH_MIRROR:-http://deb.debian.org/debian}
COMMAND=${1:-make demo && make test}

die() { echo "test-fresh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (debootstrap, mounts and pivot_root need it)"
command -v debootstrap >/dev/null || {
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null \
		|| die "cannot install debootstrap"; }
command -v git >/dev/null || die "git is needed to clone the repository"

case "$ROOT" in /|/usr|/var|/tmp|/root|"") die "refusing BMI_FRESH_ROOT=$ROOT";; esac
rm -rf --one-file-system "$ROOT"
echo "test-fresh: debootstrap --variant=minbase bookworm $ROOT"
start=$(date +%s)
debootstrap --variant=minbase bookworm "$ROOT" "$MIRROR" >"$ROOT.debootstrap.log" 2>&1 \
	|| die "debootstrap failed; see $ROOT.debootstrap.log"
echo "test-fresh: root made in $(( $(date +%s) - start )) s"
mkdir -p "$ROOT/work"
git clone -q "$REPO" "$ROOT/work/bmi"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true

# Paths the package-index configuration names: files are copied, folders bound.
carry=()
for conf in /etc/pip.conf "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf"; do
	[ -f "$conf" ] || continue
	mkdir -p "$ROOT$(dirname "$conf")" && cp "$conf" "$ROOT$conf"
	# a file:// simple index links to ../../files: carry the folder above /simple
	while read -r path; do carry+=("${path%/simple}"); done \
		< <(grep -oE '(file://)?/[^ ]+' "$conf" | sed -e 's|^file://||' -e 's|/$||')
done
envs=()
while IFS='=' read -r name value; do
	envs+=("$name=$value")
	case "$value" in /*) carry+=("$value");; esac
done < <(env | grep -E '^(PIP_|SSL_|REQUESTS_CA_BUNDLE=|CURL_CA_BUNDLE=)' || true)
# Local CAs (a TLS-inspecting egress, say) the way Debian takes them: ca-certificates'
# postinst in the root then builds its bundle with them.
carry+=(/usr/local/share/ca-certificates)
binds=()
for path in "${carry[@]}"; do
	[ -e "$path" ] || continue
	mkdir -p "$ROOT$(dirname "$path")"
	case "$path" in
	/etc/*|/usr/local/share/ca-certificates) cp -rLT "$path" "$ROOT$path";;  # packages write there
	*) if [ -d "$path" ]; then mkdir -p "$ROOT$path"; binds+=("$path"); else cp -L "$path" "$ROOT$path"; fi;;
	esac
done

inner="set -e; cd /work/bmi; echo 'test-fresh: apt-get install -y make'; \
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq make >/dev/null; \
echo 'test-fresh: $COMMAND'; $COMMAND"
# shellcheck disable=SC2016
exec unshare --mount --propagation private -- /bin/bash -ec '
	root=$1; shift; inner=$1; shift
	nbinds=$1; shift
	mount --bind "$root" "$root"
	for ((i = 0; i < nbinds; i++)); do mount --bind -o ro "$1" "$root$1"; shift; done
	mount -t proc proc "$root/proc"
	mount --rbind /sys "$root/sys"
	mount --rbind /dev "$root/dev"
	mount -t tmpfs -o mode=755 tmpfs "$root/run"
	mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
	cd "$root"; mkdir -p .oldroot
	pivot_root . .oldroot
	umount -l /.oldroot; rmdir /.oldroot
	cd /
	exec /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		HOME=/root LANG=C.UTF-8 TERM=dumb CI="${CI:-}" BMI_IN_FRESH_ROOT=1 "$@" /bin/bash -c "$inner"
' fresh "$ROOT" "$inner" "${#binds[@]}" "${binds[@]}" "${envs[@]}"
