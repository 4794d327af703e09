"""The pipeline side of image edits, called by `vqdm.server.runner.run_batch`: the SDXL img2img /
inpaint pipeline built on the served pipeline's own components, and the paste-back of the source
outside the mask. (The HTTP side is `vqdm.server.edits`.)"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

DEFAULT_STRENGTH = {"img2img": 0.75, "inpaint": 1.0}


@dataclass(eq=False)
class EditInput:
    """The pixels of one edit request, already at the output size."""

    image: Any  # PIL RGB [width x height]
    mask: Any | None  # PIL L, 255 = repaint, 0 = keep (soft at the edge with A1111's mask_blur); None: img2img
    strength: float
    # Where the generated picture goes (vqdm.server.a1111_inpaint.Overlay: A1111's "only masked", or its
    # "fill", whose `image` is not the source); None: pasted onto `image` through `mask`.
    overlay: Any | None = None
    # A1111's masked content 2 "latent noise" / 3 "latent nothing": what the masked latents the sampler
    # starts from are replaced by; None: the encoded image's own (diffusers' inpainting).
    latent_fill: int | None = None

    @property
    def kind(self) -> str:
        return "img2img" if self.mask is None else "inpaint"

    @property
    def pixels(self) -> int:
        """Pixels held while queued: the pipeline's input and the picture the result is pasted into."""
        w, h = self.image.size
        return w * h + (self.overlay.source.width * self.overlay.source.height if self.overlay is not None else 0)

    def batch_key(self) -> tuple:
        return (self.kind, self.strength, self.latent_fill is not None)


def mask_from(img, transparent_repaints: bool = True):
    """255 where the image is to be repainted: if it has transparency, its transparent pixels (OpenAI's
    rule) or, with `transparent_repaints` false, its opaque ones (AUTOMATIC1111's); else light ones."""
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        alpha = img.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha.point(lambda a: 255 if (a < 128) == transparent_repaints else 0)
    return img.convert("L").point(lambda v: 255 if v >= 128 else 0)


def paste_back(generated, edit: EditInput):
    """Inpainting: the source outside the mask, the generated pixels inside it (where the overlay says)."""
    if edit.mask is None:
        return generated
    if edit.overlay is not None:
        return edit.overlay.paste(generated)
    return Image.composite(generated.convert("RGB"), edit.image, edit.mask)


def edit_call(pipe, call: dict, edits: list[EditInput]):
    """(pipeline, kwargs) for a batch of edits sharing kind and strength; one EditInput per image row."""
    # Deferred: diffusers takes seconds to import; by the first edit the model loading has imported it.
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    first = edits[0]
    components = dict(pipe.components)  # the same module objects: nothing is copied
    call = {**call, "image": [e.image for e in edits], "strength": first.strength}
    if first.mask is None:
        edit_pipe = StableDiffusionXLImg2ImgPipeline(**components)
        call.pop("height"), call.pop("width")  # img2img takes the size from the image
    else:
        edit_pipe = StableDiffusionXLInpaintPipeline(**components)
        call["mask_image"] = [e.mask for e in edits]
        if first.latent_fill is not None:
            call["image"] = _filled_latents(edit_pipe, call, edits)
    edit_pipe.set_progress_bar_config(disable=True)
    return edit_pipe, call


def latent_fill(latents, mask, fill: int, noise):
    """A1111's latent fills on a batch of image latents [B, C, h, w]: where `mask` [B, 1, h, w] (0 or
    1) is set, 2 puts `noise` and 3 zeros; elsewhere the latents stay."""
    if fill not in (2, 3):
        raise ValueError(f"latent fill {fill}: 2 (latent noise) or 3 (latent nothing)")
    kept = latents * (1 - mask)
    return kept + noise * mask if fill == 2 else kept


def _filled_latents(pipe, call: dict, edits: list[EditInput]):
    """The rows' images encoded as diffusers' inpainting would (the same VAE sample from each row's
    generator, so the rest of the call draws what it would have), their masked latents refilled;
    the pipeline takes latents for `image` as they are. "Latent noise" is the noise the sampler is
    about to draw from the row's generator, as in A1111, where both come from the seed."""
    import torch
    import torch.nn.functional as F

    generators = call["generator"]
    pixels = pipe.image_processor.preprocess(call["image"], height=call["height"], width=call["width"])
    latents = pipe._encode_vae_image(pixels.to(pipe.vae.device, pipe.vae.dtype), generator=generators)
    masks = pipe.mask_processor.preprocess(call["mask_image"], height=call["height"], width=call["width"])
    masks = F.interpolate(masks, size=latents.shape[-2:]).to(latents.device, latents.dtype)  # as the pipeline does
    rows = []
    for r, edit in enumerate(edits):
        ahead = torch.Generator(generators[r].device).set_state(generators[r].get_state())
        noise = torch.randn((1, *latents.shape[1:]), generator=ahead, device=generators[r].device,
                            dtype=latents.dtype).to(latents.device)
        rows.append(latent_fill(latents[r:r + 1], masks[r:r + 1], edit.latent_fill, noise))
    return torch.cat(rows)
