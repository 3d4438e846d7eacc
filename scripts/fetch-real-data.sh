#!/usr/bin/env bash
# Installs and extracts the real image data dinod can use (see shared/design/datasets.md):
#   - Fashion-MNIST (Debian `dataset-fashion-mnist`, installed with apt-get; IDX files under
#     /usr/share/datasets/fashion-mnist, linked as TARGET/fashion-mnist),
#   - Tux Paint photo cut-outs with alpha mattes (`tuxpaint-stamps-default`) -> TARGET/stamps/<cat>/<sub>/x.png,
#   - the real photographs among the Debian wallpaper packages -> TARGET/backgrounds/*.jpg.
# The large packages are fetched with `apt-get download` and only the needed PNG/JPG files are extracted
# with `dpkg-deb --fsys-tarfile`, so nothing else gets installed. Idempotent: a finished TARGET is left as is.
#
# Usage: scripts/fetch-real-data.sh [TARGET]      (default TARGET: $HOME/.cache/dinod/real)
# Then:  cargo run -p data --release --example build_copypaste -- TARGET OUT_DIR
set -euo pipefail

target="${1:-${HOME}/.cache/dinod/real}"
stamp_version="tuxpaint-stamps-default lomiri-wallpapers-16.04 mate-backgrounds plasma-workspace-wallpapers lomiri-wallpapers-20.04 v1"

if [ -f "${target}/.complete" ] && [ "$(cat "${target}/.complete")" = "${stamp_version}" ] \
    && [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    echo "fetch-real-data: ${target} is complete"
    exit 0
fi

sudo_cmd=()
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then sudo_cmd=(sudo); else
        echo "fetch-real-data: need root (or sudo) for apt-get install" >&2
        exit 2
    fi
fi

# 1. Fashion-MNIST: a small package without dependencies, installed normally.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if ! "${sudo_cmd[@]}" apt-get install -y -q dataset-fashion-mnist; then
        "${sudo_cmd[@]}" apt-get update -q
        "${sudo_cmd[@]}" apt-get install -y -q dataset-fashion-mnist
    fi
fi

mkdir -p "${target}"
ln -sfn /usr/share/datasets/fashion-mnist "${target}/fashion-mnist"

# 2. The big packages: download the .deb files only and extract what we need.
work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT
cd "${work}"
packages=(tuxpaint-stamps-default lomiri-wallpapers-16.04 mate-backgrounds plasma-workspace-wallpapers lomiri-wallpapers-20.04)
if ! apt-get download -q "${packages[@]}" 2>apt.log; then
    "${sudo_cmd[@]}" apt-get update -q
    apt-get download -q "${packages[@]}"
fi

extract() { # extract DEB PATTERN...: unpack the matching members into ./x
    local deb="$1"
    shift
    mkdir -p x
    dpkg-deb --fsys-tarfile "${deb}" | tar -x -C x --wildcards "$@"
}

# Tux Paint stamps: every PNG (the copy-paste builder filters photo-like cut-outs and picks classes).
extract tuxpaint-stamps-default_*.deb './usr/share/tuxpaint/stamps/*.png'
rm -rf "${target}/stamps.tmp"
mkdir -p "${target}/stamps.tmp"
cp -r x/usr/share/tuxpaint/stamps/. "${target}/stamps.tmp/"   # only PNGs were extracted
rm -rf x
rm -rf "${target}/stamps"
mv "${target}/stamps.tmp" "${target}/stamps"

# Wallpapers: only the files that are real photographs (datasets.md, checked visually).
rm -rf "${target}/backgrounds.tmp"
mkdir -p "${target}/backgrounds.tmp"
bg="${target}/backgrounds.tmp"

extract lomiri-wallpapers-16.04_*.deb './usr/share/backgrounds/*.jpg'
for f in x/usr/share/backgrounds/*.jpg; do
    case "$(basename "$f")" in
        umang_* | analogpattern_*) ;; # not photographs
        *) cp "$f" "${bg}/lomiri16-$(basename "$f")" ;;
    esac
done
rm -rf x

extract lomiri-wallpapers-20.04_*.deb './usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg'
cp x/usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg "${bg}/lomiri20-Kleiber_by_Lukas_Baubkus.jpg"
rm -rf x

extract mate-backgrounds_*.deb './usr/share/backgrounds/mate/nature/*.jpg'
for f in x/usr/share/backgrounds/mate/nature/*.jpg; do
    cp "$f" "${bg}/mate-$(basename "$f")"
done
rm -rf x

plasma_photos=(BytheWater ColdRipple ColorfulCups DarkestHour EveningGlow FallenLeaf Grey Kite OneStandsOut Path summer_1am)
patterns=()
for name in "${plasma_photos[@]}"; do patterns+=("./usr/share/wallpapers/${name}/contents/images/*"); done
extract plasma-workspace-wallpapers_*.deb "${patterns[@]}"
for name in "${plasma_photos[@]}"; do
    # Take the largest rendition (file names are WIDTHxHEIGHT.jpg / .png).
    best="$(cd "x/usr/share/wallpapers/${name}/contents/images" && ls | awk -F'[x.]' '{print $1*$2, $0}' | sort -n | tail -1 | cut -d' ' -f2)"
    cp "x/usr/share/wallpapers/${name}/contents/images/${best}" "${bg}/plasma-${name}.${best##*.}"
done
rm -rf x

rm -rf "${target}/backgrounds"
mv "${bg}" "${target}/backgrounds"

echo "${stamp_version}" >"${target}/.complete"
echo "fetch-real-data: $(find "${target}/stamps" -name '*.png' | wc -l) stamp PNGs, $(ls "${target}/backgrounds" | wc -l) background photos, Fashion-MNIST in ${target}/fashion-mnist"
