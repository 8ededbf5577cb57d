"""Every method on a v-prediction model (SD 2.x 768's parameterization), on the tiny random SD 2.x-shaped model of
tests/families.py: the conversions of models/common/prediction.py against diffusers' schedulers, text-to-image
against StableDiffusionPipeline, the Diffusion Classifier's error and Imagic's loss measured against v (the
model's own target), each method's exactness property where it has one, and finite outputs for the rest."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline
from PIL import Image

from models.classification import diffusion_classifier, synthetic_data
from models.common.components import Components
from models.common.latents import decode, encode, images_to_tensor, randn, tensor_to_images
from models.common.metrics import psnr
from models.common.prediction import epsilon_error_scale, to_epsilon, training_target
from models.common.sampling import guided_noise
from models.common.text import encode_prompts
from models.editing import (
    ddib,
    ddim_inversion,
    diffedit,
    imagic,
    instruct_pix2pix,
    prompt_to_prompt,
    region_edit,
    sdedit,
)
from models.generation import text_to_image
from models.personalization import custom_diffusion, dreambooth, lora, perfusion
from models.personalization import textual_inversion as ti
from models.personalization.training import noise_prediction_loss
from tests.control_models import stock_pipeline
from tests.families import SD2_IMAGE_SIZE, SD2_V_SCHEDULER
from zoo.train_ip2p import eight_channel_unet

SIZE = SD2_IMAGE_SIZE
PROMPT = "a large red circle at the center"


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def finite(image: Image.Image) -> bool:
    """A decoded image is finite and not one flat colour (NaN latents decode to black)."""
    array = pixels(image)
    return image.size == (SIZE, SIZE) and array.std() > 0


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """A blocky random picture: structure at every scale for the random VAE."""
    cells = np.random.default_rng(0).integers(0, 256, (8, 8, 3))
    return Image.fromarray(np.kron(cells, np.ones((SIZE // 8, SIZE // 8, 1))).astype(np.uint8))


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    """The top-left quarter."""
    array = np.zeros((SIZE, SIZE), dtype=np.uint8)
    array[: SIZE // 2, : SIZE // 2] = 255
    return Image.fromarray(array)


def as_epsilon_model(components: Components) -> Components:
    """The same weights, with a config that says the UNet predicts eps: what the code did before it read v."""
    return dataclasses.replace(components, scheduler_config=SD2_V_SCHEDULER | {"prediction_type": "epsilon"})


# ------------------------------------------------------------------------------------------------
# The conversions


def test_the_fixture_is_a_v_prediction_model(sd2v: Components) -> None:
    assert sd2v.ddim().config.prediction_type == "v_prediction"
    assert sd2v.ddim_inverse().config.prediction_type == "v_prediction"
    assert sd2v.unet.config.use_linear_projection and sd2v.native_size == SIZE


def test_to_epsilon_and_the_target_invert_each_other_and_match_diffusers_step() -> None:
    """eps = sqrt(abar) v + sqrt(1 - abar) x_t gives back the noise that made x_t; a v-mode DDIM step on v equals an
    eps-mode step on to_epsilon(v) (the scheduler's own conversion); the error scale turns v's error into eps's."""
    v_mode = DDIMScheduler.from_config(SD2_V_SCHEDULER)
    eps_mode = DDIMScheduler.from_config(SD2_V_SCHEDULER | {"prediction_type": "epsilon"})
    clean, noise = torch.randn(3, 4, 8, 8, generator=gen(0)), torch.randn(3, 4, 8, 8, generator=gen(1))
    timesteps = torch.tensor([1, 500, 999])
    noisy = v_mode.add_noise(clean, noise, timesteps)
    velocity = training_target(v_mode, clean, noise, timesteps)
    assert torch.equal(velocity, v_mode.get_velocity(clean, noise, timesteps))
    assert torch.equal(training_target(eps_mode, clean, noise, timesteps), noise)
    assert torch.allclose(to_epsilon(v_mode, velocity, noisy, timesteps), noise, atol=1e-5)
    assert torch.equal(to_epsilon(eps_mode, velocity, noisy, timesteps), velocity)  # eps passes through
    guess = torch.randn(3, 4, 8, 8, generator=gen(2))
    scale = epsilon_error_scale(v_mode, timesteps)
    eps_error = (to_epsilon(v_mode, guess, noisy, timesteps) - noise).pow(2).flatten(1).sum(1).double()
    assert torch.allclose(scale * (guess - velocity).pow(2).flatten(1).sum(1).double(), eps_error, rtol=1e-4)
    for scheduler in (v_mode, eps_mode):
        scheduler.set_timesteps(10)
    t, x = v_mode.timesteps[3], noisy[:1]
    stepped_v = v_mode.step(guess[:1], t, x).prev_sample
    stepped_eps = eps_mode.step(to_epsilon(v_mode, guess[:1], x, t), t, x).prev_sample
    assert torch.allclose(stepped_v, stepped_eps, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Generation


def test_text_to_image_matches_the_stock_pipeline(sd2v: Components) -> None:
    """Same weights, config, seed and prompt: our text-to-image equals StableDiffusionPipeline with a DDIMScheduler
    of the model's config within 1/255; read as an eps model, the same weights give another image."""
    params = text_to_image.Params(PROMPT, steps=6, guidance_scale=5.0, width=SIZE, height=SIZE)
    ours = text_to_image.run(sd2v, params, generator=gen(3)).images[0]
    pipe = stock_pipeline(StableDiffusionPipeline, sd2v)
    pipe.scheduler = DDIMScheduler.from_config(SD2_V_SCHEDULER)  # the config as the model ships it, not ours
    theirs = pipe(
        PROMPT, height=SIZE, width=SIZE, num_inference_steps=6, guidance_scale=5.0,
        latents=torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=gen(3)),
    ).images[0]  # fmt: skip
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1
    misread = text_to_image.run(as_epsilon_model(sd2v), params, generator=gen(3)).images[0]
    assert np.abs(pixels(misread) - pixels(theirs)).max() > 8


def test_synthetic_dataset_runs(sd2v: Components) -> None:
    params = synthetic_data.Params(
        classes=[{"label": "circle", "prompt": "a red circle", "count": 1},
                 {"label": "square", "prompt": "a blue square", "count": 1}],
        steps=3, width=SIZE, height=SIZE, pseudo_label=True, pseudo_label_samples_per_stage=(2,),
        pseudo_label_keep_per_stage=(),
    )  # fmt: skip
    out = synthetic_data.run(sd2v, params, generator=gen(0))
    assert out.files and all(np.isfinite(float(v)) for v in out.metrics.values() if isinstance(v, float))


# ------------------------------------------------------------------------------------------------
# Classification: the error in the model's own target


def test_classifier_error_is_measured_against_the_velocity(sd2v: Components, image: Image.Image) -> None:
    """|| v - v_theta ||^2 per dimension, v = get_velocity(x_0, eps, t): not the noise's error."""
    params = diffusion_classifier.Params(prompts=["a red circle", "a blue square"], samples_per_stage=(3,))
    with torch.no_grad():
        clean = encode(sd2v.vae, images_to_tensor([image]))
        embeddings = encode_prompts(sd2v.text_encoder, sd2v.tokenizer, list(params.prompts))
        plan = diffusion_classifier.make_plan(sd2v, params, tuple(clean.shape[1:]), gen(0))
        errors = diffusion_classifier.sample_errors(sd2v, clean, embeddings, plan, [0, 1, 2], [0, 1], batch_size=4)
        scheduler = sd2v.ddim()
        noisy = scheduler.add_noise(clean.expand(3, -1, -1, -1), plan.noises, plan.timesteps)
        velocity = scheduler.get_velocity(clean.expand(3, -1, -1, -1), plan.noises, plan.timesteps)
        for c in range(2):
            predicted = sd2v.unet(noisy, plan.timesteps, encoder_hidden_states=embeddings[c : c + 1].expand(3, -1, -1))
            wanted = (velocity - predicted.sample).pow(2).flatten(1).mean(1)
            noise_error = (plan.noises - predicted.sample).pow(2).flatten(1).mean(1)
            assert torch.allclose(errors[:, c], wanted, rtol=1e-4)
            assert not torch.allclose(errors[:, c], noise_error, rtol=1e-2)


def test_classifier_vlb_weights_carry_abar_for_v(sd2v: Components) -> None:
    """The bound weights eps's error; v's error times abar_t is eps's, so "vlb" on a v-model weights by abar_t more."""
    timesteps = torch.tensor([10, 400, 900])
    on_v = diffusion_classifier.timestep_weights(sd2v, timesteps, "vlb").double()
    on_eps = diffusion_classifier.timestep_weights(as_epsilon_model(sd2v), timesteps, "vlb").double()
    ratio = on_v / on_eps
    abar = sd2v.ddim().alphas_cumprod.double()[timesteps]
    assert torch.allclose(ratio / ratio[0], abar / abar[0], rtol=1e-5)


def test_classifier_runs(sd2v: Components, image: Image.Image) -> None:
    params = diffusion_classifier.Params(prompts=["a red circle", "a blue square"], samples_per_stage=(2, 2),
                                         keep_per_stage=(1,), error_weighting="vlb")  # fmt: skip
    result = diffusion_classifier.run(sd2v, params, {"image": image}, generator=gen(0)).result
    assert all(np.isfinite(entry["error"]) for entry in result["results"][0]["ranking"])


# ------------------------------------------------------------------------------------------------
# Editing


def test_ddim_inversion_reconstructs_better_with_more_steps(sd2v: Components, image: Image.Image) -> None:
    """The DDIM round trip on v: the error shrinks with the step size (Song et al. sec. 4.3)."""
    rmse = [
        ddim_inversion.run(sd2v, ddim_inversion.Params(prompt=PROMPT, steps=steps), {"image": image}, generator=gen(0))
        .metrics["latent_rmse"] for steps in (5, 20)
    ]  # fmt: skip
    assert rmse[1] < 0.7 * rmse[0], rmse


def test_ddib_with_equal_prompts_is_the_inversion_round_trip(sd2v: Components, image: Image.Image) -> None:
    out = ddib.run(sd2v, ddib.Params(source_prompt=PROMPT, target_prompt=PROMPT, steps=5, guidance_scale=1.0),
                   {"image": image},
                   generator=gen(0))  # fmt: skip
    same = ddim_inversion.run(sd2v, ddim_inversion.Params(prompt=PROMPT, steps=5), {"image": image}, generator=gen(0))
    assert np.array_equal(pixels(out.images[0]), pixels(same.images[0]))


def test_sdedit_runs_and_a_small_strength_stays_closer(sd2v: Components, image: Image.Image) -> None:
    """SDEdit's faithfulness knob on v: a one-step edit from t0 = 0.1 T stays nearer the input than one from T."""
    outputs = [
        sdedit.run(sd2v, sdedit.Params(prompt=PROMPT, strength=s, steps=10), {"image": image}, generator=gen(0))
        for s in (0.1, 1.0)
    ]
    with torch.no_grad():
        round_trip = tensor_to_images(decode(sd2v.vae, encode(sd2v.vae, images_to_tensor([image]))))[0]
    near, far = (psnr(out.images[0], round_trip) for out in outputs)
    assert near > far + 3, (near, far)


@pytest.mark.parametrize("sparse", [False, True])
def test_region_edit_keeps_the_outside_exactly(
    sd2v: Components, image: Image.Image, mask: Image.Image, sparse: bool
) -> None:
    params = region_edit.Params(prompt=PROMPT, strength=0.8, steps=4, sparse=sparse, dilation=0)
    out = region_edit.run(sd2v, params, {"image": image, "mask": mask}, generator=gen(0))
    region = np.asarray(out.extra_images["region"]) > 0
    assert np.array_equal(pixels(out.images[0])[~region], pixels(image)[~region])
    assert np.abs(pixels(out.images[0])[region] - pixels(image)[region]).mean() > 5


def test_diffedit_mask_is_the_noise_difference_and_the_edit_keeps_the_outside(
    sd2v: Components, image: Image.Image
) -> None:
    """Step 1 on v converts to eps (its map equals the map of to_epsilon's outputs); step 3 lands on the input's
    latent outside the mask."""
    with torch.no_grad():
        clean = encode(sd2v.vae, images_to_tensor([image]))
        reference, query = (encode_prompts(sd2v.text_encoder, sd2v.tokenizer, [p]) for p in ("", PROMPT))
        difference = diffedit.difference_map(sd2v, clean, reference, query, 2, gen(0))
        scheduler, t = sd2v.ddim(), torch.tensor([500])
        noises = randn((2, *clean.shape[1:]), gen(0), sd2v.device, sd2v.dtype)
        wanted = torch.zeros_like(difference)
        for noise in noises:
            noisy = scheduler.add_noise(clean, noise[None], t)
            eps = [to_epsilon(scheduler, sd2v.unet(noisy, t, encoder_hidden_states=e).sample, noisy, t)
                   for e in (reference, query)]  # fmt: skip
            wanted += (eps[1] - eps[0]).abs().mean(dim=1, keepdim=True) / 2
    assert torch.allclose(difference, wanted, atol=1e-5)
    params = diffedit.Params(query_prompt=PROMPT, steps=6, n_mask_samples=2, encoding_ratio=0.5, guidance_scale=1.0)
    out = diffedit.run(sd2v, params, {"image": image}, generator=gen(0))
    assert finite(out.images[0]) and 0.0 < float(out.metrics["mask_fraction"]) < 1.0


def guided_replay(
    components: Components, start: prompt_to_prompt.Start, cond: torch.Tensor, steps: int
) -> torch.Tensor:
    """Guided DDIM (w = 7.5) from start.latents with the start's per-step unconditional embeddings: (1, C, h, w)."""
    scheduler = components.ddim()
    scheduler.set_timesteps(steps)
    latents = start.latents
    for timestep, null in zip(scheduler.timesteps, start.nulls, strict=True):
        output = guided_noise(components.unet, latents, timestep, cond, null, 7.5)
        latents = scheduler.step(output, timestep, latents).prev_sample
    return latents


def test_null_text_inversion_lands_on_the_input_under_guidance(sd2v: Components, image: Image.Image) -> None:
    """Mokady et al. on v: under guidance 7.5 the guided sampler from the inverted noise drifts with the empty
    prompt's embedding and lands much nearer the input's latent with the optimised null-text embeddings."""
    params = prompt_to_prompt.Params(source_prompt=PROMPT, target_prompt=PROMPT, steps=8, width=SIZE, height=SIZE)
    with torch.no_grad():
        clean = encode(sd2v.vae, images_to_tensor([image]))
        cond = encode_prompts(sd2v.text_encoder, sd2v.tokenizer, [PROMPT])
    optimised = prompt_to_prompt.inverted_start(sd2v, dataclasses.replace(params, null_text_steps=10), image)
    plain = prompt_to_prompt.inverted_start(sd2v, dataclasses.replace(params, null_text_steps=0), image)
    assert optimised.inversion == "null-text" and plain.inversion == "ddim"
    with torch.no_grad():
        faithful, drifting = ((guided_replay(sd2v, start, cond, 8) - clean).norm() for start in (optimised, plain))
    assert faithful < 0.7 * drifting, (faithful, drifting)


def test_prompt_to_prompt_runs_and_identical_prompts_give_identical_branches(
    sd2v: Components, image: Image.Image
) -> None:
    same = prompt_to_prompt.Params(source_prompt=PROMPT, target_prompt=PROMPT, steps=4, width=SIZE, height=SIZE,
                                   null_text_steps=2)  # fmt: skip
    out = prompt_to_prompt.run(sd2v, same, {"image": image}, generator=gen(0))
    assert np.array_equal(pixels(out.images[0]), pixels(out.images[1])) and finite(out.images[0])
    edit = prompt_to_prompt.Params(source_prompt="a large red circle", target_prompt="a large blue circle", steps=4,
                                   width=SIZE, height=SIZE, local_blend_words=("circle",))  # fmt: skip
    assert all(finite(i) for i in prompt_to_prompt.run(sd2v, edit, {}, generator=gen(0)).images)


def test_imagic_loss_is_against_the_velocity_and_imagic_runs(sd2v: Components, image: Image.Image) -> None:
    with torch.no_grad():
        clean = encode(sd2v.vae, images_to_tensor([image]))
        embedding = encode_prompts(sd2v.text_encoder, sd2v.tokenizer, [PROMPT])
        scheduler = sd2v.ddim()
        loss = imagic.denoising_loss(sd2v.unet, scheduler, clean, embedding, gen(5), batch=3)
        draw = gen(5)
        timesteps = torch.randint(0, 1000, (3,), generator=draw)
        noise = randn((3, *clean.shape[1:]), draw, sd2v.device, sd2v.dtype)
        noisy = scheduler.add_noise(clean.expand(3, -1, -1, -1), noise, timesteps)
        predicted = sd2v.unet(noisy, timesteps, encoder_hidden_states=embedding.expand(3, -1, -1)).sample
        velocity = scheduler.get_velocity(clean.expand(3, -1, -1, -1), noise, timesteps)
    assert torch.allclose(loss, F.mse_loss(predicted, velocity), rtol=1e-5)
    assert not torch.allclose(loss, F.mse_loss(predicted, noise), rtol=1e-2)
    params = imagic.Params(target_prompt=PROMPT, etas=(0.0, 1.0), embedding_steps=2, finetune_steps=2, steps=3)
    out = imagic.run(sd2v, params, {"image": image}, generator=gen(0))
    assert len(out.images) == 2 and all(finite(i) for i in out.images)
    assert all(np.isfinite(float(v)) for v in out.metrics.values())


def test_instruct_pix2pix_on_v_matches_the_stock_pipeline(sd2v: Components, image: Image.Image) -> None:
    """An 8-channel v-prediction variant of the model: our sampler equals StableDiffusionInstructPix2PixPipeline."""
    torch.manual_seed(0)
    unet = eight_channel_unet(sd2v.unet).eval().requires_grad_(False)
    with torch.no_grad():  # the image channels start at zero; make them matter
        unet.conv_in.weight[:, 4:].normal_(0.0, 0.05)
    ip2p = dataclasses.replace(sd2v, unet=unet)
    params = instruct_pix2pix.Params("make the circle blue", steps=4, guidance_scale=5.0, image_guidance_scale=1.7)
    ours = instruct_pix2pix.run(ip2p, params, {"image": image}, generator=gen(4)).images[0]
    pipe = stock_pipeline(StableDiffusionInstructPix2PixPipeline, ip2p)
    pipe.scheduler = DDIMScheduler.from_config(SD2_V_SCHEDULER)  # the config as the model ships it, not ours
    theirs = pipe(
        params.instruction, image=image, num_inference_steps=params.steps, guidance_scale=params.guidance_scale,
        image_guidance_scale=params.image_guidance_scale, latents=torch.randn(1, 4, SIZE // 2, SIZE // 2,
                                                                              generator=gen(4)),
    ).images[0]  # fmt: skip
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1


# ------------------------------------------------------------------------------------------------
# Personalization: the loss in v, and every method runs


def test_personalization_loss_is_against_the_velocity(sd2v: Components, image: Image.Image) -> None:
    with torch.no_grad():
        latents = encode(sd2v.vae, images_to_tensor([image, image]))
        embeddings = encode_prompts(sd2v.text_encoder, sd2v.tokenizer, [PROMPT] * 2)
        scheduler = sd2v.ddim()
        loss = noise_prediction_loss(sd2v.unet, scheduler, latents, embeddings, gen(2))
        draw = gen(2)
        noise = randn(latents.shape, draw, sd2v.device, sd2v.dtype)
        timesteps = torch.randint(0, 1000, (2,), generator=draw)
        predicted = sd2v.unet(scheduler.add_noise(latents, noise, timesteps), timesteps,
                              encoder_hidden_states=embeddings).sample  # fmt: skip
        velocity = scheduler.get_velocity(latents, noise, timesteps)
    assert torch.allclose(loss, (predicted - velocity).pow(2).mean(dim=(1, 2, 3)), rtol=1e-5)


def test_personalization_methods_run(sd2v: Components, image: Image.Image) -> None:
    images = {"images": [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]}
    outputs = {
        "textual_inversion": ti.run(sd2v, ti.Params(token="<v1>", class_word="circle", steps=2), images,
                                    generator=gen(0)),
        "lora": lora.run(sd2v, lora.Params(token="<v2>", class_word="circle", steps=2), images, generator=gen(0)),
        "dreambooth": dreambooth.run(sd2v, dreambooth.Params(token="<v3>", class_word="circle", steps=2,
                                     prior_preservation=False), images, generator=gen(0)),
        "perfusion": perfusion.run(sd2v, perfusion.Params(token="<v4>", class_word="circle", steps=2), images,
                                   generator=gen(0)),
    }  # fmt: skip
    concepts = [
        custom_diffusion.run(sd2v, custom_diffusion.Params(token="<v5>", class_word="circle", steps=2,
                             regularization=False), images, generator=gen(0))
    ]  # fmt: skip
    for name, out in [*outputs.items(), ("custom_diffusion", concepts[0])]:
        assert out.adapter is not None, name
        assert all(torch.isfinite(t).all() for t in out.adapter.tensors.values()), name
        losses = [v for k, v in out.metrics.items() if "loss" in k and isinstance(v, float)]
        assert all(np.isfinite(v) for v in losses), name
