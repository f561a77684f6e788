"""The unlearn stage's output: the final checkpoint's UNet as a model directory in diffusers
layout at the run's output URI (a local path or s3://), with its digest and lineage metadata in
`retrack_digest.json`, written last: a folder without it is not an output."""

from __future__ import annotations

import tempfile

from retrack.config.model_kind import ModelKind
from retrack.training.checkpoint import load_unet_weights
from retrack.training.prepare import Prepared


def existing_output(prep: Prepared) -> str | None:
    """The digest of an output this config already wrote, if any."""
    from retrack.models.pixel import DIGEST_FILE

    marker = prep.output / DIGEST_FILE
    if marker.is_file():
        meta = marker.read_json()
        if meta.get("config_hash") == prep.config_hash:
            return meta["sha256"]
    return None


def save_output(prep: Prepared, checkpoint_dir: str, state: dict) -> str:
    """Write the model of a final checkpoint to the output URI; returns its digest."""
    from retrack.models.pixel import DIGEST_FILE
    from retrack.storage.tree import upload_tree

    if not prep.output.is_s3:
        return _save_model(prep, checkpoint_dir, state, prep.output.path)
    with tempfile.TemporaryDirectory() as tmp:
        digest = _save_model(prep, checkpoint_dir, state, f"{tmp}/model")
        prep.output.remove()  # an earlier, unfinished upload
        upload_tree(f"{tmp}/model", prep.output, last=DIGEST_FILE)
    return digest


def _save_model(prep: Prepared, checkpoint_dir: str, state: dict, out: str) -> str:
    from retrack.models.pixel import model_digest

    spec = prep.run.spec
    meta = {
        "request_id": spec.request_id,
        "config_hash": prep.config_hash,
        "run_name": prep.run_name,
        "method": spec.method.name,
        "steps": state["step"],
        "base_model_sha256": model_digest(prep.model_dir),
        "forget_ids_sha256": prep.plan.forget_digest,
        "forget_count": prep.plan.n_forget,
        "num_workers": spec.scaling.num_workers,
    }
    weights = load_unet_weights(checkpoint_dir)
    if prep.plan.kind is ModelKind.PIXEL_DDPM:
        from retrack.models.pixel import load_pixel_model, save_pixel_model

        model = load_pixel_model(prep.model_dir)
        model.unet.load_state_dict(weights)
        return save_pixel_model(model, out, metadata=meta)
    from diffusers import UNet2DConditionModel

    from retrack.models.sd import save_finetuned_unet

    # The parent's config, not its weights (which may exist only as a variant): the run's replace them all.
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(prep.model_dir, subfolder="unet"))
    unet.load_state_dict(weights)
    return save_finetuned_unet(unet, prep.model_dir, out, metadata=meta)
