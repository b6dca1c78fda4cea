#!/usr/bin/env bash
# Runs the README's set-up on a clean Debian root, as a new user's machine
# would: what the project's own files fail to install shows up here, even on a
# machine where someone installed it by hand long ago.
#
#   fresh-root.sh [--ref REF] [--test] [--java] [--keep] [--tools DIR]
#
# The root is `debootstrap --variant=minbase` of this machine's release, plus
# what a new machine of the project's kind comes with: a C toolchain, git,
# curl, a JDK with Maven, and the run-time libraries of the toolchains below.
# The machine's own toolchains (rustup's Rust, Go, Node.js, pyenv's Python)
# are laid over it read-only, with writes going to the root (overlayfs), so
# nothing done inside reaches this machine. The machine's registry settings
# (apt sources, CA bundle, pip and npm configuration) are copied in; CARGO_HOME
# starts empty.
#
# Inside, a clean clone of REF (default HEAD) runs `make up`, `make status`,
# a few calls through the gateway and `make down`; with --java `MESHKIT_JAVA=1 make up` (the Spring Boot
# UserService beside the Rust one), a call and `make down` again; with --test
# `make test` too. Each phase prints its
# minutes. It exits non-zero when any of them fails.
#
#   --keep       leave the root in place afterwards (default: removed)
#   --tools DIR  copy DIR's programs into the root's $CARGO_HOME/bin first and
#                save that folder back to DIR afterwards, so a second run skips
#                rebuilding tools that `cargo install` builds (not fresh then:
#                say so when quoting its minutes)
#
# The pristine base is kept as a tarball under target/fresh-root and made
# again when it is missing (MESHKIT_FRESH_DIR moves that folder).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
ref=HEAD
want_test=0
want_java=0
keep=0
tools=""
while (( $# )); do
    case "$1" in
        --ref) ref="$2"; shift 2 ;;
        --test) want_test=1; shift ;;
        --java) want_java=1; shift ;;
        --keep) keep=1; shift ;;
        --tools) tools="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
        *) echo "fresh-root: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done

die() { echo "fresh-root: $*" >&2; exit 1; }
[[ "$(id -u)" == 0 ]] || die "needs root (debootstrap, chroot and mounts)"
[[ -r /etc/os-release ]] || die "no /etc/os-release: not a Debian or Ubuntu machine"
# shellcheck disable=SC1091
. /etc/os-release
[[ "${ID:-}" == debian ]] || die "builds Debian roots only; this machine is ${ID:-unknown}"
codename="${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}"
commit="$(git -C "$root" rev-parse --verify "$ref^{commit}")" || die "no commit $ref"

work="${MESHKIT_FRESH_DIR:-$root/target/fresh-root}"
mkdir -p "$work"
base="$work/base-$codename.tar"

minutes() { awk -v s="$1" -v e="$(date +%s)" 'BEGIN {printf "%.1f", (e - s) / 60}'; }

# The mirror this machine installs from: the first URI of its main archive.
mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] || continue
        awk -v c="$codename" '
            /^URIs:/ {u = $2} /^Suites:/ {for (i = 2; i <= NF; i++) if ($i == c) s = 1}
            /^$/ {if (u != "" && s) {print u; exit} u = ""; s = 0}
            END {if (u != "" && s) print u}' "$f" | head -n1
    done
    if [[ -f /etc/apt/sources.list ]]; then
        awk -v c="$codename" '$1 == "deb" && $3 == c {print $2; exit}' /etc/apt/sources.list
    fi
}

# What a new machine of the project's kind has before the project installs
# anything (compilers, a JDK with Maven), and what the toolchains laid over
# the root link against.
BASE_PACKAGES=(
    build-essential ca-certificates curl git openssh-client xz-utils procps iproute2 psmisc
    lsof less file unzip zip wget gnupg tzdata
    openjdk-17-jdk-headless maven
    libssl3 libffi8 libsqlite3-0 libbz2-1.0 liblzma5 libreadline8 libncursesw6
    libbrotli1 zlib1g libexpat1 libuuid1 libnsl2 libtirpc3 libgssapi-krb5-2
)

