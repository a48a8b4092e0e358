"""Each image through a grid model's image processor once per run (Qwen2/2.5/3-VL, Qwen3.5).

Without it the Qwen image processor (resize, rescale, normalise, patchify) ran two or three times on
every image of a run: in the vision pre-pass (`vision_prepass.image_inputs`) for the tower, then in
the image's training row (trl's collator) and prediction prompt (`encode.Encoder`), which need only
the image's patch grid (`image_grid_thw`) to expand its image tokens: the tower reads the pixels the
Encoder keeps by image (`Encoder.pixels`), or none once the image's features are cached. In a 2-fold
CPU run of the tiny Qwen2.5-VL on the demo's 300 images (200 train, 100 test; 2 cores) every image went
through it 2 or 3 times; with the memo once, and the run's encode phase took 1.2 s instead of 2.2 s.

`PixelMemo` stands in for the image processor inside the Encoder's row encodings (`with_memo`: a
copy of the processor, so the run's own processor, and the plain collator whose pixels go straight to
the model, never see it). It keeps each image's grid by (image key, call keywords) and no pixels: one
(1, 3) integer tensor an image. An image whose grid it knows and whose pixels the caller will not read
(`spare(key)`: the Encoder keeps them already, or the image's features are cached) gets NaN rows in
place of its pixel rows, as many as the real call gives; every other image of the call goes through
one call of the real image processor. The result has the real call's keys, dtypes, shapes and order
(tests/test_pixel_memo.py). The NaN rows are never read: the Encoder keeps no pixels of an image it
keeps already or has let go (`Encoder._keep_pixels`), and NaN would make any other use loud.

An image processor that gives more than pixel_values and image_grid_thw (LLaVA, SmolVLM, Gemma 3 and
4) is recognised at the first call, which, like every later one, reaches it unchanged. The Encoder
makes a memo only for a run with a feature cache (`RunCaches.for_run`; not with speed.vision_cache=off).
"""

from __future__ import annotations

import copy
import sys
import threading
from collections.abc import Callable

import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import make_flat_list_of_images

_GRID_KEYS = {"pixel_values", "image_grid_thw"}


