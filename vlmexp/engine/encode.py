"""Each sample through the processor once, batches by padding: the CPU work leaves the training step.

trl's collator runs the processor on every batch: PNG decode (images live in the `datasets` table as
PNG), resize, normalise and patchify, then tokenise: ~200 ms for 8 images of 448 px on 2 CPU cores
(measured on this project's CPU machines; on the H200 machine's 16 cores it kept up with the GPU and
the gain was within noise, docs/performance.md). `Encoder` runs the same collator (or, for prompts,
the same processor call) on one row at a time, keeps the result by the row's content, and builds
batches by padding those rows: the same tensors a batched call gives (tests/test_engine_encode.py),
and every later epoch, fold and prediction of the run reuses them.

Image pixels are kept once per image, by content hash (`image_key`), so a training row, the same
image's prediction prompt and its cached vision features (`vision_cache.VisionFeatureCache`) share
one key. With `memo` (the run has a feature cache) a grid model's image processor runs once per image
(`pixel_memo.PixelMemo`): the vision pre-pass and the image's rows share one computation.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Callable

import torch
from PIL import Image

from vlmexp.engine.batching import _PAD, _tokens, append_ids, pad_rows, rope_index_fn, trl_collator
from vlmexp.engine.pixel_memo import PixelMemo, with_memo
from vlmexp.engine.samples import split_turn
from vlmexp.engine.vision_cache import is_gemma3
from vlmexp.models.parts import unwrap
from vlmexp.timing import phase


def image_key(img: Image.Image) -> str:
    """Content hash of a decoded image, e.g. 'RGB448x448:3f2a…': equal pixels, equal key."""
    h = hashlib.blake2b(img.tobytes(), digest_size=16).hexdigest()
    return f"{img.mode}{img.width}x{img.height}:{h}"


class _KeyMemo:
    """`image_key` per image object, computed once: hashing a 448 px image takes ~0.6 ms, and the test
    set's images are keyed again in every fold. Held by id with a weak reference, so a freed image's
    id reused by a new image is recognised as a different image."""

    def __init__(self):
        self._by_id: dict[int, tuple[weakref.ref, str]] = {}

    def __call__(self, img: Image.Image) -> str:
        hit = self._by_id.get(id(img))
        if hit is not None and hit[0]() is img:
            return hit[1]
        key = image_key(img)
        self._by_id[id(img)] = (weakref.ref(img), key)
        return key


class Encoder:
    """Processor outputs of single rows, kept for the whole run (every fold and epoch). `memo`: rows
    take each image's grid from a `PixelMemo`, which the vision pre-pass fills (`image_inputs`)."""

    def __init__(self, processor, max_length: int, memo: bool = False):
        self.processor = processor
        self.pad_id = processor.tokenizer.pad_token_id or 0
        # The training layout is trl's own: its collator on a batch of one row. `collator` stays the
        # plain one: RowCollator's fallback batches feed its pixels to the model as they are.
        self.collator = trl_collator(processor, max_length)
        self.memo: PixelMemo | None = None
        self._row_processor, self._row_collator = processor, self.collator
        if memo and getattr(processor, "image_processor", None) is not None:
            self.memo = PixelMemo(processor.image_processor, self.key, self._spare)
            self._row_processor = with_memo(processor, self.memo)
            self._row_collator = trl_collator(self._row_processor, max_length)
        self._rope = None  # see bind()
        self.pixel_dtype: torch.dtype | None = None
        self._rows: dict[tuple, dict] = {}
        self._key = _KeyMemo()
        self._turns: dict[str, object] = {}  # messages (JSON) -> samples.Turn
        self._ids: dict[str, list[int]] = {}  # completion text -> token ids
        self.pixels: dict[str, torch.Tensor] = {}  # image key -> its rows of pixel_values (grid models)
        self._forgotten: set[str] = set()  # keys whose features are cached: their pixels are never read
        self.per_image = False  # see bind(): Gemma 3's pixels kept by image, as a grid model's are
        self.hits = self.misses = 0

    def bind(self, model) -> None:
        """Take the model's M-RoPE builder and pixel dtype (held weakly: a fold's model can be freed).

        Qwen-VL's 3D positions are then computed here, once per row on the CPU, instead of in every
        forward (transformers builds them in a Python loop per sample, with a device sync each). Pixels
        are kept in the vision tower's dtype, which it casts them to first anyway: bf16 halves their
        memory (448 px: 2.4 MB an image instead of 4.8) and changes nothing. Gemma 3's pixels (one
        fixed-size crop per image, 896 px: 9.6 MB in fp32) are kept by image too, in its SigLIP tower's
        dtype (which casts them first as well), so a batch can leave out the images whose features are
        cached and their pixels can be let go (`forget_pixels`)."""
        fn = rope_index_fn(model)
        self._rope = weakref.WeakMethod(fn) if fn is not None else None
        core = getattr(unwrap(model), "model", None)
        visual = getattr(core, "visual", None)
        if is_gemma3(model) and not self._rows:  # rows encoded before keep their layout
            self.per_image = True
            visual = core.vision_tower
        if visual is not None and self.pixel_dtype is None and visual.dtype.is_floating_point:
            self.pixel_dtype = visual.dtype

    def key(self, img: Image.Image) -> str:
        """`image_key(img)`, computed once per image object (the vision pre-pass keys the fold's images
        first, training and prediction then find them here)."""
        return self._key(img)

    @property
    def rope_fn(self):
        return self._rope() if self._rope is not None else None

    def turn(self, messages: list[dict]):
        """`samples.split_turn` of `messages`, rendered once (two chat-template renders a call)."""
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        if key not in self._turns:
            self._turns[key] = split_turn(self.processor, messages)
        return self._turns[key]

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text on its own (as trl tokenises completions), each text tokenised once."""
        todo = sorted({t for t in texts if t not in self._ids})
        if todo:
            ids = self.processor.tokenizer(todo, add_special_tokens=False)["input_ids"]
            self._ids.update(zip(todo, ids, strict=True))
        return [self._ids[t] for t in texts]

    # -- rows ------------------------------------------------------------------------------------
    def train_row(self, example: dict) -> dict:
        """One {"prompt", "completion", "images"} row as trl's collator lays it out (no batch dim)."""
        keys = [self._key(im) for im in example["images"]]
        key = ("train", example["prompt"], example["completion"], *keys)
        if key not in self._rows:
            with phase("encode"):
                batch = self._row_collator([dict(example, images=list(example["images"]))])
                self._rows[key] = self._keep(batch, keys)
            self.misses += 1
        else:
            self.hits += 1
        return self._rows[key]

    def prompt_row(self, prompt: str, images: list, extra: list[int] | None = None) -> dict:
        """One prediction prompt as the processor encodes it, with `extra` token ids appended
        (e.g. the ids all candidate labels share, see `predict.score_completions`)."""
        keys = [self._key(im) for im in images]
        key = ("prompt", prompt, tuple(extra or ()), *keys)
        if key not in self._rows:
            with phase("encode"):
                enc = dict(
                    self._row_processor(
                        text=[prompt],
                        images=[list(images)] if images else None,
                        return_tensors="pt",
                        add_special_tokens=False,
                    )
                )
                if extra:
                    enc |= {k: v[None] for k, v in append_ids(_tokens(enc, 0), extra).items()}
                self._rows[key] = self._keep(enc, keys)
            self.misses += 1
        else:
            self.hits += 1
        return self._rows[key]

    def prompt_rows(self, prompts: list[str], images: list[list], extras: list[list[int]]) -> list[dict]:
        """`prompt_row` of each (prompt, images, extra), the rows not encoded yet in ONE processor call
        (one tokenizer batch, one image processor call) where every such row has images of a grid model
        (Qwen-VL); per row otherwise. A call per row cost ~3-5 ms of the processor's own bookkeeping, on
        the host while the GPU scores the previous batch (run AL: 224 new prompts, ~1 s)."""
        keyed = [
            ("prompt", p, tuple(x or ()), *(self._key(im) for im in ims))
            for p, ims, x in zip(prompts, images, extras, strict=True)
        ]
        new: dict[tuple, int] = {}  # rows not encoded yet, by key -> first position
        for i, k in enumerate(keyed):
            if k not in self._rows and k not in new:
                new[k] = i
        done: set[tuple] = set()
        if self.memo is not None and self.memo.grid_model is None and new:
            # the memo learns from its first call whether this is a grid model: that row on its own
            k, i = next(iter(new.items()))
            del new[k]
            self.prompt_row(prompts[i], images[i], extras[i])
            done.add(k)
        grid = self.memo is not None and self.memo.grid_model
        if grid and len(new) > 1 and all(images[i] for i in new.values()):
            with phase("encode"):
                done |= self._encode_prompts(
                    [prompts[i] for i in new.values()], [images[i] for i in new.values()], list(new)
                )
        rows = []
        for p, ims, x, k in zip(prompts, images, extras, keyed, strict=True):
            if k in done:  # encoded just now, counted as a miss there
                done.discard(k)
                rows.append(self._rows[k])
            else:
                rows.append(self.prompt_row(p, ims, x))
        return rows

    def _encode_prompts(self, prompts: list[str], images: list[list], keys: list[tuple]) -> set[tuple]:
        """Rows of `prompts` from one left-padded processor call, each cut to its real tokens, with its
        images' grids and pixel rows, as `prompt_row` keeps a call of its own (tests/test_engine_encode.py).
        A processor output with other media (not a grid model after all) is left to `prompt_row`."""
        enc = dict(
            self._row_processor(
                text=prompts,
                images=[list(ims) for ims in images],
                padding=True,
                padding_side="left",
                return_tensors="pt",
                add_special_tokens=False,
            )
        )
        grid = enc.get("image_grid_thw")
        if grid is None or set(enc) - {"input_ids", "pixel_values", "image_grid_thw", *_PAD}:
            return set()
        pixels = enc["pixel_values"].split(grid.prod(-1).tolist())
        at = 0
        for b, key in enumerate(keys):
            n = len(images[b])
            row = {k: v[None] for k, v in _tokens(enc, b).items()}
            # one image: its rows as they are (NaN stand-ins from the memo stay an unmaterialised view)
            pix = pixels[at] if n == 1 else torch.cat(pixels[at : at + n])
            row |= {"image_grid_thw": grid[at : at + n], "pixel_values": pix}
            extra = list(key[2])
            if extra:
                row |= {k: v[None] for k, v in append_ids(_tokens(row, 0), extra).items()}
            self._rows[key] = self._keep(row, list(key[3:]))
            self.misses += 1
            at += n
        return set(keys)

    def _keep(self, batch: dict, keys: list[str]) -> dict:
        row = {k: v[0] for k, v in batch.items() if k == "input_ids" or k in _PAD}
        row["image_keys"] = keys
        grid = batch.get("image_grid_thw")
        if grid is not None:  # Qwen-VL: pixel rows per image, split by each image's patch count
            row["image_grid_thw"] = grid
            self._keep_pixels(keys, batch["pixel_values"].split(grid.prod(-1).tolist()))
        elif self.per_image and keys and len(batch.get("pixel_values", ())) == len(keys):
            # Gemma 3: one crop per image (no pan-and-scan), kept by image like a grid model's patches
            row["per_image"] = True
            self._keep_pixels(keys, batch["pixel_values"].split(1))
            row["media"] = {
                k: v for k, v in batch.items() if k not in row and k not in ("labels", "pixel_values")
            }
        else:  # LLaVA, SmolVLM, Gemma 4: the row's media tensors as they are, batched by concatenation
            row["media"] = {k: v for k, v in batch.items() if k not in row and k != "labels"}
        rope = self.rope_fn
        if rope is not None and grid is not None and "mm_token_type_ids" in row:
            pos, _ = rope(
                input_ids=row["input_ids"][None],
                mm_token_type_ids=row["mm_token_type_ids"][None],
                image_grid_thw=grid,
                attention_mask=row["attention_mask"][None],
            )
            row["position_ids"] = pos[:, 0]  # (3, tokens)
        return row

    def _keep_pixels(self, keys: list[str], pixels) -> None:
        """Each image's pixels (`pixels` in `keys` order) in the tower's dtype, the first time it is seen.
        Not for an image let go (`forget_pixels`): its features are cached, so no batch reads its pixels
        (`pad_*` leave cached images out), and a row encoded after the pre-pass would otherwise keep
        them again (2.4 MB of bf16 an image at 448 px). With the memo such a row's pixel rows are NaN
        stand-ins (`PixelMemo`), which are therefore never kept either."""
        for k, pix in zip(keys, pixels, strict=True):
            if k not in self.pixels and k not in self._forgotten:
                self.pixels[k] = pix.to(self.pixel_dtype) if self.pixel_dtype else pix

    def _spare(self, key: str) -> bool:
        """Whether a row need not compute `key`'s pixels: kept already, or let go for good."""
        return key in self.pixels or key in self._forgotten

    def forget_pixels(self, keys) -> None:
        """Drop the pixels of images whose features are cached: the tower never needs them again in
        this run (1,000 images at 448 px hold 2.4 GB of bf16 pixels)."""
        for k in keys:
            self.pixels.pop(k, None)
            self._forgotten.add(k)

    # -- batches ---------------------------------------------------------------------------------
    def pad_train(
        self, rows: list[dict], skip_pixels: set[str] = frozenset(), multiple: int | Callable[[int], int] = 1
    ) -> dict:
        """Right-padded training batch of `rows`, like trl's collator on the same examples.
        Images whose keys are in `skip_pixels` (features already cached) get no pixel rows; the width
        is rounded up to `multiple` tokens (padding is masked and unsupervised: the loss is the same)."""
        return pad_rows(rows, self.pad_id, left=False, multiple=multiple) | self._media_batch(
            rows, skip_pixels
        )

    def pad_prompts(self, rows: list[dict], skip_pixels: set[str] = frozenset()) -> dict:
        """Left-padded prediction batch of `rows`, like the processor on the same prompts."""
        padded = pad_rows(rows, self.pad_id, left=True)
        return padded | self._media_batch(rows, skip_pixels)

    def _media_batch(self, rows: list[dict], skip_pixels: set[str]) -> dict:
        keys = [k for r in rows for k in r["image_keys"]]
        out: dict = {"image_keys": keys}
        if "image_grid_thw" in rows[0]:
            out["image_grid_thw"] = torch.cat([r["image_grid_thw"] for r in rows])
        if "image_grid_thw" in rows[0] or rows[0].get("per_image"):  # pixels kept by image (Gemma 3 too)
            # pixel_index: which images (positions in image_keys) have their patches in pixel_values
            out["pixel_index"] = [i for i, k in enumerate(keys) if k not in skip_pixels]
            if out["pixel_index"]:
                out["pixel_values"] = torch.cat([self.pixels[keys[i]] for i in out["pixel_index"]])
        for name in rows[0].get("media") or {}:  # grid rows carry none
            out[name] = torch.cat([r["media"][name] for r in rows])
        return out
