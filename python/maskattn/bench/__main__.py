"""python -m maskattn.bench: every suite side by side with the seed layers, one table at the end."""

import argparse
import importlib
import platform
import sys

import torch

import maskattn

from ._harness import print_table

# Suite modules in maskattn.bench; each has run(args) -> list[Row] and add_args(parser) (optional).
SUITES = ["masked_attention_pool", "masked_softmax", "scaled_cross_attention", "foreground_mask", "gated_masked_mean"]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m maskattn.bench", description=__doc__)
    p.add_argument("--suite", action="append", choices=SUITES, help="run only these suites (repeatable)")
    p.add_argument("--device", default="cuda" if maskattn.cuda_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="smaller shapes and shorter timing (smoke test)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd seed layers")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of timed runs per measurement")
    p.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown to FILE")
    p.add_argument(
        "--plot",
        metavar="PNG",
        nargs="?",
        const="maskattn_speedup.png",
        help="write a speedup-versus-N plot of the pooling suite (needs matplotlib)",
    )
    mods = {name: importlib.import_module(f"maskattn.bench.{name}") for name in SUITES}
    for m in mods.values():
        if hasattr(m, "add_args"):
            m.add_args(p)
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    info = (
        f"maskattn {maskattn.__version__} | torch {torch.__version__} | {platform.processor() or platform.machine()} | "
        f"threads {torch.get_num_threads()} | device {args.device}"
        + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.type == "cuda" else "")
    )
    print(info, flush=True)
    rows = []
    for name in args.suite or SUITES:
        rows += mods[name].run(args)
    print()
    print(info)
    print_table(rows)
    if args.markdown:
        from ._harness import markdown_table

        with open(args.markdown, "w") as fh:
            fh.write(
                f"{info}\n\nCommand: python -m maskattn.bench {' '.join(argv if argv is not None else sys.argv[1:])}\n\n"
            )
            fh.write(markdown_table(rows) + "\n")
    if args.plot:
        from ._plot import plot_speedup

        print("wrote", plot_speedup(rows, args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