class PixelMemo:
    """The processor's image processor, each image computed at most once per setting where its pixels
    are not needed again (module docstring). `key_of`: the Encoder's image key (`Encoder.key`);
    `spare(key)`: True when no pixels of that image are needed from this call. Counts: `calls` of the
    real image processor, `computed` images they took, `hits` images answered from the memo."""

    def __init__(self, image_processor, key_of: Callable[[Image.Image], str], spare: Callable[[str], bool]):
        self.image_processor = image_processor
        self._key_of, self._spare = key_of, spare
        self._grids: dict[tuple[str, str], torch.Tensor] = {}  # (image key, keywords) -> (1, 3) grid
        self._rows: dict[str, tuple[int, torch.dtype]] = {}  # keywords -> pixel row width, dtype
        self.grid_model: bool | None = None  # unknown until the first call
        self.calls = self.computed = self.hits = 0
        self._count = threading.Lock()

    def __getattr__(self, name: str):
        # merge_size, fetch_images, size, ...: what processors read from their image processor
        try:
            real = self.__dict__["image_processor"]
        except KeyError:
            raise AttributeError(name) from None
        return getattr(real, name)

    def __call__(self, images, **kwargs) -> BatchFeature:
        """What `image_processor(images, **kwargs)` returns, computing only the images that need it."""
        flat, sig = self._flat(images, kwargs)
        if flat is None:
            return self.image_processor(images, **kwargs)
        keys = [self._key_of(im) for im in flat]
        todo = [i for i, k in enumerate(keys) if (k, sig) not in self._grids or not self._spare(k)]
        if len(todo) == len(flat):  # e.g. the run's first row: the real call as the processor made it
            return self._remember(self._real(images, kwargs, len(flat)), keys, sig)
        self.hits += len(flat) - len(todo)
        fresh: dict[int, torch.Tensor] = {}
        if todo:
            out = self._real([flat[i] for i in todo], kwargs, len(todo))
            out = self._remember(out, [keys[i] for i in todo], sig)
            fresh = dict(zip(todo, out["pixel_values"].split(_patches(out["image_grid_thw"])), strict=True))
        width, dtype = self._rows[sig]
        grids = torch.cat([self._grids[k, sig] for k in keys])
        # One NaN row per patch (1,024 rows of 1,176 for a 448 px Qwen2.5-VL image): an expanded
        # scalar, materialised only when the call computes another image too
        nan = torch.full((1, width), float("nan"), dtype=dtype)
        if not fresh:  # every image answered (a batch of prompts, `Encoder.prompt_rows`): one view
            pixels = nan.expand(sum(_patches(grids)), width)
        else:
            rows = [fresh[i] if i in fresh else nan.expand(n, width) for i, n in enumerate(_patches(grids))]
            pixels = rows[0] if len(rows) == 1 else torch.cat(rows)
        return BatchFeature(data={"pixel_values": pixels, "image_grid_thw": grids}, tensor_type="pt")

    def fresh(self, images: list[Image.Image], **kwargs) -> BatchFeature:
        """The real image processor on every image of `images`, their grids remembered: for a caller that
        reads the pixels (the vision pre-pass feeds them to the tower), so later rows find the images."""
        flat, sig = self._flat(images, kwargs)
        if flat is None:
            return self.image_processor(images, **kwargs)
        return self._remember(self._real(images, kwargs, len(flat)), [self._key_of(im) for im in flat], sig)

    def _flat(self, images, kwargs: dict) -> tuple[list[Image.Image] | None, str]:
        """The call's images in the order the image processor lays out their rows, and its keywords as
        one string; None for a call the memo leaves alone: not a grid model, images that are not PIL
        images (arrays, tensors), results other than torch tensors asked for."""
        if self.grid_model is False or kwargs.get("return_tensors") != "pt":
            return None, ""
        try:
            flat = make_flat_list_of_images(images)
        except ValueError:
            return None, ""
        if not all(isinstance(im, Image.Image) for im in flat):
            return None, ""
        # e.g. "[('return_tensors', 'pt')]": another keyword or value (size, do_resize) is another setting;
        # interned, so the memo's keys share one string per setting
        return flat, sys.intern(repr(sorted(kwargs.items())))

    def _real(self, images, kwargs: dict, n: int) -> BatchFeature:
        with self._count:  # the pre-pass calls `fresh` from several threads at once
            self.calls += 1
            self.computed += n
        return self.image_processor(images, **kwargs)

    def _remember(self, out: BatchFeature, keys: list[str], sig: str) -> BatchFeature:
        if self.grid_model is None:
            self.grid_model = set(out.keys()) == _GRID_KEYS
        if not self.grid_model:
            return out
        grid, pixels = out["image_grid_thw"], out["pixel_values"]
        if len(grid) != len(keys) or sum(_patches(grid)) != len(pixels):
            raise ValueError(f"{len(keys)} images gave {len(grid)} grids and {len(pixels)} pixel rows")
        self._rows[sig] = (pixels.shape[1], pixels.dtype)
        for k, g in zip(keys, grid, strict=True):
            self._grids[k, sig] = g[None].clone()
        return out


def _patches(grid: torch.Tensor) -> list[int]:
    """Pixel rows per image of an (images, 3) grid, e.g. [[1, 32, 32]] -> [1024]."""
    return grid.prod(-1).tolist()


def with_memo(processor, memo: PixelMemo):
    """A shallow copy of `processor` whose image processor is `memo`: its tokenizer, chat template and
    settings are the processor's own objects; `processor` itself is left as it is."""
    twin = copy.copy(processor)
    twin.image_processor = memo
    return twin
