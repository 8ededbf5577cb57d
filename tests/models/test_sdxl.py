"""SDXL (issue 12) on a tiny random-weight model of its structure (tests/families.py `sdxl_components`): two text
encoders, added text-time conditioning, `force_zeros_for_empty_prompt`.

Text-to-image and SDEdit equal diffusers' `StableDiffusionXLPipeline` and `StableDiffusionXLImg2ImgPipeline` on the
same weights, seed and DDIM scheduler within 1/255 (so the conditioning is SDXL's: a wrong width, a missing pooled
embedding or size, or a negative prompt encoded where SDXL zeroes it, would move the image); region edit equals
SDEdit where the whole image is the region; LoRA (UNet and both text encoders) and an SDXL textual-inversion
embedding (`clip_l`, `clip_g`) apply and come off again; a control's UNet inputs compose with the added
conditioning.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    T2IAdapter,
)
from PIL import Image
from transformers import CLIPTextModelWithProjection

from models.common.activation_cache import tensor_bytes
from models.common.components import Components
from models.common.conditioning import encode_guided
from models.common.latents import encode, images_to_tensor
from models.common.sampling import combined
from models.control.adapter import AdapterControl
from models.editing import region_edit, sdedit
from models.generation import text_to_image
from models.personalization import lora
from models.personalization import textual_inversion as ti
from models.personalization.apply import applied
from models.personalization.common import Adapter, tokens_metadata
from tests.families import (
    SDXL_IMAGE_SIZE,
    SDXL_PROJECTION,
    SDXL_SCHEDULER,
    SDXL_WIDTHS,
    save_folder,
    sd1_components,
)
from worker.runtime import DevicePolicy, load_components, model_bytes

SIZE = SDXL_IMAGE_SIZE
PROMPT = "a large red circle at the center"


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """A blocky random picture: structure at every scale for the random VAE."""
    cells = np.random.default_rng(0).integers(0, 256, (8, 8, 3))
    return Image.fromarray(np.kron(cells, np.ones((SIZE // 8, SIZE // 8, 1))).astype(np.uint8))


def stock_xl(pipeline_class: type[Any], components: Components, **extra: Any) -> Any:
    """A diffusers SDXL pipeline on the same weights, with a DDIM scheduler of the config the model ships; `extra`:
    its control models."""
    if "add_watermarker" in inspect.signature(pipeline_class).parameters:  # the adapter pipeline has none
        extra["add_watermarker"] = False
    pipe = pipeline_class(
        vae=components.vae,
        text_encoder=components.text_encoder,
        text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2,
        unet=components.unet,
        scheduler=DDIMScheduler.from_config(SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=components.force_zeros_for_empty_prompt,
        **extra,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_fixture_is_shaped_as_sdxl(sdxl: Components) -> None:
    assert sdxl.is_sdxl and sdxl.force_zeros_for_empty_prompt
    assert sdxl.text_encoder_2 is not None and sdxl.tokenizer_2 is not None
    assert sdxl.text_encoder.config.hidden_size != sdxl.text_encoder_2.config.hidden_size
    assert sdxl.unet.config.cross_attention_dim == sum(SDXL_WIDTHS)
    assert sdxl.unet.config.addition_embed_type == "text_time"
    time_dim = sdxl.unet.config.addition_time_embed_dim
    assert sdxl.unet.config.projection_class_embeddings_input_dim == 6 * time_dim + SDXL_PROJECTION
    assert (sdxl.vae_scale, sdxl.native_size) == (8, SIZE)


def test_a_saved_sdxl_folder_loads_with_both_encoders(sdxl: Components, tmp_path: Path) -> None:
    """The worker loads `text_encoder_2` (with its projection) and `tokenizer_2`, reads `force_zeros_for_empty_prompt`
    from the folder's index, counts the second encoder in the model's bytes, and makes the fixture's image."""
    folder = save_folder(sdxl, tmp_path / "sdxl")
    loaded = load_components(folder, DevicePolicy(torch.device("cpu"), torch.float32, "sdpa"))
    assert isinstance(loaded.text_encoder_2, CLIPTextModelWithProjection) and loaded.tokenizer_2 is not None
    assert loaded.tokenizer_2.pad_token == "!" and loaded.force_zeros_for_empty_prompt
    parts = [loaded.unet, loaded.vae, loaded.text_encoder, loaded.text_encoder_2]
    assert model_bytes(loaded) == sum(tensor_bytes([*m.parameters(), *m.buffers()]) for m in parts)
    params = text_to_image.Params(PROMPT, steps=2)
    ours = text_to_image.run(loaded, params, generator=gen(1)).images[0]
    assert np.array_equal(pixels(ours), pixels(text_to_image.run(sdxl, params, generator=gen(1)).images[0]))
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    assert load_components(
        folder, DevicePolicy(torch.device("cpu"), torch.float32, "sdpa")
    ).force_zeros_for_empty_prompt


