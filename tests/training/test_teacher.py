"""The teacher (SD3 + TSD-SR LoRA) and the student built from it, on a tiny random SD3-style teacher.

References are computed independently of the code under test: LoRA deltas merged by hand from the
files, diffusers' own forward (with ``skip_layers`` for pruned blocks and an empty prompt for the
removed text stream), diffusers' own positional-table crop.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinysr_cli.errors import TinySRError

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

from training.student import (  # noqa: E402
    DistillationStudent,
    LoraSpec,
    attach_lora,
    build_student,
    export_transformer,
    load_student,
    save_student,
)
from training.teacher import TeacherSpec, load_prompt_embeddings, load_teacher, load_transformer, write_random_teacher  # noqa: E402

RANK = 4


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> TeacherSpec:
    return write_random_teacher(tmp_path_factory.mktemp("teacher"), seed=3, rank=RANK)


def _merged_by_hand(model: torch.nn.Module, lora_file, prefix: str, scale: float) -> None:
    """W += scale * B @ A for every LoRA pair in the file (convs: over the flattened kernel)."""
    tensors = load_file(lora_file)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, down in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key[len(prefix) : -len(".lora_A.weight")]
            up = tensors[key.replace("lora_A", "lora_B")]
            weight = modules[name].weight
            delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
            weight += scale * delta.reshape(weight.shape)


def _reference_models(spec: TeacherSpec, scale: float):
    transformer = diffusers.SD3Transformer2DModel.from_pretrained(spec.sd3, subfolder="transformer")
    vae = diffusers.AutoencoderKL.from_pretrained(spec.sd3, subfolder="vae")
    _merged_by_hand(transformer, spec.transformer_lora, "transformer.", scale)
    _merged_by_hand(vae, spec.vae_lora, "vae.", scale)
    return transformer.eval(), vae.eval()


def _velocity(transformer, latent, prompt, pooled, skip=None):
    batch = latent.shape[0]
    with torch.no_grad():
        return transformer(
            hidden_states=latent,
            timestep=torch.full((batch,), 1000.0),
            encoder_hidden_states=prompt.expand(batch, -1, -1),
            pooled_projections=pooled.expand(batch, -1),
            skip_layers=skip,
            return_dict=False,
        )[0]


@pytest.mark.parametrize("alpha", [None, 2.0 * RANK])
def test_teacher_matches_a_hand_merged_lora(spec, alpha):
    """alpha None means alpha = rank (scale 1, as TSD-SR); 2*rank doubles every delta."""
    import dataclasses

    teacher = load_teacher(dataclasses.replace(spec, lora_alpha=alpha))
    transformer, vae = _reference_models(spec, scale=(alpha or RANK) / RANK)
    plain = diffusers.SD3Transformer2DModel.from_pretrained(spec.sd3, subfolder="transformer").eval()
    prompt = torch.load(spec.prompt_embeds, weights_only=True)
    pooled = torch.load(spec.pooled_embeds, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    latent = torch.randn(2, 16, 8, 8, generator=generator)

    with torch.no_grad():
        encoded = teacher.encode(image)
        expected_latent = vae.encode(image).latent_dist.mean * 1.5305
        restored = teacher.restore(latent)
        decoded = teacher.decode(latent)
        expected_image = vae.decode(latent / 1.5305).sample
    expected_v = _velocity(transformer, latent, prompt, pooled)
    assert encoded.shape == (2, 16, 8, 8)
    torch.testing.assert_close(encoded, expected_latent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(restored, latent - expected_v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoded, expected_image, atol=1e-5, rtol=1e-5)
    # The LoRA matters: without it the velocity is clearly different.
    assert (_velocity(plain, latent, prompt, pooled) - expected_v).abs().max() > 1e-2


def test_hidden_states_are_the_image_stream_after_each_block(spec):
    teacher = load_teacher(spec)
    transformer = teacher.transformer
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), teacher.capture_hidden([1, 3]) as captured:
        teacher.velocity(latent)
    assert set(captured) == {1, 3} and captured[1].shape == (1, 16, 32)
    # Stopping after block 1 (diffusers' skip_layers) and applying the output head gives the same v.
    prompt, pooled = teacher.prompt_embeds, teacher.pooled_embeds
    expected = _velocity(transformer, latent, prompt, pooled, skip=[2, 3])
    with torch.no_grad():
        temb = transformer.time_text_embed(torch.full((1,), 1000.0), pooled)
        tokens = transformer.proj_out(transformer.norm_out(captured[1], temb))
    from_hidden = torch.einsum("nhwpqc->nchpwq", tokens.reshape(1, 4, 4, 2, 2, 16)).reshape(1, 16, 8, 8)
    torch.testing.assert_close(from_hidden, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(TinySRError, match="block 9 does not exist"):
        with teacher.capture_hidden([9]):
            pass


def test_teacher_errors_are_clear(spec, tmp_path):
    import dataclasses

    with pytest.raises(TinySRError, match="not a diffusers model folder"):
        load_teacher(dataclasses.replace(spec, sd3=tmp_path))
    bad_lora = tmp_path / "bad.safetensors"
    save_file({"transformer.no_such.module.lora_A.weight": torch.zeros(4, 4), "transformer.no_such.module.lora_B.weight": torch.zeros(4, 4)}, bad_lora)
    with pytest.raises(TinySRError, match="LoRA targets 'no_such.module', which the SD3Transformer2DModel does not contain"):
        load_teacher(dataclasses.replace(spec, transformer_lora=bad_lora))
    wrong = tmp_path / "pooled.pt"
    torch.save(torch.zeros(1, 5), wrong)
    with pytest.raises(TinySRError, match="pooled embeddings have shape"):
        load_teacher(dataclasses.replace(spec, pooled_embeds=wrong))


# ----------------------------------------------------------------------------- the student


def test_student_equals_the_pruned_teacher_without_its_text_stream(spec):
    """Kept blocks [0, 2, 3]: diffusers with skip_layers=[1] and an empty prompt is the same function."""
    transformer = load_transformer(spec)
    _, pooled = load_prompt_embeddings(spec)
    student = build_student(transformer, [0, 2, 3], pooled, pos_grid=16)
    latent = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    empty_prompt = torch.zeros(1, 0, transformer.config.joint_attention_dim)
    expected = _velocity(transformer, latent, empty_prompt, pooled, skip=[1])
    with torch.no_grad():
        velocity = student(latent)
    torch.testing.assert_close(velocity, expected, atol=1e-5, rtol=1e-5)
    assert student.config.num_layers == 3 and student.modulation.shape == (3, 6, 32)
    # The positional buffer is SD3's table cropped by diffusers' own rule.
    torch.testing.assert_close(student.pos_embed, transformer.pos_embed.cropped_pos_embed(32, 32), atol=0, rtol=0)
    # The distillation wrapper computes the same restored latent and hands out block outputs.
    restored, hidden = DistillationStudent(student, capture=[0, 2])(latent)
    torch.testing.assert_close(restored, latent - velocity, atol=0, rtol=0)
    assert [h.shape for h in hidden] == [(2, 16, 32)] * 2


def test_student_rejects_bad_layer_lists(spec):
    transformer = load_transformer(spec)
    _, pooled = load_prompt_embeddings(spec)
    for kept in ([], [2, 1], [0, 4], [1, 1]):
        with pytest.raises(TinySRError, match="kept layers"):
            build_student(transformer, kept, pooled, pos_grid=16)
    with pytest.raises(TinySRError, match="exceeds the teacher's positional table"):
        build_student(transformer, [0], pooled, pos_grid=64)


def test_lora_training_export_and_files(spec, tmp_path):
    transformer = load_transformer(spec)
    _, pooled = load_prompt_embeddings(spec)
    student = build_student(transformer, [1, 3], pooled, pos_grid=16)
    latent = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = student(latent)
    trainable = attach_lora(student, LoraSpec(rank=2, alpha=4.0))
    names = {n for n, p in student.named_parameters() if p.requires_grad}
    assert names >= {"modulation", "final_modulation"} and all("lora_" in n or "modulation" in n for n in names)
    assert sum(p.numel() for p in trainable) == sum(p.numel() for n, p in student.named_parameters() if n in names)
    with torch.no_grad():
        torch.testing.assert_close(student(latent), before, atol=0, rtol=0)  # B = 0 at the start
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        student.modulation.add_(0.01)
        trained = student(latent)
    assert (trained - before).abs().max() > 1e-3

    folded = export_transformer(student)  # LoRA merged, modulation folded
    with torch.no_grad():
        torch.testing.assert_close(folded(latent), trained, atol=1e-5, rtol=1e-5)
    assert not any("lora" in k or "modulation" in k for k in folded.state_dict())

    path = save_student(tmp_path / "student.safetensors", student, [1, 3], LoraSpec(rank=2, alpha=4.0), {"step": 7})
    loaded, info = load_student(path)
    assert info.kept_layers == (1, 3) and info.lora == LoraSpec(rank=2, alpha=4.0) and info.provenance == {"step": 7}
    with torch.no_grad():
        torch.testing.assert_close(loaded(latent), trained, atol=0, rtol=0)
    with pytest.raises(TinySRError, match="not a student file"):
        save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
        load_student(tmp_path / "other.safetensors")
