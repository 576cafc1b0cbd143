"""Commands for learning and looking: `explain` (the primitives drawn step by step) and `data info`."""

from cnnkit.cli.arguments import SOURCES_HELP, log, matrix, nonempty, pair_of, vector, whole
from cnnkit.errors import ArgumentError


def add_explain(commands):
    explain = commands.add_parser(
        "explain",
        help="draw a convolution or pooling step by step (PNG), computed by cnnkit.ops",
        description="Draw the chapter's primitives step by step with their exact numbers: "
        "conv1d and conv2d (padding, flipped kernel, the inputs behind each output), and max and mean "
        "pooling (windows, stride, TensorFlow's SAME padding). Defaults are the chapter's examples.",
    )
    kinds = explain.add_subparsers(dest="explain_command", metavar="conv1d|conv2d|pool")
    kinds.required = True
    one = kinds.add_parser("conv1d", help="1-D convolution (default: the chapter's x and w, padding 2)")
    one.add_argument("--x", type=vector, default=None, help="the signal (default: 1,3,2,4,5,6,1,3)")
    one.add_argument("--w", type=vector, default=None, help="the kernel (default: 1,0,3,1,2)")
    one.add_argument("--padding", type=whole(0, 20), default=2, help="zeros at each end (default: 2)")
    one.add_argument("--stride", type=whole(1, 20), default=1, help="default: 1")
    two = kinds.add_parser(
        "conv2d", help="2-D convolution (default: the chapter's 4x4 x and 3x3 w, padding 1)"
    )
    two.add_argument(
        "--x", type=matrix, default=None, help="the image, rows separated by ';' (default: the chapter's)"
    )
    two.add_argument("--w", type=matrix, default=None, help="the kernel (default: '1,0,3;1,2,1;0,1,1')")
    two.add_argument("--padding", type=pair_of(0, 10), default=(1, 1), help="P or P1,P2 (default: 1)")
    two.add_argument("--stride", type=pair_of(1, 10), default=(1, 1), help="S or S1,S2 (default: 1)")
    two.add_argument(
        "--at",
        type=pair_of(0, 10_000),
        action="append",
        default=None,
        metavar="I,J",
        help="an output y[I, J] whose sum is written out in full; repeat for more "
        "(default: the first, the middle and the last)",
    )
    pool = kinds.add_parser(
        "pool", help="max and mean pooling (default: a 5x5 image, 2x2 windows, SAME padding)"
    )
    pool.add_argument("--x", type=matrix, default=None, help="the image (default: 0..24 in 5 rows)")
    pool.add_argument("--size", type=pair_of(1, 10), default=(2, 2), help="window K or KH,KW (default: 2)")
    pool.add_argument("--stride", type=pair_of(1, 10), default=None, help="default: the window size")
    pool.add_argument(
        "--padding", choices=("same", "valid"), default="same", help="default: same (TensorFlow's)"
    )
    for p in (one, two, pool):
        p.add_argument(
            "--out",
            type=nonempty,
            default=None,
            metavar="FILE.png",
            help=f"default: {p.prog.split()[-1]}.png",
        )
        p.set_defaults(run=run_explain)


def run_explain(args) -> int:
    from cnnkit import plots

    kind = args.explain_command
    out = args.out or f"{kind}.png"
    if not out.lower().endswith(".png"):
        raise ArgumentError(f"--out {out!r}: expected a file name ending in .png")
    try:
        if kind == "conv1d":
            x, w = args.x or plots.CHAPTER_X1, args.w or plots.CHAPTER_W1
            figure = plots.explain_conv1d(x, w, args.padding, args.stride)
        elif kind == "conv2d":
            x, w = args.x or plots.CHAPTER_X2, args.w or plots.CHAPTER_W2
            figure = plots.explain_conv2d(x, w, args.padding, args.stride, show=args.at)
        else:
            figure = plots.explain_pool(args.x or plots.POOL_EXAMPLE, args.size, args.stride, args.padding)
    except ValueError as exc:  # cnnkit.ops names the argument and what it expected
        raise ArgumentError(f"cnnkit explain {kind}: {exc}") from None
    plots.save_figure(figure, out)
    log(f"wrote {out}")
    return 0


def add_data(commands):
    data = commands.add_parser("data", help="inspect datasets")
    data_commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data_commands.required = True
    info = data_commands.add_parser("info", help="print splits, counts, shapes, classes and statistics")
    info.add_argument("source", type=nonempty, help=SOURCES_HELP)
    info.set_defaults(run=run_data_info)


def run_data_info(args) -> int:
    from cnnkit.data import info_table, load_dataset

    log(info_table(load_dataset(args.source)))
    return 0
