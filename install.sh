#!/usr/bin/env bash
# Install clusterctl on this node (or into a staging tree), idempotently.
#
#   sudo ./install.sh               install or update, enable the units, run `clusterctl check`
#   sudo ./install.sh --fleet       the same, and run the fleet control plane here: enable
#                                   clusterctl-fleet.service, make its tokens when missing
#                                   (/etc/clusterctl/fleet-join-token, fleet-admin-token)
#   sudo ./install.sh --uninstall   remove what it installed; keep config and state
#   sudo ./install.sh --purge       remove config and state too
#   ./install.sh --root DIR         install into DIR (packagers, tests); enables nothing
#   --no-check                      skip the closing `clusterctl check quick`
#
# What it owns: /opt/clusterctl (the virtualenv), /usr/local/bin/clusterctl,
# the clusterctl-* units in /etc/systemd/system (clusterctl-fleet.service is copied
# always, enabled with --fleet only; the swap-dir.conf and
# watch-cgroups.conf drop-ins `clusterctl config dropins` writes for a swap dir outside
# /var/lib/clusterctl and for watched cgroups outside the agent's default slices),
# /etc/clusterctl and /var/lib/clusterctl. An existing /etc/clusterctl/clusterctl.toml
# is never overwritten: the new default goes beside it as clusterctl.toml.dist; nor is
# an existing fleet token. Everything installed is listed in
# /var/lib/clusterctl/install.manifest.
set -euo pipefail
# whatever the caller's umask, nothing installed is writable by group or others
umask 022

src=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=/
mode=install
run_check=1
fleet=0

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$1" >&2; exit "${2:-1}"; }