make_base() {
    local t0 dir url
    t0=$(date +%s)
    command -v debootstrap >/dev/null || {
        echo "fresh-root: installing debootstrap"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    }
    url="$(mirror | head -n1)"
    [[ -n "$url" ]] || die "found no apt source for $codename on this machine"
    dir="$work/base.tmp"
    rm -rf "$dir"
    echo "fresh-root: debootstrap $codename (minbase)"
    debootstrap --variant=minbase "$codename" "$dir" "$url" >"$work/debootstrap.log" 2>&1 \
        || die "debootstrap failed; see $work/debootstrap.log"
    copy_settings "$dir"
    in_root "$dir" "" /bin/sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends ${BASE_PACKAGES[*]} >/dev/null && apt-get clean" \
        || die "installing the base packages failed"
    tar -C "$dir" -cf "$base.tmp" . && mv "$base.tmp" "$base"
    rm -rf "$dir"
    echo "fresh-root: base made in $(minutes "$t0") min"
}

# The machine's settings for reaching the registries, as a new machine has them.
copy_settings() {
    local r="$1" f
    mkdir -p "$r/etc/apt/sources.list.d" "$r/etc/apt/apt.conf.d" "$r/usr/local/share/ca-certificates" "$r/root"
    rm -f "$r/etc/apt/sources.list"
    [[ -f /etc/apt/sources.list ]] && cp /etc/apt/sources.list "$r/etc/apt/"
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
        [[ -f "$f" ]] && cp "$f" "$r/etc/apt/sources.list.d/"
    done
    for f in /etc/apt/apt.conf.d/*; do
        [[ -f "$f" && ! -e "$r/etc/apt/apt.conf.d/${f##*/}" ]] && cp "$f" "$r/etc/apt/apt.conf.d/"
    done
    cp -a /usr/local/share/ca-certificates/. "$r/usr/local/share/ca-certificates/"
    mkdir -p "$r/etc/ssl/certs"
    cp /etc/ssl/certs/ca-certificates.crt "$r/etc/ssl/certs/ca-certificates.crt"
    cp /etc/resolv.conf "$r/etc/resolv.conf" 2>/dev/null || true
    for f in /etc/pip.conf /root/.npmrc; do
        [[ -f "$f" ]] && cp "$f" "$r$f"
    done
    return 0
}

# in_root ROOT ENV_FILE CMD... [-- overlay dirs are taken from $overlays]: runs CMD
# chrooted in ROOT, in a mount namespace of its own (so every mount ends with
# it), with /proc, /sys, /dev, a /tmp, and the toolchain overlays.
in_root() {
    local r="$1" env_file="$2"; shift 2
    unshare --mount --propagation private /bin/bash -s -- "$r" "$env_file" "${node_bin:-}" \
        "${#overlays[@]}" "${overlays[@]}" "$@" <<'EOS'
set -euo pipefail
r="$1" env_file="$2" node_bin="$3" n="$4"; shift 4
mount -t proc proc "$r/proc"
mount --rbind /sys "$r/sys"
mount --rbind /dev "$r/dev"
mount -t tmpfs tmpfs "$r/tmp"
for ((i = 1; i <= n; i++)); do
    d="$1"; shift
    up="$r/../upper/$i" wk="$r/../upper/$i.work"
    mkdir -p "$up" "$wk" "$r$d"
    mount -t overlay overlay -o "lowerdir=$d,upperdir=$up,workdir=$wk" "$r$d"
done
if [[ -n "$node_bin" ]]; then
    touch "$r/usr/bin/node"
    mount --bind -o ro "$node_bin" "$r/usr/bin/node"
    ln -sf ../lib/node_modules/npm/bin/npm-cli.js "$r/usr/bin/npm"
    ln -sf ../lib/node_modules/npm/bin/npx-cli.js "$r/usr/bin/npx"
fi
vars=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8)
[[ -n "$env_file" ]] && mapfile -t vars <"$env_file"
exec chroot "$r" /usr/bin/env -i "${vars[@]}" "$@"
EOS
}

overlays=()
[[ -f "$base" ]] || make_base

run="$work/run"
rm -rf "$run"
mkdir -p "$run/root" "$run/upper" "$run/lower"
echo "fresh-root: unpacking the base"
tar -C "$run/root" -xf "$base"
copy_settings "$run/root"
git clone --quiet --no-hardlinks "$root" "$run/root/root/meshkit"
git -C "$run/root/root/meshkit" checkout --quiet "$commit"
echo "fresh-root: $(git -C "$root" log -1 --format='%h %s' "$commit")"

