"""FLOPs a sample costs, counted from the config, and the GPU's bf16 peak.

Convention (stated in docs/performance.md): a multiply-add is 2 FLOPs; matrix products only (norms,
activations and softmax are noise at these sizes); LoRA adapters are ignored (r=16 adds ~1%).
Training counts the work any correct implementation must do:
- forward of every layer;
- backward of activations (dX = dY W^T, the forward's FLOPs again) through every layer upstream of a
  trainable parameter: the whole language model, and the vision tower only when it has adapters;
- no weight gradients for frozen base weights (that is what makes LoRA's backward ~1x, not 2x, forward);
- attention backward as 2x its forward (dQ, dK, dV, dP);
- lm_head only at the supervised (answer) positions: logits elsewhere are waste, so a path that computes
  them gets no credit. Pass `logits_positions` to count the issue's convention (all tokens) instead.
Gradient-checkpointing recomputation is not counted (MFU, not hardware FLOP utilisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Dense bf16 tensor-core rates from the vendor datasheets (SXM parts), TFLOP/s.
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


@dataclass
class FlopCount:
    vision_fwd: float  # per image
    language_fwd: float  # per sample, without lm_head
    lm_head_per_token: float
    vision_attn_fwd: float
    language_attn_fwd: float

    def train(self, answer_tokens: int, vision_trainable: bool, logits_positions: int | None = None) -> float:
        """Training FLOPs of one sample (see the module docstring)."""
        lin_v = self.vision_fwd - self.vision_attn_fwd
        lin_l = self.language_fwd - self.language_attn_fwd
        flops = lin_l * 2 + self.language_attn_fwd * 3
        flops += self.vision_fwd if not vision_trainable else lin_v * 2 + self.vision_attn_fwd * 3
        flops += (
            self.lm_head_per_token * 2 * (answer_tokens if logits_positions is None else logits_positions)
        )
        return flops

    def prefill(self) -> float:
        """Forward FLOPs of one image + prompt, logits of one position (prediction's shared work)."""
        return self.vision_fwd + self.language_fwd + self.lm_head_per_token


def count(config, text_tokens: int, grid_thw: tuple[int, int, int] | None = None) -> FlopCount:
    """FLOPs of one sample of `text_tokens` tokens (image tokens included) and one image: `grid_thw`
    patches (t, h, w) for a Qwen2-VL / Qwen2.5-VL / Qwen3-VL config; Gemma 3 resizes every image to its
    tower's fixed size, so it takes no grid."""
    if config.model_type == "gemma3":
        return _count_gemma3(config, text_tokens)
    if grid_thw is None:
        raise ValueError(f"{config.model_type}: flops.count needs the image's grid_thw")
    tc, vc = config.text_config, config.vision_config
    h, inter, layers = tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers
    kv = tc.num_key_value_heads * (h // tc.num_attention_heads)
    per_token = 2 * (h * h * 2 + h * kv * 2 + 3 * h * inter)  # q, o; k, v; gate, up, down
    # causal: QK^T and AV over half the (T x T) square on average
    lang_attn = layers * 2 * 2 * text_tokens * text_tokens * h / 2
    language = layers * per_token * text_tokens + lang_attn
    lm_head = 2 * h * tc.vocab_size

    t, gh, gw = grid_thw
    patches = t * gh * gw
    merge = vc.spatial_merge_size
    d = getattr(vc, "embed_dim", None) or vc.hidden_size  # Qwen2-VL: embed_dim; Qwen2.5-VL: hidden_size
    out = getattr(vc, "out_hidden_size", None) or vc.hidden_size
    deepstack = len(getattr(vc, "deepstack_visual_indexes", None) or ())
    if deepstack:
        mlp = 2 * d * vc.intermediate_size  # Qwen3-VL: linear_fc1/linear_fc2, not gated
    elif hasattr(vc, "intermediate_size") and getattr(vc, "out_hidden_size", None):
        mlp = 3 * d * vc.intermediate_size  # Qwen2.5-VL: gated SiLU MLP
    else:
        mlp = 2 * d * d * vc.mlp_ratio  # Qwen2-VL: fc1/fc2
    per_patch = 2 * (4 * d * d + mlp)  # qkv, proj; mlp
    patch_embed = 2 * patches * (vc.in_channels * vc.temporal_patch_size * vc.patch_size**2) * d
    full = patches  # one full-attention sequence per image
    window = (vc.window_size // vc.patch_size) ** 2 if hasattr(vc, "window_size") else full
    full_layers = set(getattr(vc, "fullatt_block_indexes", range(vc.depth)))
    vis_attn = sum(
        2 * 2 * patches * (full if i in full_layers else min(window, full)) * d for i in range(vc.depth)
    )
    merged = patches // merge**2
    # Qwen3-VL runs one more merger per deepstack level (3 in the 8B) on the same patches
    merger = (1 + deepstack) * 2 * merged * (d * merge**2) * (d * merge**2 + out)
    vision = vc.depth * per_patch * patches + vis_attn + patch_embed + merger
    return FlopCount(vision, language, lm_head, vis_attn, lang_attn)


def _causal_pairs(tokens: int, window: int | None = None) -> float:
    """(query, key) pairs of causal attention over `tokens`, each query seeing at most `window` keys:
    T^2 / 2 unwindowed, e.g. 330 tokens with Gemma 3's window of 1024 -> 54450."""
    if window is None or window >= tokens:
        return tokens * tokens / 2
    return window * window / 2 + (tokens - window) * window


def _count_gemma3(config, text_tokens: int) -> FlopCount:
    """Gemma 3: heads of head_dim (8 x 256 = 2048 wide in the 4B, not its hidden 2560), sliding layers
    attending over at most `sliding_window` keys, image tokens attending to each other both ways; the
    SigLIP tower at its fixed size (896 px: 4096 patches, full attention, fc1/fc2 MLP), average-pooled to
    mm_tokens_per_image (256) before one vision -> text projection; lm_head tied, same FLOPs."""
    tc, vc = config.text_config, config.vision_config
    h, inter = tc.hidden_size, tc.intermediate_size
    q, kv = tc.num_attention_heads * tc.head_dim, tc.num_key_value_heads * tc.head_dim
    per_token = 2 * (h * q * 2 + h * kv * 2 + 3 * h * inter)  # q, o; k, v; gate, up, down
    m = config.mm_tokens_per_image
    both_ways = m * m / 2  # the causal half the image block adds, e.g. 256^2 / 2
    lang_attn = sum(
        2 * 2 * q * (_causal_pairs(text_tokens, tc.sliding_window if kind == "sliding_attention" else None))
        + 2 * 2 * q * both_ways
        for kind in tc.layer_types
    )
    language = tc.num_hidden_layers * per_token * text_tokens + lang_attn
    lm_head = 2 * h * tc.vocab_size

    d, patches = vc.hidden_size, (vc.image_size // vc.patch_size) ** 2
    per_patch = 2 * (4 * d * d + 2 * d * vc.intermediate_size)  # q, k, v, o; fc1, fc2
    vis_attn = vc.num_hidden_layers * 2 * 2 * patches * patches * d
    patch_embed = 2 * patches * (vc.num_channels * vc.patch_size**2) * d
    projector = 2 * m * d * h  # after pooling: 256 tokens, not 4096
    vision = vc.num_hidden_layers * per_patch * patches + vis_attn + patch_embed + projector
    return FlopCount(vision, language, lm_head, vis_attn, lang_attn)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def datasheet_peak(name: str | None = None) -> float | None:
    """Dense bf16 TFLOP/s of the current GPU from its datasheet, or None if unknown / CPU."""
    name = name or device_name()
    return next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)


def measured_peak(n: int = 8192, reps: int = 10) -> float | None:
    """bf16 matrix-product rate measured now (TFLOP/s, random data, median of `reps`); None on CPU."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12