while (($#)); do
  case $1 in
    --uninstall) mode=uninstall ;;
    --purge) mode=purge ;;
    --no-check) run_check=0 ;;
    --fleet) fleet=1 ;;
    --root) [ $# -ge 2 ] || die "--root needs a directory" 2; root=$2; shift ;;
    --root=*) root=${1#--root=} ;;
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" 2 ;;
  esac
  shift
done

mkdir -p "$root"
root=$(cd "$root" && pwd)
staging=0
[ "$root" = / ] || staging=1
R=${root%/}  # prefix for every installed path ("" for /)

if [ "$(id -u)" != 0 ] && [ $staging = 0 ]; then
  die "run as root (sudo ./install.sh), or use --root DIR for a staging tree" 2
fi

venv=/opt/clusterctl/venv
link=/usr/local/bin/clusterctl
unit_dir=/etc/systemd/system
conf_dir=/etc/clusterctl
state_dir=/var/lib/clusterctl
manifest=$state_dir/install.manifest

systemd_running() { [ $staging = 0 ] && [ -d /run/systemd/system ]; }

# -- the manifest: what this script put on the machine ----------------------
record() {  # record KIND PATH
  mkdir -p "$R$state_dir"
  grep -qxsF "$1 $2" "$R$manifest" || printf '%s %s\n' "$1" "$2" >>"$R$manifest"
}

make_dir() {  # make_dir PATH MODE: create (and record) missing directories
  local path=$1 mode=$2 missing=() p=$1
  while [ ! -d "$R$p" ]; do missing=("$p" "${missing[@]}"); p=$(dirname "$p"); done
  for p in "${missing[@]}"; do mkdir -m "$mode" "$R$p"; done
  for p in "${missing[@]}"; do record dir "$p"; done
}

put_file() {  # put_file SRC DEST MODE: copy only when the content differs
  local from=$1 to=$2 mode=$3
  make_dir "$(dirname "$to")" 0755
  if [ -f "$R$to" ] && cmp -s "$from" "$R$to"; then
    say "unchanged $to"
  else
    install -m "$mode" "$from" "$R$to"
    say "installed $to"
  fi
  record file "$to"
}

# -- install ----------------------------------------------------------------
find_python() {
  local candidate
  # the system Python first: a venv on /root/.pyenv would break under ProtectHome
  for candidate in /usr/bin/python3 "$(command -v python3 || true)"; do
    if [ -z "$candidate" ] || [ ! -x "$candidate" ]; then continue; fi
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
  die "clusterctl needs Python 3.10 or newer; install python3 (apt-get install python3)" 1
}

build_deps() {
  local python=$1 missing=()
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  pkg-config --exists libsystemd 2>/dev/null || missing+=(libsystemd-dev)
  command -v cc >/dev/null || missing+=(gcc)
  "$python" -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
  "$python" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || missing+=(python3-dev)
  ((${#missing[@]})) || return 0
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    say "installing build dependencies: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    die "missing ${missing[*]} (pystemd is built against libsystemd); install them first" 1
  fi
}

source_hash() {
  # the sources only: building writes agent/*.egg-info, which must not count as a change
  (cd "$src" && find pyproject.toml README.md agent -type f \( -name '*.py' -o -name py.typed \
      -o -name pyproject.toml -o -name README.md \) ! -path '*/__pycache__/*' -print0 2>/dev/null \
      | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -d' ' -f1
}

install_venv() {
  local python=$1 want have stamp="$R$venv/.clusterctl-source"
  want="$(source_hash) $("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  have=$(cat "$stamp" 2>/dev/null || true)
  if [ "$have" = "$want" ] && [ -x "$R$venv/bin/clusterctl" ]; then
    say "unchanged $venv"
    return
  fi
  if [ -n "$have" ] && [ "${have#* }" != "${want#* }" ]; then
    say "Python changed (${have#* } -> ${want#* }): rebuilding $venv"
    rm -rf "$R$venv"
  fi
  make_dir "$(dirname "$venv")" 0755
  [ -x "$R$venv/bin/python" ] || "$python" -m venv "$R$venv"
  say "installing clusterctl into $venv (pip)"
  # from a clean copy of the sources: setuptools reuses a build/ left in the source tree
  # by an earlier build whenever its files look newer than the sources (a copy that kept
  # older mtimes), and would install that older code
  local build
  build=$(mktemp -d)
  (cd "$src" && tar -cf - --exclude=__pycache__ --exclude='*.egg-info' pyproject.toml \
      README.md agent) | tar -C "$build" -xf -
  "$R$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade "$build" \
    || { rm -rf "$build"; die "pip could not install clusterctl (see above)" 1; }
  rm -rf "$build"
  echo "$want" >"$stamp"
  say "installed $venv"
}

install_link() {
  make_dir "$(dirname "$link")" 0755
  if [ -L "$R$link" ] && [ "$(readlink "$R$link")" = "$venv/bin/clusterctl" ]; then
    say "unchanged $link"
  elif [ -e "$R$link" ] && [ ! -L "$R$link" ]; then
    die "$link exists and is not clusterctl's link; move it away and re-run" 1
  else
    ln -sfn "$venv/bin/clusterctl" "$R$link"
    say "linked $link -> $venv/bin/clusterctl"
  fi
  record link "$link"
}

install_config() {
  local conf=$conf_dir/clusterctl.toml default=$src/etc/clusterctl.toml
  make_dir "$conf_dir" 0755
  if [ ! -e "$R$conf" ]; then
    install -m 0644 "$default" "$R$conf"
    say "installed $conf"
  elif cmp -s "$default" "$R$conf"; then
    say "unchanged $conf"
    if [ -e "$R$conf.dist" ]; then rm -f "$R$conf.dist"; fi
  else
    say "kept your $conf"
    if ! cmp -s "$default" "$R$conf.dist" 2>/dev/null; then
      install -m 0644 "$default" "$R$conf.dist"
      say "installed $conf.dist (the new default, for comparison)"
    fi
  fi
  record config "$conf"
}

install_units() {
  local unit units=()
  shopt -s nullglob
  for unit in "$src"/units/*.service "$src"/units/*.timer "$src"/units/*.socket; do
    put_file "$unit" "$unit_dir/$(basename "$unit")" 0644
    units+=("$(basename "$unit")")
  done
  shopt -u nullglob
  if ((${#units[@]} == 0)); then
    say "no units to install yet"
    return
  fi
  # drop-ins the config needs (ReadWritePaths= for a swap dir outside /var/lib/clusterctl,
  # for watched cgroups outside the agent's default slices)
  "$R$venv/bin/clusterctl" config dropins --config "$R$conf_dir/clusterctl.toml" \
      --root "$root" | while IFS= read -r line; do say "$line"; done
  if ! systemd_running; then
    say "systemd is not running here ($([ $staging = 1 ] && echo "staging root $root" || echo "PID 1 is $(cat /proc/1/comm)")): units installed, not enabled"
    return
  fi
  systemctl daemon-reload
  local enable=()
  for unit in "${units[@]}"; do
    case $unit in *.timer|clusterctl-agent.service) enable+=("$unit") ;; esac
  done
  if ((${#enable[@]})); then
    systemctl enable --now "${enable[@]}" >/dev/null 2>&1 || die "systemctl enable --now ${enable[*]} failed; see journalctl -xe" 1
    say "enabled ${enable[*]}"
  fi
  if [ $fleet = 1 ]; then
    systemctl enable --now clusterctl-fleet.service >/dev/null 2>&1 \
      || die "systemctl enable --now clusterctl-fleet.service failed; see journalctl -u clusterctl-fleet" 1
    say "enabled clusterctl-fleet.service"
  fi
}

make_token() {  # make_token PATH: 32 random bytes, urlsafe base64, root-only; never replaced
  local path=$1 token
  if [ -e "$R$path" ] || [ -L "$R$path" ]; then
    say "kept $path"
    return
  fi
  token=$(head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
  # created 0600 and only if still absent (noclobber), then given to root
  (umask 077 && set -C && printf '%s\n' "$token" >"$R$path")
  [ "$(id -u)" != 0 ] || chown root:root "$R$path"
  record token "$path"
  say "created $path (mode 0600)"
}

install_fleet_tokens() {  # before the unit starts: it reads them
  make_token "$conf_dir/fleet-join-token"
  make_token "$conf_dir/fleet-admin-token"
}

do_install() {
  local python
  python=$(find_python)
  build_deps "$python"
  make_dir "$state_dir" 0755
  install_venv "$python"
  install_link
  install_config
  [ $fleet = 0 ] || install_fleet_tokens
  install_units
  if [ $run_check = 1 ]; then
    say "running clusterctl check quick"
    local rc=0
    "$R$venv/bin/clusterctl" check quick --config "$R$conf_dir/clusterctl.toml" || rc=$?
    case $rc in
      0) ;;
      1) say "installed, but this host is below clusterctl's minimum (see the findings above)" ;;
      *) die "installed, but clusterctl check failed (exit $rc); fix what it says above" "$rc" ;;
    esac
  fi
  say "done"
}

# -- uninstall ----------------------------------------------------------------
remove_tree() {  # remove_tree DIR: rm -rf, but never into a filesystem mounted below DIR
  local dir=$1 mounts=()
  [ -e "$R$dir" ] || return 0
  mapfile -t mounts < <(findmnt -rn -o TARGET | awk -v d="$R$dir/" 'index($0, d) == 1')
  if ((${#mounts[@]} == 0)); then
    rm -rf "$R$dir"
    say "removed $dir"
    return
  fi
  # a separate filesystem (say, a disk for the swap dir): empty around it, keep it
  rm -rf --one-file-system "$R$dir" 2>/dev/null || true
  say "kept ${mounts[*]#"$R"}: another filesystem is mounted there (umount it, then remove it)"
}

do_uninstall() {
  local purge=$1 kind path
  if [ ! -f "$R$manifest" ] && [ ! -d "$R/opt/clusterctl" ]; then
    say "clusterctl is not installed under $root"
  fi
  if systemd_running && [ -f "$R$manifest" ]; then
    while read -r kind path; do
      case $kind:$path in
        file:$unit_dir/*) systemctl disable --now "$(basename "$path")" >/dev/null 2>&1 || true ;;
      esac
    done <"$R$manifest"
  fi
  # tuning and swap files first, while the program that made them is still here
  if [ $staging = 0 ] && [ -x "$venv/bin/clusterctl" ]; then
    local conf_args=()
    [ -f "$conf_dir/clusterctl.toml" ] && conf_args=(--config "$conf_dir/clusterctl.toml")
    "$venv/bin/clusterctl" optimize revert "${conf_args[@]}" >/dev/null \
      || die "could not revert clusterctl's tuning (see above); fix it and re-run" 1
    say "reverted clusterctl's tuning (sysctl, Dask and Ollama settings)"
    "$venv/bin/clusterctl" swap clean "${conf_args[@]}" >/dev/null \
      || die "could not remove clusterctl's swap files (see above); free memory and re-run" 1
    say "removed clusterctl's swap files"
  fi
  if [ -f "$R$manifest" ]; then
    while read -r kind path; do
      case $kind in
        file|link)
          if [ -e "$R$path" ] || [ -L "$R$path" ]; then rm -f "$R$path"; say "removed $path"; fi
          # a Persistent= timer's last-run stamp, kept by systemd
          case $path in
            $unit_dir/*.timer) rm -f "$R/var/lib/systemd/timers/stamp-$(basename "$path")" ;;
          esac ;;
      esac
    done <"$R$manifest"
  fi
  local unit dropin name
  for unit in clusterctl-swap.service clusterctl-agent.service; do  # from `config dropins`
    for name in swap-dir.conf watch-cgroups.conf; do
      dropin=$unit_dir/$unit.d/$name
      if [ -e "$R$dropin" ]; then rm -f "$R$dropin"; say "removed $dropin"; fi
    done
    rmdir "$R$unit_dir/$unit.d" 2>/dev/null || true
  done
  if [ -e "$R/opt/clusterctl" ]; then rm -rf "$R/opt/clusterctl"; say "removed /opt/clusterctl"; fi
  systemd_running && systemctl daemon-reload
  if [ "$purge" = 1 ]; then
    local dirs=() tokens=()
    if [ -f "$R$manifest" ]; then
      while read -r kind path; do
        case $kind in dir) dirs+=("$path") ;; token) tokens+=("$path") ;; esac
      done <"$R$manifest"
    fi
    for path in "${tokens[@]}"; do  # the fleet tokens it made
      if [ -e "$R$path" ]; then rm -f "$R$path"; say "removed $path"; fi
    done
    remove_tree "$conf_dir"
    remove_tree "$state_dir"
    remove_tree /run/clusterctl
    # directories this script created, deepest first, when nothing else lives there
    local i
    for ((i = ${#dirs[@]} - 1; i >= 0; i--)); do
      rmdir "$R${dirs[i]}" 2>/dev/null || true
    done
  else
    say "kept $conf_dir and $state_dir (--purge removes them)"
  fi
  say "done"
}

case $mode in
  install) do_install ;;
  uninstall) do_uninstall 0 ;;
  purge) do_uninstall 1 ;;
esac