def test_the_conditioning_is_both_encoders_and_the_pooled_projection(sdxl: Components) -> None:
    cond, uncond, added = encode_guided(sdxl, [PROMPT], [""], SIZE, 48)
    assert cond.shape == (1, 77, sum(SDXL_WIDTHS)) and torch.count_nonzero(uncond) == 0  # force_zeros, empty
    assert added is not None
    latents = torch.zeros(2, 4, 6, 8)
    kwargs = added(latents, 1, torch.cat([uncond, cond]), True)["added_cond_kwargs"]
    assert kwargs["text_embeds"].shape == (2, SDXL_PROJECTION) and torch.count_nonzero(kwargs["text_embeds"][0]) == 0
    assert kwargs["time_ids"].tolist() == [[SIZE, 48, 0, 0, SIZE, 48]] * 2
    _, negative, _ = encode_guided(sdxl, [PROMPT], ["blurry"], SIZE, SIZE)
    assert torch.count_nonzero(negative) > 0


@pytest.mark.parametrize(("negative", "stock_negative"), [("", None), ("blurry, dark", "blurry, dark")])
def test_text_to_image_matches_the_stock_sdxl_pipeline(sdxl: Components, negative: str, stock_negative: Any) -> None:
    """Same weights, seed, prompt and DDIM scheduler: ours equals StableDiffusionXLPipeline within 1/255, with an
    empty negative prompt (zeros, SDXL's `force_zeros_for_empty_prompt`) and a given one. Encoding the empty
    negative prompt instead (the flag ignored) gives another image."""
    params = text_to_image.Params(PROMPT, negative_prompt=negative, steps=5, guidance_scale=5.0)
    ours = text_to_image.run(sdxl, params, generator=gen(3)).images[0]
    theirs = stock_xl(StableDiffusionXLPipeline, sdxl)(
        PROMPT, negative_prompt=stock_negative, height=SIZE, width=SIZE, num_inference_steps=5, guidance_scale=5.0,
        latents=torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=gen(3)),
    ).images[0]  # fmt: skip
    assert ours.size == (SIZE, SIZE)
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1
    if not negative:
        misread = dataclasses.replace(sdxl, force_zeros_for_empty_prompt=False)
        other = text_to_image.run(misread, params, generator=gen(3)).images[0]
        assert np.abs(pixels(other) - pixels(theirs)).max() > 8


def test_sdedit_matches_the_stock_sdxl_img2img_pipeline(sdxl: Components, image: Image.Image) -> None:
    """Our SDEdit equals StableDiffusionXLImg2ImgPipeline given the same encoded image (the pipeline samples the
    VAE's posterior, we take its mean), the same noise draw and strength, within 1/255."""
    params = sdedit.Params(PROMPT, strength=0.6, steps=10, guidance_scale=5.0)
    ours = sdedit.run(sdxl, params, {"image": image}, generator=gen(5)).images[0]
    with torch.no_grad():
        clean = encode(sdxl.vae, images_to_tensor([image]))
    theirs = stock_xl(StableDiffusionXLImg2ImgPipeline, sdxl)(
        PROMPT, image=clean, strength=params.strength, num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale, generator=gen(5),
    ).images[0]  # fmt: skip
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1
    far = sdedit.run(sdxl, dataclasses.replace(params, strength=1.0), {"image": image}, generator=gen(5)).images[0]
    assert np.abs(pixels(far) - pixels(theirs)).max() > 8  # the comparison can fail


