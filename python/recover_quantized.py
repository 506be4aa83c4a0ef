"""Recipe: quantize the embedded default model to 2 bits, measure the damage, recover it with SDFT
(it stays 2-bit: QuantLinear straight-through fake-quant), and show perplexity, KL and CKA per layer
before and after. Uses only the public API.

    python python/recover_quantized.py --steps 60 --out runs/recover_rtn2
"""
import argparse
import json

from sdft_kernels.align import align
from sdft_kernels.data import encode, load_text, token_blocks
from sdft_kernels.degrade.quantize import quantize_rtn
from sdft_kernels.evaluate import perplexity
from sdft_kernels.io import save_model_dir
from sdft_kernels.models import load_model
from sdft_kernels.recover import RecoverConfig, kl_to_teacher, recover


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--out", default="runs/recover_rtn2")
    a = p.parse_args()

    teacher, tok = load_model()
    student, record = quantize_rtn(teacher, a.bits, group_size=a.group_size)
    held_text = load_text("heldout")
    ppl_ids = encode(tok, held_text)[:8192]
    align_ids = token_blocks(tok, held_text, 2048)[-1:]
    train = token_blocks(tok, load_text("train"), 256, max_blocks=512)

    def measure(model):
        al = align(teacher, model, align_ids, layer_map=record["layer_map"], heatmap=False, drop_first=1)
        return {"perplexity": perplexity(model, ppl_ids, window=256, stride=128),
                "kl": kl_to_teacher(teacher, model, align_ids[:, :512]), "cka": al["cka"]}

    out = {"original_perplexity": perplexity(teacher, ppl_ids, window=256, stride=128),
           "bits_per_weight": record["bits_per_weight"], "before": measure(student)}
    res = recover(teacher, student, train, RecoverConfig(steps=a.steps, lr=a.lr, batch_size=4, warmup_steps=3,
                                                         checkpoint_every=20),
                  out_dir=a.out, align_ids=align_ids, layer_map=record["layer_map"])
    out["after"] = measure(res.student)
    save_model_dir(res.student, tok, f"{a.out}/model", record)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