# rustup's proxies (cargo, rustc, …) in an empty CARGO_HOME.
mkdir -p "$run/root/root/.cargo/bin"
cp /root/.cargo/bin/rustup "$run/root/root/.cargo/bin/rustup"
for f in /root/.cargo/bin/*; do
    n="${f##*/}"
    [[ -L "$f" && "$(readlink "$f")" == rustup ]] && ln -sf rustup "$run/root/root/.cargo/bin/$n"
done
[[ -n "$tools" ]] && cp -a "$tools/." "$run/root/root/.cargo/bin/"

cleanup() {
    # A daemon that outlived its `make down` would keep the root busy.
    local p
    for p in /proc/[0-9]*; do
        [[ "$(readlink "$p/root" 2>/dev/null)" == "$run/root" ]] && kill -9 "${p#/proc/}" 2>/dev/null
    done
    if [[ -n "$tools" && -d "$run/root/root/.cargo/bin" ]]; then
        find "$run/root/root/.cargo/bin" -maxdepth 1 -type f ! -name rustup -exec cp -a {} "$tools/" \;
    fi
    (( keep )) || rm -rf "$run"
}
trap cleanup EXIT

# The toolchains a new machine of the project's kind comes with, laid over the
# root: writes land in the root, never in this machine's copy.
for d in /root/.rustup /usr/local/go /root/.pyenv /usr/lib/node_modules; do
    [[ -d "$d" ]] && overlays+=("$d")
done
node_bin="$(command -v node || true)"

env_file="$run/env"
# The machine's environment, less what belongs to this shell and this folder.
env | grep -vE '^(PWD|OLDPWD|SHLVL|_|HOME|CARGO_HOME|CARGO_TARGET_DIR|RUSTUP_TOOLCHAIN|MAKEFLAGS|MFLAGS|MAKELEVEL|CI)=' \
    | grep -E '^[A-Za-z_][A-Za-z0-9_]*=' >"$env_file" || true
echo "HOME=/root" >>"$env_file"

inner="$run/root/root/fresh-inner.sh"
cat >"$inner" <<EOF
#!/bin/bash
set -uo pipefail
cd /root/meshkit
status=0
phase() {
    local name="\$1" t0=\$(date +%s); shift
    echo "fresh-root: === \$name"
    if "\$@"; then r=0; else r=\$?; status=1; fi
    printf 'fresh-root: --- %s: %s in %.1f min\n' "\$name" "\$([[ \$r == 0 ]] && echo ok || echo "FAILED (\$r)")" \
        "\$(awk -v s=\$t0 -v e=\$(date +%s) 'BEGIN {print (e - s) / 60}')"
    return \$r
}
# A cluster that started is not yet one that answers: one call of each kind
# through the gateway.
smoke() {
    curl -sf --max-time 10 http://127.0.0.1:8080/openapi.json >/dev/null \
        && grpcurl -plaintext -max-time 10 127.0.0.1:8080 list | grep -q meshkit.user.v1.UserService \
        && curl -sf --max-time 10 -X POST http://127.0.0.1:8080/v1/users -H 'content-type: application/json' \
            -d '{"name":"Fresh","email":"fresh@example.com"}' | grep -q '"id"'
}
if phase "make up" make up; then
    phase "make status" make status || true
    phase "calls through the gateway" smoke || true
fi
phase "make down" make down || true
if (( $want_java )); then
    # The Spring Boot UserService beside the Rust one: a JDK, PostgreSQL and
    # the Maven build installed by \`make up\` itself.
    if phase "MESHKIT_JAVA=1 make up" env MESHKIT_JAVA=1 make up; then
        phase "calls through the gateway" smoke || true
        phase "Spring instances registered" bash -c \
            'make status | grep -E "^user-spring-[12] .*running" | wc -l | grep -qx 2' || true
    fi
    phase "make down" make down || true
fi
if (( $want_test )); then
    phase "make test" make test || true
fi
exit \$status
EOF
chmod +x "$inner"

t0=$(date +%s)
set +e
in_root "$run/root" "$env_file" /bin/bash /root/fresh-inner.sh
rc=$?
set -e
echo "fresh-root: $( ((rc == 0)) && echo passed || echo FAILED) in $(minutes "$t0") min (root: $run/root)"
exit "$rc"
