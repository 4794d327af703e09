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

    @property
    def kind(self) -> str:
        return "img2img" if self.mask is None else "inpaint"

    @property
    def pixels(self) -> int:
        """Pixels held while queued: the pipeline's input and the picture the result is pasted into."""
        w, h = self.image.size
        return w * h + (self.overlay.source.width * self.overlay.source.height if self.overlay is not None else 0)

    def batch_key(self) -> tuple:
        return (self.kind, self.strength)


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
    edit_pipe.set_progress_bar_config(disable=True)
    return edit_pipe, call
