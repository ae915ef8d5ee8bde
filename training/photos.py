"""Real training photos from Debian packages, prepared from a manifest with checked digests.

The manifest (TOML) lists ``[packages.NAME]`` (version, licence) and ``[[photos]]`` entries (package,
member path inside the .deb, sha256 of that member, ``downscale`` factor, ``split`` = train or
validation). ``prepare_photos`` fetches the packages with ``apt-get download`` unless a folder of
.deb files is given, extracts only the listed members, checks each digest and writes
``SPLIT/NAME.png`` (downscaled with Pillow's antialiased bicubic where asked). Files already there
are kept, so a second call does nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tinysr_cli.atomic import atomic_path
from tinysr_cli.errors import TinySRError
from training.recipe_io import read_toml

SPLITS = ("train", "validation")


@dataclass(frozen=True)
class Photo:
    name: str
    package: str
    member: str
    sha256: str
    downscale: int
    split: str


@dataclass(frozen=True)
class PhotoManifest:
    path: Path
    packages: dict[str, dict[str, str]]
    photos: tuple[Photo, ...]

    @property
    def digest(self) -> str:
        """sha256 of what the manifest selects (packages, members, digests, treatment)."""
        text = json.dumps({"packages": self.packages, "photos": [p.__dict__ for p in self.photos]}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def read_manifest(path: str | Path) -> PhotoManifest:
    path = Path(path)
    raw = read_toml(path)
    packages = raw.get("packages", {})
    photos = []
    for index, entry in enumerate(raw.get("photos", [])):
        try:
            photo = Photo(**{key: entry[key] for key in Photo.__dataclass_fields__})
        except KeyError as exc:
            raise TinySRError(f"{path}: photo {index + 1} lacks {exc.args[0]!r}") from None
        if photo.package not in packages:
            raise TinySRError(f"{path}: photo {photo.name!r} names package {photo.package!r}, which [packages] does not list")
        if photo.split not in SPLITS or photo.downscale < 1:
            raise TinySRError(f"{path}: photo {photo.name!r} needs split in {SPLITS} and downscale >= 1")
        photos.append(photo)
    if not photos:
        raise TinySRError(f"{path}: no [[photos]] listed")
    return PhotoManifest(path, packages, tuple(photos))


def _find_debs(manifest: PhotoManifest, debs_dir: Path | None, workdir: Path) -> dict[str, Path]:
    """The .deb file of every package, from ``debs_dir`` or downloaded into ``workdir``."""
    found: dict[str, Path] = {}
    for name, info in manifest.packages.items():
        version = info["version"].split(":")[-1]
        if debs_dir is not None:
            matches = sorted(Path(debs_dir).glob(f"{name}_*{version}*.deb"))
            if not matches:
                raise TinySRError(f"{debs_dir}: no {name} {info['version']} .deb", hint=f"apt-get download {name}={info['version']}")
            found[name] = matches[0]
            continue
        command = ["apt-get", "download", f"{name}={info['version']}"]
        try:
            subprocess.run(command, cwd=workdir, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            raise TinySRError(
                f"could not download {name} {info['version']}: {detail.strip().splitlines()[-1] if detail.strip() else exc}",
                hint="run `apt-get update` first, or pass the .deb files' folder as [data] debs_dir",
            ) from None
        found[name] = sorted(workdir.glob(f"{name}_*.deb"))[0]
    return found


def prepare_photos(manifest: PhotoManifest, dest: str | Path, debs_dir: str | Path | None = None) -> dict[str, list[Path]]:
    """Write the manifest's photos under ``dest/SPLIT/NAME.png``; returns the files by split."""
    dest = Path(dest)
    wanted = {p: dest / p.split / f"{p.name}.png" for p in manifest.photos}
    missing = [p for p, target in wanted.items() if not target.is_file()]
    if missing:
        with tempfile.TemporaryDirectory(prefix="tinysr-photos-") as tmp:
            workdir = Path(tmp)
            debs = _find_debs(manifest, Path(debs_dir) if debs_dir else None, workdir)
            for package in sorted({p.package for p in missing}):
                subprocess.run(["dpkg-deb", "-x", str(debs[package]), str(workdir / package)], check=True)
            for photo in missing:
                source = workdir / photo.package / photo.member
                if not source.is_file():
                    raise TinySRError(f"{debs[photo.package].name} holds no {photo.member}")
                digest = hashlib.sha256(source.read_bytes()).hexdigest()
                if digest != photo.sha256:
                    raise TinySRError(f"{photo.member} in {debs[photo.package].name} has sha256 {digest}, the manifest says {photo.sha256}")
                _write_photo(source, wanted[photo], photo.downscale)
        copy_license_note(manifest, dest)
    by_split: dict[str, list[Path]] = {split: [] for split in SPLITS}
    for photo, target in wanted.items():
        by_split[photo.split].append(target)
    return by_split


def _write_photo(source: Path, target: Path, downscale: int) -> None:
    with Image.open(source) as image:
        image = image.convert("RGB")
        if downscale > 1:
            size = (image.width // downscale, image.height // downscale)
            image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            image.save(tmp, format="PNG")


def copy_license_note(manifest: PhotoManifest, dest: Path) -> None:
    """A LICENSES.txt beside the prepared photos naming each package's licence."""
    lines = [f"{name} {info['version']}: {info['license']}" for name, info in sorted(manifest.packages.items())]
    (dest / "LICENSES.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.copyfile(manifest.path, dest / manifest.path.name)
