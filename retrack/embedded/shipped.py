"""The embedded default's pretrained weights, shipped with the package so that a first
`retrack demo` does not spend minutes pretraining (the originals and the feature classifier,
a few MB each; the retrained gold standard, which only the benchmarks need, is not shipped).

Each folder is a cache entry exactly as `ensure_pretrained` writes it. The manifest records, per
entry, the key it was made for (the benchmark's content and the pretraining config) and the
digest of its files: an entry is installed only for its own key, after its digest is checked.
`retrack pretrain --from-scratch` reproduces them; maintainers refresh them with
`python -m retrack.embedded.shipped PRESET...` after a pretraining change.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from retrack.digest import directory_digest
from retrack.errors import ModelLayoutError
from retrack.storage.atomic import atomic_directory

SHIPPED = Path(__file__).with_name("pretrained")
MANIFEST = SHIPPED / "manifest.json"
SHIPPED_MODELS = ("original", "classifier")


def _manifest() -> dict[str, dict]:
    return json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {}


def install_shipped(preset: str, which: str, key: str, out: Path) -> bool:
    """Copy the shipped `which` of `preset` to `out` if it was made for `key`; False if none was."""
    name = f"{preset}/{which}"
    entry = _manifest().get(name)
    if entry is None or entry["key"] != key:
        return False
    src = SHIPPED / name
    if directory_digest(src) != entry["sha256"]:
        raise ModelLayoutError(f"the shipped weights {src} do not match their digest in {MANIFEST}: reinstall retrack, "
                               "or run `retrack pretrain --from-scratch`")
    with atomic_directory(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return True


def ship(workspace_models: Path, presets: list[str], keys: dict[str, str]) -> None:
    """Copy the workspace's cache entries of `presets` into the package, with their `keys`
    ({"preset/which": key}) and digests in the manifest."""
    manifest = _manifest()
    for preset in presets:
        for which in SHIPPED_MODELS:
            name = f"{preset}/{which}"
            dest = SHIPPED / name
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(workspace_models / name, dest)
            manifest[name] = {"key": keys[name], "sha256": directory_digest(dest)}
    MANIFEST.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    from retrack.embedded.pretrain import ensure_pretrained, model_keys
    from retrack.embedded.workspace import Workspace

    ws = Workspace.default()
    for p in sys.argv[1:]:
        ensure_pretrained(ws, p, models=("original",), reuse=False)
    ship(ws.root / "models" / ws.scenario, sys.argv[1:], {k: v for p in sys.argv[1:] for k, v in model_keys(ws, p).items()})