def test_region_edit_over_the_whole_image_is_sdedit(sdxl: Components, image: Image.Image) -> None:
    """With the whole image as the region, the dense region edit is SDEdit exactly (the same noise, steps and
    conditioning, so SDXL's reaches it as it reaches the SDEdit checked against diffusers above). The sparse pass is
    not compared: it normalises with the original's statistics, as SIGE does, so it differs over a whole image."""
    everything = Image.new("L", image.size, 255)
    reference = sdedit.run(sdxl, sdedit.Params(PROMPT, strength=0.75, steps=4), {"image": image}, generator=gen(2))
    params = region_edit.Params(PROMPT, strength=0.75, steps=4, sparse=False, dilation=0)
    out = region_edit.run(sdxl, params, {"image": image, "mask": everything}, generator=gen(2))
    assert np.array_equal(pixels(out.images[0]), pixels(reference.images[0]))


@pytest.mark.parametrize("sparse", [False, True])
def test_region_edit_keeps_the_outside_exactly(sdxl: Components, image: Image.Image, sparse: bool) -> None:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[: SIZE // 2, : SIZE // 2] = 255
    params = region_edit.Params(prompt=PROMPT, strength=0.8, steps=4, sparse=sparse, dilation=0)
    out = region_edit.run(sdxl, params, {"image": image, "mask": Image.fromarray(mask)}, generator=gen(0))
    region = np.asarray(out.extra_images["region"]) > 0
    assert np.array_equal(pixels(out.images[0])[~region], pixels(image)[~region])
    assert np.abs(pixels(out.images[0])[region] - pixels(image)[region]).mean() > 5


def lora_adapter(components: Components, seed: int) -> Adapter:
    """A random LoRA on the UNet's attention and both text encoders' attention, in diffusers' key layout."""
    generator = gen(seed)
    tensors: dict[str, torch.Tensor] = {}
    targets = {
        "unet": (components.unet, lora.UNET_TARGETS),
        "text_encoder": (components.text_encoder, lora.TEXT_ENCODER_TARGETS),
        "text_encoder_2": (components.text_encoder_2, lora.TEXT_ENCODER_TARGETS),
    }
    for prefix, (model, names) in targets.items():
        assert model is not None
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(names):
                tensors[f"{prefix}.{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=generator)
                tensors[f"{prefix}.{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=generator)
    return Adapter(type="lora", tensors=tensors, metadata={"tokens": "[]"})


def state(components: Components) -> dict[str, torch.Tensor]:
    modules = {"unet": components.unet, "te": components.text_encoder, "te2": components.text_encoder_2}
    return {f"{k}.{n}": t.clone() for k, m in modules.items() if m is not None for n, t in m.state_dict().items()}


def test_lora_on_the_unet_and_both_text_encoders_applies_and_comes_off(sdxl: Components) -> None:
    """A LoRA touching each of SDXL's three networks changes each one's output while installed; afterwards the
    model is bit for bit as before. Only the second encoder's part also moves its pooled output."""
    adapter = lora_adapter(sdxl, seed=1)
    assert sdxl.text_encoder_2 is not None
    before = state(sdxl)
    plain = encode_guided(sdxl, [PROMPT], [""], SIZE, SIZE)
    params = text_to_image.Params(PROMPT, steps=2)
    base_image = text_to_image.run(sdxl, params, generator=gen(0)).images[0]
    with applied(sdxl, [(adapter, 1.0)]):
        assert "peft_config" in vars(sdxl.text_encoder_2)
        lifted = encode_guided(sdxl, [PROMPT], [""], SIZE, SIZE)
        lora_image = text_to_image.run(sdxl, params, generator=gen(0)).images[0]
    width = SDXL_WIDTHS[0]
    assert not torch.allclose(plain.cond[..., :width], lifted.cond[..., :width])  # encoder 1
    assert not torch.allclose(plain.cond[..., width:], lifted.cond[..., width:])  # encoder 2
    assert np.abs(pixels(lora_image) - pixels(base_image)).max() > 8
    after = state(sdxl)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert "peft_config" not in vars(sdxl.text_encoder_2)


def sdxl_embedding(token: str, count: int, seed: int) -> Adapter:
    generator = gen(seed)
    tensors = {"clip_l": torch.randn(count, SDXL_WIDTHS[0], generator=generator),
               "clip_g": torch.randn(count, SDXL_WIDTHS[1], generator=generator)}  # fmt: skip
    return Adapter(type="textual-inversion", tensors=tensors, metadata={"tokens": tokens_metadata([token])})


@pytest.mark.parametrize("count", [1, 2])
def test_an_sdxl_embedding_adds_its_token_to_both_encoders(sdxl: Components, count: int) -> None:
    """The token's vectors reach each encoder (clip_l the first, clip_g the second): the prompt's states change in
    both halves, and each half equals what that encoder gives for its own vectors; then the token is gone."""
    adapter = sdxl_embedding("<sdxl-cat>", count, seed=4)
    prompt = "a photo of <sdxl-cat>"
    assert sdxl.text_encoder_2 is not None and sdxl.tokenizer_2 is not None
    tokenizers = (sdxl.tokenizer, sdxl.tokenizer_2)
    plain = encode_guided(sdxl, [prompt], [""], SIZE, SIZE).cond
    with applied(sdxl, [(adapter, 1.0)]):
        assert sdxl.tokenizer is not tokenizers[0] and sdxl.tokenizer_2 is not tokenizers[1]
        for tokenizer, encoder, key in ((sdxl.tokenizer, sdxl.text_encoder, "clip_l"),
                                        (sdxl.tokenizer_2, sdxl.text_encoder_2, "clip_g")):  # fmt: skip
            ids = tokenizer.convert_tokens_to_ids(ti.sub_tokens("<sdxl-cat>", count))
            assert [i for i in tokenizer(prompt).input_ids if i in ids] == ids  # the prompt calls every vector
            assert torch.equal(encoder.get_input_embeddings().weight[ids], adapter.tensors[key])
        with_token = encode_guided(sdxl, [prompt], [""], SIZE, SIZE).cond
    width = SDXL_WIDTHS[0]
    assert not torch.allclose(plain[..., :width], with_token[..., :width])
    assert not torch.allclose(plain[..., width:], with_token[..., width:])
    assert (sdxl.tokenizer, sdxl.tokenizer_2) == tokenizers
    assert "<sdxl-cat>" not in sdxl.tokenizer_2.get_vocab()


def test_embeddings_of_the_wrong_family_are_refused(sdxl: Components) -> None:
    one_encoder = Adapter(type="textual-inversion", tensors={"<c>": torch.zeros(1, SDXL_WIDTHS[0])},
                          metadata={"tokens": tokens_metadata(["<c>"])})  # fmt: skip
    with pytest.raises(ValueError, match="holds tensors clip_l and clip_g"), applied(sdxl, [(one_encoder, 1.0)]):
        pass
    with (
        pytest.raises(ValueError, match="needs an SDXL model"),
        applied(sd1_components(), [(sdxl_embedding("<c>", 1, 0), 1.0)]),
    ):
        pass


def test_an_adapter_control_composes_with_the_added_conditioning(sdxl: Components) -> None:
    """A T2I-Adapter's residuals travel beside SDXL's added conditioning (`combined`): the run changes the image,
    and two inputs that set the same UNet argument are an error, not an override."""
    torch.manual_seed(6)
    channels = [*sdxl.unet.config.block_out_channels, sdxl.unet.config.block_out_channels[-1]]
    adapter = T2IAdapter(3, channels, num_res_blocks=1, downscale_factor=16, adapter_type="full_adapter_xl").eval()
    condition = torch.rand(1, 3, SIZE, SIZE, generator=gen(1))
    params = text_to_image.Params(PROMPT, steps=2)
    plain = text_to_image.run(sdxl, params, generator=gen(0)).images[0]
    inputs = {"t2i_adapters": [AdapterControl(adapter, condition, 1.0)]}
    steered = text_to_image.run(sdxl, params, inputs, generator=gen(0)).images[0]
    assert np.abs(pixels(steered) - pixels(plain)).max() > 8

    def one(*_: Any) -> dict[str, Any]:
        return {"added_cond_kwargs": {}}

    both = combined(one, one)
    assert both is not None
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        both(torch.zeros(1), 1, torch.zeros(1), False)
