"""`sdft align`: layer-by-layer CKA between a student and its teacher on held-out long sequences."""
from __future__ import annotations

from .common import friendly

from .common import add_device_arg, add_dtype_arg, add_layer_map_arg, add_model_arg, add_text_args


def configure(p):
    add_model_arg(p, "--teacher", "teacher / original model directory; default: the embedded model")
    add_model_arg(p, "--student", "student model directory (e.g. written by `sdft degrade`); required")
    add_text_args(p)
    p.add_argument("--blocks", type=int, default=2, help="number of held-out blocks")
    p.add_argument("--block-len", type=int, default=None, help="tokens per block (default: min(context, 2048))")
    p.add_argument("--chunk", type=int, default=512, help="stream each block through the KV cache in chunks")
    p.add_argument("--drop-first", type=int, default=1, help="leave out the first k positions (attention sink)")
    p.add_argument("--kernel", choices=("linear", "rbf"), default=None, help="also kernel CKA per matched layer")
    p.add_argument("--no-heatmap", action="store_true", help="skip the all-pairs minibatch CKA heatmap")
    p.add_argument("--overhead", action="store_true", help="also time alignment vs the plain forward passes")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the result JSON here")
    p.add_argument("--plot", default=None, metavar="PNG", help="write the heatmap PNG here")
    add_layer_map_arg(p)
    add_device_arg(p)
    add_dtype_arg(p)


@friendly
def main(args) -> int:
    from ..align import align, default_block_len, measure_overhead
    from .common import blocks, emit, fit_len, load_pair, parse_layer_map, read_text, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    if args.student is None:
        raise ValueError("--student: required (a model directory)")
    if args.blocks < 1 or args.chunk < 1 or args.drop_first < 0:
        raise ValueError("--blocks and --chunk must be >= 1, --drop-first >= 0")
    if args.block_len is not None and args.block_len < 2:  # 0 used to mean the default silently
        raise ValueError(f"--block-len: expected >= 2 tokens (omit it for the model's context), got {args.block_len}")
    text = read_text(args.text, "heldout")
    from ..distributed import init_world
    world = init_world()  # under torchrun: blocks sharded over ranks, CKA statistics all-reduced
    # each rank runs both models on its own device (cuda:LOCAL_RANK with nccl)
    teacher, tok, student, _, record, layer_map = load_pair(
        args.teacher, args.student, device=world.device if world.is_distributed else device,
        dtype=resolve_dtype(args.dtype), layer_map=parse_layer_map(args.layer_map))
    T = fit_len(args.block_len, "--block-len", teacher, student, default=default_block_len(teacher))
    ids = blocks(tok, text, T, None, "--text")[-args.blocks:]
    res = align(teacher, student, ids, layer_map=layer_map, chunk_len=args.chunk, drop_first=args.drop_first,
                heatmap=not args.no_heatmap, kernel=args.kernel, progress=world.is_main, world=world)
    if args.overhead:
        res["overhead"] = measure_overhead(teacher, student, ids[0], layer_map=layer_map, chunk_len=args.chunk,
                                           heatmap=not args.no_heatmap)
    res["dtype"] = str(next(student.parameters()).dtype).replace("torch.", "")
    if not world.is_main:
        return 0  # linear CKA and the heatmap are all-reduced (kernel CKA is the main rank's own); it writes
    if args.plot and "heatmap" in res:
        from pathlib import Path
        from ..plots import heatmap
        heatmap(Path(args.plot), res["heatmap"], None, "CKA teacher x student")
    emit(res, args.out)
    return 0
