"""``--stage export``: student + tiny VAE -> one tinysr weights file that ``tinysr upscale`` runs.

The student's LoRA is merged, its constant modulation folded into the linear layers
(``fold_modulation``), and the result written with ``save_weights`` in the recipe's dtype. The
provenance records the export recipe, the kept teacher layers, the training steps and the recipes
and hashes of the two inputs. The written file is read back with the CLI's own loader as a check.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from tinysr_cli.errors import TinySRError
from tinysr_cli.models.tinysr import TinySR, TinySRConfig
from tinysr_cli.weights.format import DTYPES_BY_NAME, load_weights, save_weights
from training.stages.common import Reporter, StageResult
from training.stages.recipe import Recipe
from training.stages.vae import load_vae
from training.student import export_transformer, load_student


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


@torch.no_grad()
def run_export_stage(recipe: Recipe, output: Path | None, reporter: Reporter) -> StageResult:
    recipe.require("export")
    spec = recipe.export
    output = Path(output) if output is not None else spec.output
    if output.exists():
        raise TinySRError(f"{output} exists", hint="remove it, or export to another path with --output")
    student, student_info = load_student(spec.student)
    vae, vae_provenance = load_vae(spec.vae)
    if vae.config.latent_channels != student_info.config.latent_channels:
        raise TinySRError(
            f"the VAE has {vae.config.latent_channels} latent channels, the student {student_info.config.latent_channels}"
        )
    model = TinySR(TinySRConfig(student_info.config, vae.config)).eval()
    model.transformer.load_state_dict(export_transformer(student).state_dict())
    model.vae.load_state_dict(vae.state_dict())
    provenance = {
        "source": "tinysr train",
        "recipe": recipe.raw,
        "kept_layers": list(student_info.kept_layers),
        "student": {
            "file": spec.student.name,
            "sha256": _sha256(spec.student),
            "step": student_info.provenance.get("step"),
            "phase": student_info.provenance.get("phase"),
            "lora": student_info.lora.to_dict() if student_info.lora else None,
            "recipe": student_info.provenance.get("recipe"),
        },
        "vae": {
            "file": spec.vae.name,
            "sha256": _sha256(spec.vae),
            "step": vae_provenance.get("step"),
            "recipe": vae_provenance.get("recipe"),
        },
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model, output, dtype=DTYPES_BY_NAME[spec.dtype], color_fix=spec.color_fix, provenance=provenance)
    load_weights(output)  # the CLI's loader must accept what we wrote
    reporter.note(f"wrote {output}")
    return StageResult(output, int(student_info.provenance.get("step") or 0), True)
