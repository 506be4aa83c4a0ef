"""Degradation specs: one short string per degradation and severity, parsed and range-checked
before any work, then applied through the degrade package.

    forget:STEPS            SFT on the shipped narrow task for STEPS steps (catastrophic forgetting)
    rtn:BITS[:gG][:asym]    round-to-nearest weight quantization, BITS in {2,3,4,8}, group size G
    gptq:BITS[:gG][:asym][:act]  GPTQ with calibration text (act: columns in order of decreasing Hessian
                            diagonal, with static groups)
    blocks:N                remove N decoder blocks chosen by angular distance (Gromov et al.)
    magnitude:S, wanda:S    unstructured pruning at sparsity S in (0, 1)
    magnitude2:4, wanda2:4  2:4 semi-structured pruning
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field

BITS = (2, 3, 4, 8)


@dataclass
class Spec:
    text: str
    kind: str                 # forget | rtn | gptq | blocks | magnitude | wanda | magnitude2:4 | wanda2:4
    value: float = 0.0        # steps / bits / n blocks / sparsity
    options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """File-system safe name of this run."""
        return self.text.replace(":", "-").replace("/", "_")

    @property
    def family(self) -> str:
        return {"forget": "forgetting", "rtn": "quantization", "gptq": "quantization",
                "blocks": "block removal"}.get(self.kind, "pruning")

    @property
    def needs_calibration(self) -> bool:
        return self.kind in ("gptq", "blocks", "wanda", "wanda2:4")


def parse_spec(text: str, n_layers: int | None = None) -> Spec:
    """Parse and range-check one spec; a bad one raises ValueError naming what was expected."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"degradation spec: expected a non-empty string, got {text!r}")
    t = text.strip().lower()
    if t in ("magnitude2:4", "wanda2:4", "2:4"):
        return Spec(text=t if t != "2:4" else "wanda2:4", kind=t if t != "2:4" else "wanda2:4")
    kind, _, rest = t.partition(":")
    parts = [p for p in rest.split(":") if p]
    if kind not in ("forget", "rtn", "gptq", "blocks", "magnitude", "wanda"):
        raise ValueError(f"degradation spec {text!r}: unknown kind {kind!r}; expected forget:STEPS, "
                         "rtn:BITS, gptq:BITS, blocks:N, magnitude:S, wanda:S, magnitude2:4 or wanda2:4")
    if not parts:
        raise ValueError(f"degradation spec {text!r}: missing severity after '{kind}:'")
    try:
        value = float(parts[0])
    except ValueError:
        raise ValueError(f"degradation spec {text!r}: severity {parts[0]!r} is not a number") from None
    if not math.isfinite(value):  # inf / nan: every range check below would pass or crash on int()
        raise ValueError(f"degradation spec {text!r}: severity must be a finite number, got {parts[0]!r}")
    opts: dict = {}
    if kind in ("rtn", "gptq"):
        if value not in BITS:
            raise ValueError(f"degradation spec {text!r}: bits must be one of {BITS}, got {parts[0]}")
        value = int(value)
        opts = {"group_size": 128, "symmetric": True}
        for p in parts[1:]:
            if p == "asym":
                opts["symmetric"] = False
            elif p.startswith("g") and p[1:].isdigit() and int(p[1:]) > 0:
                opts["group_size"] = int(p[1:])
            elif p == "act" and kind == "gptq":
                opts["act_order"] = True
            else:
                expected = "gSIZE, asym or act" if kind == "gptq" else "gSIZE or asym"
                raise ValueError(f"degradation spec {text!r}: unknown option {p!r} (expected {expected})")
    elif parts[1:]:
        raise ValueError(f"degradation spec {text!r}: unexpected options {parts[1:]}")
    if kind == "forget" and (value < 1 or value != int(value)):
        raise ValueError(f"degradation spec {text!r}: steps must be a positive integer")
    if kind == "blocks":
        if value < 1 or value != int(value):
            raise ValueError(f"degradation spec {text!r}: the number of blocks must be a positive integer")
        if n_layers is not None and value >= n_layers:
            raise ValueError(f"degradation spec {text!r}: cannot remove {int(value)} of the model's "
                             f"{n_layers} decoder blocks (at most {n_layers - 1})")
    if kind in ("magnitude", "wanda") and not 0.0 < value < 1.0:
        raise ValueError(f"degradation spec {text!r}: sparsity must be in (0, 1), got {parts[0]}")
    if kind in ("forget", "blocks"):
        value = int(value)
    return Spec(text=t, kind=kind, value=value, options=opts)


def stack_record(prev: dict | None, spec: Spec, new: dict | None = None) -> dict | None:
    """Degrading a model that is itself degraded (its record `prev`): called with new=None before any work,
    it refuses what cannot stack (the weights of a quantized or pruned model are not plain nn.Linear ones:
    quantizing or pruning them again, or copying a pruned model, is not supported); called with the new
    record, it returns it with the layer map composed (student block i now stands for the ORIGINAL
    model's block prev_map[new_map[i]]: after a block removal a reset map would silently pair the wrong
    blocks) and the earlier record kept under "previous"."""
    if prev is None:
        return new
    compressed = str(prev.get("kind", "")).startswith(("quantize", "prune_unstructured", "prune_2_4"))
    if new is None:
        if compressed and (spec.kind != "blocks" or prev["kind"].startswith("prune")):
            raise ValueError(f"--model: is already degraded by {prev['kind']}; applying {spec.text!r} on top is not "
                             "supported (quantized / pruned weights are not plain linear layers): degrade the "
                             "original model, or remove blocks first and compress after")
        return None
    new = dict(new)
    new["layer_map"] = [int(prev["layer_map"][i]) for i in new["layer_map"]]
    new["previous"] = prev
    return new


def apply_spec(spec: Spec, model, tokenizer, calib_ids=None, seed: int = 0):
    """Run the degradation; returns (new_model, record). The input model is not modified."""
    if spec.needs_calibration and calib_ids is None:
        raise ValueError(f"{spec.text}: needs calibration token ids")
    if spec.kind == "forget":
        from .degrade.forget import forget_sft
        # forget_sft trains a copy of `model`; a frozen teacher (requires_grad=False, as recover()
        # leaves it) would be copied frozen, so unfreeze for the call and restore the flags after.
        flags = [p.requires_grad for p in model.parameters()]
        try:
            model.requires_grad_(True)
            return forget_sft(model, tokenizer, int(spec.value), seed=seed)
        finally:
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)
    if spec.kind == "rtn":
        from .degrade.quantize import quantize_rtn
        return quantize_rtn(model, int(spec.value), **spec.options)
    if spec.kind == "gptq":
        from .degrade.quantize import quantize_gptq
        return quantize_gptq(model, calib_ids, int(spec.value), **spec.options)
    from .degrade import prune
    if spec.kind == "blocks":
        return prune.prune_blocks(model, int(spec.value), calib_ids)
    if spec.kind in ("magnitude", "wanda"):
        return prune.prune_unstructured(model, float(spec.value), method=spec.kind,
                                        calib_ids=calib_ids if spec.kind == "wanda" else None)
    method = spec.kind.replace("2:4", "")
    return prune.prune_2_4(model, method=method, calib_ids=calib_ids if method == "wanda" else None)
